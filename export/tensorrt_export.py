"""ONNX -> TensorRT engines, when TensorRT is importable (it is not on CPU-only machines).

fp16 is requested the way the installed TensorRT needs it: TensorRT 10 takes the fp32 graph with
``BuilderFlag.FP16``; TensorRT 11 removed that flag (setting nothing silently builds fp32), so there the
fp16 ONNX graph is built as a strongly typed network. Dynamic axes get one optimization profile
(min / opt / max). A timing cache beside the engines speeds up rebuilds. Metadata is stored in the
engine file as ``uint32 length + JSON + plan`` (the ultralytics convention).

Not verified on this project's CI machines (no GPU, no TensorRT): see docs/verification.md.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from ..branches import BRANCHES
from ..errors import OutputError
from ..lazy import require
from ..spec import ModelSpec

log = logging.getLogger(__name__)


def tensorrt_major() -> int:
    trt = require("tensorrt")
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_fp32: Path, onnx_fp16: Path, engine: Path, spec: ModelSpec, branch: str,
                 metadata: dict, timing_cache: Path, workspace_gib: float = 4.0) -> Path:
    trt = require("tensorrt")
    major = tensorrt_major()
    strongly_typed = major >= 11
    source = onnx_fp16 if strongly_typed else onnx_fp32
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OutputError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shapes = BRANCHES[branch].trt_profile(spec)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise OutputError(f"TensorRT failed to build an engine from {source} (see the TensorRT log above)")
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    meta = {**metadata, "branch": branch, "tensorrt": trt.__version__, "precision": "fp16",
            "fp16_mode": "strongly-typed fp16 graph" if strongly_typed else "BuilderFlag.FP16",
            "profiles": {k: [list(s) for s in v] for k, v in shapes.items()}}
    write_engine(engine, bytes(memoryview(plan)), meta)
    return engine


def write_engine(path: Path, plan: bytes, metadata: dict) -> None:
    blob = json.dumps(metadata).encode()
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<I", len(blob)) + blob + plan)
    os.replace(tmp, path)

