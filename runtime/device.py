"""Per-device defaults, backed by measurements (BENCHMARKS.md), overridable in config.yaml.

| device class | GGUF | ONNX precision | llama.cpp layers on GPU | why |
|---|---|---|---|---|
| ``cuda`` (desktop/server GPU) | F16 | fp16 | all | F16 prefilled ~2x faster than Q4_K_M on a large GPU (18 vs 38 ms for 330 positions, spec section 6) |
| ``jetson`` (Orin, unified memory) | Q4_K_M | fp16 | all | memory and decode bandwidth bound: 4-bit weights cut both |
| ``cpu`` | F16 | fp32 | 0 | measured on a 2-core x86 CPU, mid preset: LLM stage F16 86 ms, Q4_K_M 88 ms, Q8_0 108 ms (BENCHMARKS.md); fp16 ONNX has few fast CPU kernels |
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
