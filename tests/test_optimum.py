"""optimum where it serves (docs/optimum.md): its HuBERT export equals ours, its int8 encoders load and agree.

optimum-onnx 0.1.0 needs transformers<4.58, so its code runs in a subprocess with .optimum-env first on
PYTHONPATH (``make optimum-env``, a dependency of ``make test``); these tests fail, not skip, without it.
"""
import json
import os

import numpy as np
import pytest

from edge_emollama.branches import BRANCHES, TOLERANCES
from edge_emollama.errors import ConfigError, MissingDependencyError
from edge_emollama.export import optimum_tools as ot
from edge_emollama.manifest import load_artifacts


@pytest.fixture(scope="module")
def tiny(tiny_artifacts):
    return load_artifacts(tiny_artifacts, verify=False)


@pytest.fixture(scope="module")
def optimum_hubert(tmp_path_factory, tiny_reference):
    """optimum's ONNX export of the tiny reference's HuBERT, saved as a Hugging Face directory first."""
    folder = tmp_path_factory.mktemp("optimum")
    tiny_reference.audio_encoder.save_pretrained(folder / "hf-hubert")
    return ot.export_hubert(folder / "hf-hubert", folder / "onnx")


def test_optimum_hubert_equals_ours_on_fresh_audio(optimum_hubert, tiny, tiny_reference):
    assert optimum_hubert["transformers"].startswith("4.57") and optimum_hubert["optimum_onnx"] == "0.1.0"
    ours = tiny.path(format="onnx", branch="hubert", precision="fp32")
    seed = int.from_bytes(os.urandom(4), "little")
    for seconds in (0.5, 2.0):
        row = ot.hubert_parity(optimum_hubert["file"], ours, ot.hubert_projector(tiny_reference), tiny.spec,
                               seed=seed, trials=2, seconds=seconds)
        assert row["rel_err"] <= TOLERANCES["fp32"], row


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_int8_encoders_load_and_agree_loosely(tiny, tmp_path, branch):
    fp32 = tiny.path(format="onnx", branch=branch, precision="fp32")
    quantized = ot.quantize_int8(fp32, tmp_path, ot.quantization_target())
    assert quantized["plain_path"].startswith("refused"), quantized   # from_pretrained takes no plain .onnx path
    got = ot.session(quantized["file"])
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear")
               for n in _graph(quantized["file"]).node), "nothing was quantized"
    assert [o.name for o in got.get_outputs()] == list(BRANCHES[branch].output_names)
    row = ot.branch_parity(quantized["file"], fp32, branch, tiny.spec, trials=2)
    assert 0 < row["rel_err"] <= ot.INT8_TOLERANCE, row


def test_a_folder_without_config_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no config.json.*Hugging Face HuBERT directory"):
        ot.export_hubert(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ConfigError, match="'wav2vec2', not 'hubert'"):
        ot.export_hubert(tmp_path, tmp_path / "out")


def test_a_missing_optimum_environment_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(ot.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(MissingDependencyError, match="nowhere.*make optimum-env"):
        ot.quantize_int8(__file__, tmp_path)


def test_the_quantization_config_follows_the_machine():
    assert ot.quantization_target("aarch64") == "arm64"
    assert ot.quantization_target("x86_64", "flags : avx2 avx512f avx512_vnni") == "avx512_vnni"
    assert ot.quantization_target("x86_64", "flags : avx2") == "avx2"


def _graph(path):
    import onnx

    return onnx.load(str(path)).graph
