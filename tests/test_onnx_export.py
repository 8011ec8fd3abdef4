"""Encoder branches -> ONNX -> ONNX Runtime equals PyTorch, with the per-window axes dynamic."""
import numpy as np
import onnx
import pytest

from edge_emollama.branches import BRANCHES
from edge_emollama.export.onnx_export import convert_fp16, export_branch
from edge_emollama.export.validate import encoder_parity
from edge_emollama.spec import TINY


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_reference):
    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for branch, module in tiny_reference.export_units().items():
        (fp32,) = export_branch(module, branch, TINY, folder / f"{branch}.onnx", 17, {"preset": "tiny"})
        (fp16,) = convert_fp16(fp32, folder / f"{branch}.fp16.onnx", {"preset": "tiny"})
        files[branch] = {"fp32": fp32, "fp16": fp16}
    return files


@pytest.mark.parametrize("branch", ["eva", "mae", "videomae", "hubert"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_matches_pytorch_on_fresh_inputs(exported, tiny_reference, branch, precision):
    rng = np.random.default_rng()   # fresh draws: frame counts 1..16, audio 0.5..3 s
    row = encoder_parity(tiny_reference, TINY, branch, precision, exported[branch][precision], rng, trials=3)
    assert row["max_rel_err"] <= BRANCHES[branch].tolerance[precision] == row["limit"], row
    assert row["max_rel_err"] > 0 or precision == "fp32"


def test_metadata_and_dynamic_axes_are_recorded(exported):
    model = onnx.load(str(exported["mae"]["fp32"]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["branch"] == "mae" and meta["preset"] == "tiny"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "frames"
    audio = onnx.load(str(exported["hubert"]["fp16"]))
    assert audio.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT   # fp32 I/O kept
    assert audio.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "samples"


def test_models_over_the_protobuf_limit_convert_with_float32_convolutions(tmp_path, tiny_reference, monkeypatch):
    """The >2 GB route (weights in one external .data file, file-based type inference), forced at tiny size:
    the fp16 graph keeps every Conv in float32 (cuDNN had no fp16 engine for VideoMAE's Conv3d on an H200;
    HuBERT's feature extractor is the one with convolutions now) and still matches PyTorch; the trace folder is
    gone."""
    from edge_emollama.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    module = tiny_reference.export_units()["hubert"]
    fp32, data = export_branch(module, "hubert", TINY, tmp_path / "hubert.onnx", 17, {"preset": "tiny"})
    fp16, data16 = convert_fp16(fp32, tmp_path / "hubert.fp16.onnx", {"preset": "tiny"})
    assert data.name == "hubert.onnx.data" and data16.name == "hubert.fp16.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (fp32, data, fp16, data16))
    graph = onnx.load(str(fp16)).graph
    initializers = {i.name: i.data_type for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(initializers.get(n.input[1]) == onnx.TensorProto.FLOAT for n in convs)
    assert any(t == onnx.TensorProto.FLOAT16 for t in initializers.values())
    row = encoder_parity(tiny_reference, TINY, "hubert", "fp16", fp16, np.random.default_rng(), trials=2)
    assert 0 < row["max_rel_err"] <= BRANCHES["hubert"].tolerance["fp16"], row


def test_the_vits_export_fused_attention_and_matmul_patches_equal_to_pytorch(tmp_path, tiny_reference):
    """Each ViT branch's ONNX has one com.microsoft.MultiHeadAttention per block and no convolution, matches the
    reference (which keeps the original Conv and MatMul/Softmax attention) in fp32 and fp16, and the reference
    is left as it was."""
    from edge_emollama.export.onnx_export import export_form

    for branch, depth in (("eva", TINY.eva.depth), ("mae", TINY.mae.depth), ("videomae", TINY.videomae.depth)):
        module = tiny_reference.export_units()[branch]
        fp32, *_ = export_branch(module, branch, TINY, tmp_path / f"{branch}.onnx", 17, {"preset": "tiny"})
        fp16, *_ = convert_fp16(fp32, tmp_path / f"{branch}.fp16.onnx", {"preset": "tiny"})
        ops = [n.op_type for n in onnx.load(str(fp32)).graph.node]
        assert ops.count("MultiHeadAttention") == depth and "Conv" not in ops and "Softmax" not in ops
        for precision, path in (("fp32", fp32), ("fp16", fp16)):
            row = encoder_parity(tiny_reference, TINY, branch, precision, path, np.random.default_rng(), trials=1)
            assert row["max_rel_err"] <= BRANCHES[branch].tolerance[precision], row
        kinds = {type(m).__name__ for m in module.modules()}   # the export forms were put back
        assert {"Attention", "PatchEmbed"} <= kinds and not {"FusedAttention", "MatmulPatches"} & kinds
    with export_form(module) as swapped:   # the last one, VideoMAE: each block's attention and the patches
        assert swapped == TINY.videomae.depth + 1
    plain, *_ = export_branch(module, "videomae", TINY, tmp_path / "plain.onnx", 17, {}, fused=False)
    ops = {n.op_type for n in onnx.load(str(plain)).graph.node}   # export.vit_form: plain (TensorRT's files)
    assert {"Conv", "Softmax"} <= ops and "MultiHeadAttention" not in ops
