"""The four encoder branches through ONNX Runtime (sessions created once per branch).

Each branch's session runs through one runner of runtime/binding.py: plain ``session.run``, an IO binding
(``runtime.encoders.io_binding``; by default on with a CUDA GPU), or CUDA graphs (``runtime.encoders.cuda_graphs``,
off by default, CUDA provider only). All of them take and return numpy arrays."""
from __future__ import annotations

import functools
import logging

import numpy as np

from ..branches import BRANCHES
from ..errors import ArtifactError, ConfigError
from ..lazy import require
from ..manifest import Artifacts
from .binding import GPU_PROVIDERS, BoundRunner, GraphRunner, PlainRunner
from .device import resolve

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
    """``run(branch, inputs) -> outputs`` for each exported branch of one precision.

    ``io_binding``: True, False or None (per device class, runtime/device.py; a session that runs on the CPU
    then goes without). ``cuda_graphs``: CUDA graphs through the CUDA provider (runtime/binding.py), refused
    where that provider is not the one in use."""

    def __init__(self, artifacts: Artifacts, precision: str = "fp32", providers: list | None = None,
                 threads: int = 0, branches: tuple = tuple(BRANCHES), io_binding: bool | None = None,
                 cuda_graphs: bool = False):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # idle ORT workers spin for a while after each run by default, stealing the cores that the LLM
        # stage (llama.cpp) needs next: measured 2-3 ms -> 16 ms per LLM call on 2 cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = choose_providers(providers or ["CPUExecutionProvider"])
        if cuda_graphs:
            if io_binding is False:
                raise ConfigError("runtime.encoders.cuda_graphs: true runs through an IO binding, but io_binding is "
                                  "false: set io_binding: null (or true), or cuda_graphs: false")
            _require_cuda_provider(self.providers)
        self.precision, self.cuda_graphs = precision, cuda_graphs
        self.io_binding = cuda_graphs or resolve("io_binding", "auto" if io_binding is None else io_binding)
        self.sessions, self.session_providers, self.runners = {}, {}, {}
        for branch in branches:
            self.sessions[branch] = session = self._session(ort, artifacts, branch, options)
            self.session_providers[branch] = used = session.get_providers()[0]
            if used != self.providers[0]:   # onnxruntime retried on the CPU after the GPU provider failed
                log.warning("encoder %s (%s) runs on %s: %s failed on it (onnxruntime's message above). "
                            "Try runtime.encoders.precision: fp32, or check the CUDA/cuDNN libraries", branch, precision,
                            used, self.providers[0])
            self.runners[branch] = self._runner(branch, session, explicit=io_binding is not None)

    def _session(self, ort, artifacts: Artifacts, branch: str, options):
        path = artifacts.path(format="onnx", branch=branch, precision=self.precision)
        providers = [(p, {"enable_cuda_graph": "1"}) if self.cuda_graphs and p == "CUDAExecutionProvider" else p
                     for p in self.providers]
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ArtifactError(f"ONNX Runtime cannot load {path} ({exc}); re-export the folder") from exc

    def _runner(self, branch: str, session, explicit: bool):
        """How this branch's session runs: CUDA graphs, an IO binding, or plain ``session.run``."""
        if self.cuda_graphs:
            if self.session_providers[branch] != "CUDAExecutionProvider":
                raise ArtifactError(f"runtime.encoders.cuda_graphs: encoder {branch} ({self.precision}) fell back "
                                    f"to {self.session_providers[branch]} with CUDA graphs on (onnxruntime's message "
                                    "above: a graph needs every node on the CUDA provider). Set "
                                    "runtime.encoders.cuda_graphs: false")
            return GraphRunner(session, branch)
        on_gpu = self.session_providers[branch] in GPU_PROVIDERS
        if self.io_binding and (explicit or on_gpu):
            return BoundRunner(session)
        return PlainRunner(session)

    def run(self, branch: str, inputs: dict) -> list:
        session = self.sessions[branch]
        feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}
        try:
            return self.runners[branch].run(feed)
        except Exception as exc:
            if self.session_providers[branch] == "CPUExecutionProvider":
                raise
            graphs = "runtime.encoders.cuda_graphs: false, " if self.cuda_graphs else ""
            raise ArtifactError(f"encoder {branch} ({self.precision}) failed on {self.session_providers[branch]}: "
                                f"{str(exc)[:300]}. Set {graphs}runtime.encoders.precision: fp32, or "
                                "runtime.encoders.providers: [CPUExecutionProvider] to run it on the CPU") from exc


def _require_cuda_provider(providers: list) -> None:
    """CUDA graphs are the CUDA provider's: refused where another provider comes first."""
    if providers[0] != "CUDAExecutionProvider":
        raise ConfigError(f"runtime.encoders.cuda_graphs: true needs the CUDA provider, but the providers in use "
                          f"here are {providers} (onnxruntime-gpu and a CUDA GPU give CUDAExecutionProvider; "
                          "TensorRT, if listed first, must be left out). Set runtime.encoders.cuda_graphs: false, "
                          "or runtime.encoders.providers: [CUDAExecutionProvider, CPUExecutionProvider]")
