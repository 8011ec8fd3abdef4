"""Per-device defaults (runtime/device.py): which class a machine is, and what each class loads."""
from __future__ import annotations

import pytest

from edge_emollama.config import LlmConfig
from edge_emollama.manifest import load_artifacts
from edge_emollama.runtime import device
from edge_emollama.runtime.stages import LlmStage


def test_llama_cpp_system_info_is_read_into_features():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | AVX512_VNNI = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
    assert device.system_info_features(info) == {"SSE3", "AVX", "AVX512_VNNI", "LLAMAFILE", "OPENMP"}
    here = device._llama_cpu_features()   # this machine's llama.cpp: a CPU build reports its instruction sets
    assert here and all(name.isupper() or "_" in name for name in here)


@pytest.mark.parametrize("features, expected", [({"AVX2", "AVX512", "AVX512_VNNI"}, "cpu-avx512"),
                                                ({"AVX2", "AVX512"}, "cpu"), (set(), "cpu")])
def test_cpus_with_vnni_get_their_own_class(monkeypatch, features, expected):
    monkeypatch.setattr(device, "_ort_has_cuda", lambda: False)
    monkeypatch.setattr(device, "_llama_has_gpu", lambda: False)
    monkeypatch.setattr(device, "_llama_cpu_features", lambda: frozenset(features))
    assert device.device_class() == expected
    chosen = device.resolve("quant", "auto", exported={"F16", "Q8_0", "Q4_K_M"})
    assert chosen == ("Q8_0" if expected == "cpu-avx512" else "F16")
    assert device.resolve("quant", "auto", exported={"F16"}) == "F16"   # a default not exported: F16
    assert device.resolve("quant", "Q4_K_M") == "Q4_K_M"                # a setting wins over the default


def test_every_class_sets_every_default():
    keys = {frozenset(row) for row in device.DEFAULTS.values()}
    assert len(keys) == 1 and {"quant", "precision", "n_gpu_layers", "io_binding"} <= next(iter(keys))


def test_the_llm_stage_loads_this_machines_default(tiny_artifacts):
    stage = LlmStage(load_artifacts(tiny_artifacts), LlmConfig(threads=1))
    try:
        assert stage.quant == device.DEFAULTS[device.device_class()]["quant"]
        assert stage.path.name.endswith(f"{stage.quant}.gguf")
    finally:
        stage.close()
