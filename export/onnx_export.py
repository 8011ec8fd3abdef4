"""Encoders with their projectors -> ONNX (fp32, and fp16 with float32 inputs/outputs).

Each branch emits LLM-space rows directly. Per-window axes are dynamic: the number of face frames
(MAE) and the number of audio samples (HuBERT). Models over 2 GB keep their weights in one
``<name>.onnx.data`` file beside the graph (protobuf's limit).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from ..branches import BRANCHES
from ..errors import OutputError
from ..lazy import require
from ..spec import ModelSpec

EXTERNAL_DATA_BYTES = 1_800_000_000


def export_branch(module, branch: str, spec: ModelSpec, path: Path, opset: int, metadata: dict) -> list:
    """Trace ``module`` to ``path``; returns the files written (graph, and external data if any)."""
    torch = require("torch")
    onnx = require("onnx")
    io = BRANCHES[branch]
    sample = io.example_inputs(spec, np.random.default_rng(0), frames=3, seconds=0.5)
    device = next(module.parameters()).device
    module.to("cpu")   # the TorchScript exporter's constant folding mixes CPU and CUDA tensors (torch 2.11)
    args = tuple(torch.from_numpy(sample[name]) for name in io.input_names)
    # a folder of its own: over 2 GB the exporter writes every weight as a separate file beside the graph
    raw = path.parent / f".{path.name}.trace" / "model.onnx"
    raw.parent.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
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
    return save_onnx(model, path, {**metadata, "branch": branch})


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
    and the error then broke HuBERT's Conv running beside it; the float32 convolutions ran. They are the
    patch embeddings and HuBERT's feature extractor, a few percent of the arithmetic."""
    float16 = require("onnxruntime.transformers.float16")
    # given the path, the converter infers types with onnx's file-based inference, which works over 2 GB;
    # it needs the types to put casts around the float32 convolutions
    half = float16.convert_float_to_float16(str(src), keep_io_types=True, disable_shape_infer=False,
                                            op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS))
    return save_onnx(half, dst, {**metadata, "precision": "fp16"})
