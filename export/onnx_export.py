"""Encoders with their projectors -> ONNX (fp32, and fp16 with float32 inputs/outputs).

Each branch emits LLM-space rows directly. Per-window axes are dynamic: the number of face frames
(MAE) and the number of audio samples (HuBERT). Models over 2 GB keep their weights in one
``<name>.onnx.data`` file beside the graph (protobuf's limit).

The ViTs (EVA, MAE, VideoMAE) are traced in their *export form* (:func:`export_form`), the same arithmetic
in fewer, faster operators: each attention is one ``com.microsoft.MultiHeadAttention`` node (ONNX Runtime's
fused kernel on the CPU and CUDA providers; flash attention for fp16 on CUDA), and each patch embedding is a
reshape and a MatMul instead of a strided convolution (exact: the patches do not overlap), so no cuDNN
convolution is left in a ViT. The reference modules themselves stay as the original code wrote them; the
parity checks compare the exported form with them.
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..branches import BRANCHES
from ..errors import OutputError
from ..lazy import require
from ..spec import ModelSpec

EXTERNAL_DATA_BYTES = 1_800_000_000


def export_branch(module, branch: str, spec: ModelSpec, path: Path, opset: int, metadata: dict,
                  fused: bool = True) -> list:
    """Trace ``module`` to ``path`` (in its export form unless ``fused`` is False: plain ONNX operators, for
    TensorRT's parser, which has no com.microsoft ops); returns the files written (graph, and external data)."""
    torch = require("torch")
    onnx = require("onnx")
    io = BRANCHES[branch]
    # two windows for a batched branch, so that nothing in the trace can take the batch for a constant
    sample = io.example_inputs(spec, np.random.default_rng(0), frames=3, seconds=0.5, batch=2 if io.batched else 1)
    device = next(module.parameters()).device
    module.to("cpu")   # the TorchScript exporter's constant folding mixes CPU and CUDA tensors (torch 2.11)
    swap = export_form(module) if fused else contextlib.nullcontext(0)
    args = tuple(torch.from_numpy(sample[name]) for name in io.input_names)
    # a folder of its own: over 2 GB the exporter writes every weight as a separate file beside the graph
    raw = path.parent / f".{path.name}.trace" / "model.onnx"
    raw.parent.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), swap:
        # the TorchScript exporter: 0.2 s against ~5 s for the dynamo one, same graphs for these modules
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(module.eval(), args, str(raw), input_names=list(io.input_names),
                              output_names=list(io.output_names), dynamic_axes=io.dynamic_axes() or None,
                              opset_version=opset,
                              dynamo=False, do_constant_folding=True)
        finally:
            module.to(device)
    model = onnx.load(str(raw), load_external_data=True)
    shutil.rmtree(raw.parent)
    form = "fused attention, matmul patches" if fused and any(n.domain == "com.microsoft" for n in model.graph.node) \
        else "plain"
    return save_onnx(model, path, {**metadata, "branch": branch, "export_form": form})


@contextlib.contextmanager
def export_form(module):
    """Within the block, ``module``'s ViT attentions and patch embeddings are replaced by their export forms
    (sharing their parameters); the originals are put back afterwards."""
    from ..reference.vit import Attention, PatchEmbed

    forms = _forms()
    swapped = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, (Attention, PatchEmbed))]
    for parent, name, child in swapped:
        setattr(parent, name, forms["attention" if isinstance(child, Attention) else "patches"](child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@lru_cache(maxsize=1)
def _forms() -> dict:
    """The export-form module classes (defined here so that torch is imported only when exporting)."""
    torch = require("torch")
    F = torch.nn.functional

    class FusedMha(torch.autograd.Function):
        """Multi-head attention of [B, S, C] q, k, v; exported as one com.microsoft.MultiHeadAttention."""

        @staticmethod
        def forward(ctx, q, k, v, heads: int):
            b, n, c = q.shape
            split = [t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*split)   # scale 1/sqrt(head size), as the ViTs'
            return out.transpose(1, 2).reshape(b, n, c)

        @staticmethod
        def symbolic(g, q, k, v, heads: int):
            out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
            out.setType(q.type())   # [B, S, C] like the query (the exporter cannot infer a contrib op's type)
            return out

    class FusedAttention(torch.nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.original = attention

        def forward(self, x):
            a = self.original
            bias = a.qkv.bias
            if a._qv:
                bias = torch.cat((a.q_bias, torch.zeros_like(a.v_bias), a.v_bias))
            q, k, v = F.linear(x, a.qkv.weight, bias).chunk(3, dim=-1)
            return a.proj(FusedMha.apply(q, k, v, a.heads))

    class MatmulPatches(torch.nn.Module):
        """A stride = kernel convolution as non-overlapping patches times the flattened kernel."""

        def __init__(self, patch_embed):
            super().__init__()
            self.original = patch_embed

        def forward(self, x):
            conv = self.original.proj
            kernel = tuple(conv.kernel_size)
            grid = [size // k for size, k in zip(x.shape[2:], kernel)]
            # [B, C, g1, k1, g2, k2, ...] -> [B, g1, g2, ..., C, k1, k2, ...]
            x = x.reshape(x.shape[0], x.shape[1], *[v for g, k in zip(grid, kernel) for v in (g, k)])
            dims = len(kernel)
            x = x.permute(0, *range(2, 2 + 2 * dims, 2), 1, *range(3, 3 + 2 * dims, 2))
            x = x.reshape(x.shape[0], -1, conv.weight[0].numel())
            return x @ conv.weight.reshape(conv.weight.shape[0], -1).t() + conv.bias

    return {"attention": FusedAttention, "patches": MatmulPatches}


def save_onnx(model, path: Path, metadata: dict) -> list:
    """Write with metadata_props; weights go to ``<name>.data`` when the model is over 2 GB."""
    onnx = require("onnx")
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    big = model.ByteSize() > EXTERNAL_DATA_BYTES if _has_inline_data(model) else True
    data_name = path.name + ".data"
    try:
        onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}; check free space and permissions") from exc
    return [path] + ([path.with_name(data_name)] if big else [])


def _has_inline_data(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size a message over 2 GB
        return False


FP32_OPS = ("Conv",)


def convert_fp16(src: Path, dst: Path, metadata: dict) -> list:
    """fp16 weights and compute, float32 inputs and outputs (onnxruntime's converter).

    Convolutions stay float32 (``FP32_OPS``): on an H200 with onnxruntime-gpu 1.31.1 and cuDNN 9 for CUDA 13,
    cuDNN had no fp16 engine for VideoMAE's 3-channel Conv3d patch embedding ("No valid engine configs"),
    and the error then broke HuBERT's Conv running beside it; the float32 convolutions ran. The ViTs' patch
    embeddings are MatMuls now (:func:`export_form`), so only HuBERT's feature extractor and positional
    convolution remain, a few percent of its arithmetic."""
    float16 = require("onnxruntime.transformers.float16")
    # given the path, the converter infers types with onnx's file-based inference, which works over 2 GB;
    # it needs the types to put casts around the float32 convolutions
    half = float16.convert_float_to_float16(str(src), keep_io_types=True, disable_shape_infer=False,
                                            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS))
    return save_onnx(half, dst, {**metadata, "precision": "fp16"})
