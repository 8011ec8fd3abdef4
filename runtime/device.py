"""Per-device defaults, backed by measurements (BENCHMARKS.md), overridable in config.yaml.

| device class | GGUF | ONNX precision | llama.cpp layers on GPU | encoder IO binding |
|---|---|---|---|---|
| ``cuda`` (desktop/server GPU) | F16 | fp16 | all | on |
| ``jetson`` (Orin, unified memory) | Q4_K_M | fp16 | all | on |
| ``cpu-avx512`` (x86 with AVX512-VNNI, as llama.cpp reports) | Q8_0 | fp32 | 0 | off |
| ``cpu`` (other CPUs) | F16 | fp32 | 0 | off |

Why:
- ``cuda``: F16 prefilled ~2x faster than Q4_K_M on a large GPU (18 vs 38 ms for 330 positions, spec section 6);
  measured here on an H200 at full shapes: the F16 LLM stage takes 54 ms p50 per window, all layers on the GPU.
  fp16 encoders: the fp32 ones ran (EVA-g 43 ms); the first fp16 export failed in cuDNN on VideoMAE's Conv3d,
  since fixed by keeping convolutions in float32 (export/onnx_export.py), not yet re-measured on a GPU.
  If the fp16 encoders fail on a machine, the error says to set ``runtime.encoders.precision: fp32``.
- ``jetson``: memory and decode bandwidth bound: 4-bit weights cut both (not measured: no Jetson here).
- IO binding (runtime/binding.py): on a GPU it saves ONNX Runtime's per-run staging of inputs and outputs (not
  yet measured on a GPU); a session that runs on the CPU goes without it unless it is set to true (on the CPU it
  gives the same bits as ``session.run``, tests/test_encoder_binding.py, and saves nothing).
- ``cpu-avx512``: measured on a 2-vCPU AMD EPYC (Zen 4: AVX512-VNNI, AVX512-BF16), mid preset, one bench run
  (BENCHMARKS.md, "LLM stage by GGUF type"): LLM stage F16 54.2 ms, Q8_0 42.6 ms (1.27x), Q4_K_M 36.6 ms (1.48x).
  Q8_0 changes the labels' scores little (the export's check against the reference on random windows of the
  random-weight mid preset: top label 40/40, KL max 4.4e-4 in this session's run; 92/93 decisive, KL max 7.7e-3
  with another seed, docs/verification.md; llama.cpp's Q8_0 is near-lossless on trained LLaMA weights), Q4_K_M
  more (KL max 1.3e-2, 0.52 with another seed), so Q8_0 is the default here. For scores equal to the reference's
  within the F16 gate set ``runtime.llm.quant: F16``.
- ``cpu``: measured on another 2-core x86 machine of the same kind (its CPU features were not recorded), mid
  preset: LLM stage F16 85 ms, Q4_K_M 83 ms, Q8_0 103 ms (runs vary by 10-30 %: no quantization was faster, and
  F16 is exact). fp16 ONNX has few fast CPU kernels on either.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..lazy import available

log = logging.getLogger(__name__)

DEFAULTS = {
    "cuda": {"quant": "F16", "precision": "fp16", "n_gpu_layers": -1, "io_binding": True},
    "jetson": {"quant": "Q4_K_M", "precision": "fp16", "n_gpu_layers": -1, "io_binding": True},
    "cpu-avx512": {"quant": "Q8_0", "precision": "fp32", "n_gpu_layers": 0, "io_binding": False},
    "cpu": {"quant": "F16", "precision": "fp32", "n_gpu_layers": 0, "io_binding": False},
}


def device_class() -> str:
    """``jetson`` on an NVIDIA Tegra board, ``cuda`` when ONNX Runtime or llama.cpp can use a CUDA GPU, else
    ``cpu-avx512`` where llama.cpp runs with AVX512-VNNI, else ``cpu``."""
    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if _ort_has_cuda() or _llama_has_gpu():
        return "cuda"
    return "cpu-avx512" if "AVX512_VNNI" in _llama_cpu_features() else "cpu"


def _ort_has_cuda() -> bool:
    if not available("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _llama_has_gpu() -> bool:
    if not available("llama_cpp"):
        return False
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@functools.lru_cache(maxsize=1)
def _llama_cpu_features() -> frozenset:
    """The CPU features llama.cpp was built for and found (``llama_print_system_info``: "AVX2 = 1 | ...")."""
    if not available("llama_cpp"):
        return frozenset()
    import llama_cpp

    return system_info_features(llama_cpp.llama_print_system_info().decode(errors="replace"))


def system_info_features(info: str) -> frozenset:
    """The features set to 1 in llama.cpp's system info ("CPU : SSE3 = 1 | AVX512_VNNI = 1 | ...")."""
    parts = (part.partition("=") for part in info.replace(":", "|").split("|"))
    return frozenset(name.strip() for name, _, value in parts if value.strip() == "1")


def resolve(setting: str, value, exported: set | None = None):
    """``value`` unless it is "auto" (then this device's default); a quant not exported falls back to F16."""
    cls = device_class()
    if value != "auto":
        return value
    chosen = DEFAULTS[cls][setting]
    if setting == "quant" and exported is not None and chosen not in exported:
        log.info("GGUF %s (the %s default) was not exported; using F16", chosen, cls)
        chosen = "F16"
    log.info("%s = %s (default for device class %s)", setting, chosen, cls)
    return chosen
