"""The four encoder branches through ONNX Runtime (sessions created once per branch)."""
from __future__ import annotations

import functools
import logging

import numpy as np

from ..branches import BRANCHES
from ..errors import ArtifactError
from ..lazy import require
from ..manifest import Artifacts

log = logging.getLogger(__name__)


def choose_providers(wanted: list) -> list:
    """The configured providers that this onnxruntime build has and whose libraries load, in the configured
    order. onnxruntime-gpu lists TensorRT even where TensorRT is not installed; sessions would then fail."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available and _libraries_load(p)] or ["CPUExecutionProvider"]
    skipped = [p for p in wanted if p not in chosen]
    if skipped:
        log.info("onnxruntime providers not usable here: %s", ", ".join(skipped))
    log.info("onnxruntime providers in use: %s", ", ".join(chosen))
    return chosen


@functools.lru_cache(maxsize=None)
def _libraries_load(provider: str) -> bool:
    """TensorRT: libnvinfer loads (pip install tensorrt, or JetPack's). CUDA: onnxruntime's preload of the CUDA
    and cuDNN libraries of the nvidia-* wheels (a no-op where they come from the system) succeeds."""
    import ctypes

    if provider == "TensorrtExecutionProvider":
        for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                continue
        return False
    if provider == "CUDAExecutionProvider":
        ort = require("onnxruntime")
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
        except Exception as exc:   # noqa: BLE001 - the session itself reports a real failure
            log.info("onnxruntime.preload_dlls: %s", exc)
    return True


class OnnxEncoders:
    """``run(branch, inputs) -> outputs`` for each exported branch of one precision."""

    def __init__(self, artifacts: Artifacts, precision: str = "fp32", providers: list | None = None,
                 threads: int = 0, branches: tuple = tuple(BRANCHES)):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # idle ORT workers spin for a while after each run by default, stealing the cores that the LLM
        # stage (llama.cpp) needs next: measured 2-3 ms -> 16 ms per LLM call on 2 cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = choose_providers(providers or ["CPUExecutionProvider"])
        self.precision = precision
        self.sessions, self.session_providers = {}, {}
        for branch in branches:
            path = artifacts.path(format="onnx", branch=branch, precision=precision)
            try:
                self.sessions[branch] = ort.InferenceSession(str(path), options, providers=self.providers)
            except Exception as exc:
                raise ArtifactError(f"ONNX Runtime cannot load {path} ({exc}); re-export the folder") from exc
            self.session_providers[branch] = used = self.sessions[branch].get_providers()[0]
            if used != self.providers[0]:   # onnxruntime retried on the CPU after the GPU provider failed
                log.warning("encoder %s (%s) runs on %s: %s failed on it (onnxruntime's message above). "
                            "Try runtime.encoders.precision: fp32, or check the CUDA/cuDNN libraries", branch, precision,
                            used, self.providers[0])

    def run(self, branch: str, inputs: dict) -> list:
        session = self.sessions[branch]
        feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}
        try:
            return session.run(None, feed)
        except Exception as exc:
            if self.session_providers[branch] == "CPUExecutionProvider":
                raise
            raise ArtifactError(f"encoder {branch} ({self.precision}) failed on {self.session_providers[branch]}: "
                                f"{str(exc)[:300]}. Set runtime.encoders.precision: fp32, or runtime.encoders.providers: "
                                "[CPUExecutionProvider] to run it on the CPU") from exc
