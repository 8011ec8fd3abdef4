"""Per-device defaults, backed by measurements (BENCHMARKS.md), overridable in config.yaml.

| device class | GGUF | ONNX precision | llama.cpp layers on GPU |
|---|---|---|---|
| ``cuda`` (desktop/server GPU) | F16 | fp16 | all |
| ``jetson`` (Orin, unified memory) | Q4_K_M | fp16 | all |
| ``cpu`` | F16 | fp32 | 0 |

Why:
- ``cuda``: F16 prefilled ~2x faster than Q4_K_M on a large GPU (18 vs 38 ms for 330 positions, spec section 6);
  measured here on an H200 at full shapes: the F16 LLM stage takes 54 ms p50 per window, all layers on the GPU.
  fp16 encoders: the fp32 ones ran (EVA-g 43 ms); the first fp16 export failed in cuDNN on VideoMAE's Conv3d,
  since fixed by keeping convolutions in float32 (export/onnx_export.py), not yet re-measured on a GPU.
  If the fp16 encoders fail on a machine, the error says to set ``runtime.encoders.precision: fp32``.
- ``jetson``: memory and decode bandwidth bound: 4-bit weights cut both (not measured: no Jetson here).
- ``cpu``: measured on a 2-core x86 CPU, mid preset: LLM stage F16 85 ms, Q4_K_M 83 ms, Q8_0 103 ms (runs vary
  by 10-30 %: no quantization is clearly faster, and F16 is exact); fp16 ONNX has few fast CPU kernels.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..lazy import available

log = logging.getLogger(__name__)

DEFAULTS = {
    "cuda": {"quant": "F16", "precision": "fp16", "n_gpu_layers": -1},
    "jetson": {"quant": "Q4_K_M", "precision": "fp16", "n_gpu_layers": -1},
    "cpu": {"quant": "F16", "precision": "fp32", "n_gpu_layers": 0},
}


def device_class() -> str:
    """``jetson`` on an NVIDIA Tegra board, ``cuda`` when ONNX Runtime or llama.cpp can use a CUDA GPU, else ``cpu``."""
    if Path("/etc/nv_tegra_release").exists():
        return "jetson"
    if _ort_has_cuda() or _llama_has_gpu():
        return "cuda"
    return "cpu"


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
