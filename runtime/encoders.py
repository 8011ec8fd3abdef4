"""The four encoder branches through ONNX Runtime (sessions created once per branch)."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ArtifactError
from ..lazy import require
from .artifacts import Artifacts

log = logging.getLogger(__name__)
BRANCHES = ("eva", "mae", "videomae", "hubert")


def choose_providers(wanted: list) -> list:
    """The configured providers that this onnxruntime build has, in the configured order."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    skipped = [p for p in wanted if p not in available]
    if skipped:
        log.info("onnxruntime providers not available here: %s", ", ".join(skipped))
    log.info("onnxruntime providers in use: %s", ", ".join(chosen))
    return chosen


class OnnxEncoders:
    """``run(branch, inputs) -> outputs`` for each exported branch of one precision."""

    def __init__(self, artifacts: Artifacts, precision: str = "fp32", providers: list | None = None,
                 threads: int = 0, branches: tuple = BRANCHES):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # idle ORT workers spin for a while after each run by default, stealing the cores that the LLM
        # stage (llama.cpp) needs next: measured 2-3 ms -> 16 ms per LLM call on 2 cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = choose_providers(providers or ["CPUExecutionProvider"])
        self.sessions = {}
        for branch in branches:
            path = artifacts.path(format="onnx", branch=branch, precision=precision)
            try:
                self.sessions[branch] = ort.InferenceSession(str(path), options, providers=self.providers)
            except Exception as exc:
                raise ArtifactError(f"ONNX Runtime cannot load {path} ({exc}); re-export the folder") from exc

    def run(self, branch: str, inputs: dict) -> list:
        session = self.sessions[branch]
        feed = {i.name: np.ascontiguousarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}
        return session.run(None, feed)
