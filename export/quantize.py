"""Quantize an f16/f32 LLaMA GGUF with llama.cpp (``llama_model_quantize``), atomically.

K-quants work on rows of 256 values; tensors whose rows are not a multiple of 256 (tiny test models)
are given a fallback type by llama.cpp itself, which is fine.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

from ..errors import ArtifactError, ConfigError, OutputError
from ..lazy import require
from ..vocab import quiet_llama_cpp

__all__ = ["quantize_gguf", "QTYPES"]

# name -> llama_cpp ftype constant
QTYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, n_threads: int = 0,
                  verbose: bool = False) -> Path:
    """Write ``src`` quantized to ``qtype`` (one of QTYPES) at ``dst``; n_threads 0 = all cores."""
    if qtype not in QTYPES:
        raise ConfigError(f"unknown quantization '{qtype}': use one of {sorted(QTYPES)}")
    lc = require("llama_cpp")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ArtifactError(f"GGUF to quantize {src} not found: write the f16 GGUF first")
    if not dst.parent.is_dir():
        raise OutputError(f"cannot write {dst}: folder {dst.parent} does not exist")
    quiet_llama_cpp(verbose)
    lc.llama_backend_init()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, QTYPES[qtype])
    params.nthread = n_threads
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".", suffix=".partial")
    os.close(fd)
    try:
        rc = lc.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise ArtifactError(f"llama.cpp could not quantize {src} to {qtype} (code {rc}); "
                                "run with verbose=True to see its log")
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst
