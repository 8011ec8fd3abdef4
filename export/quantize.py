"""Quantize an f16/f32 LLaMA GGUF with llama.cpp (``llama_model_quantize``), atomically.

K-quants work on rows of 256 values; tensors whose rows are not a multiple of 256 (tiny test models)
are given a fallback type by llama.cpp itself, which is fine.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
import threading
from pathlib import Path

from ..errors import ArtifactError, ConfigError, OutputError
from ..lazy import require
from ..progress import Progress
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
# bits per weight of each type (llama.cpp's figures): the progress bar's estimate of the file's size
BITS = {"Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.7, "Q4_K_M": 4.9, "Q4_0": 4.5, "Q4_1": 5.0}
POLL_S = 0.5   # how often the growing output file is looked at for the progress bar


def no_bar(total, label: str, unit: str = "it") -> Progress:
    return Progress(total, label, unit, enabled=False)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, n_threads: int = 0,
                  verbose: bool = False, bar=no_bar) -> Path:
    """Write ``src`` quantized to ``qtype`` (one of QTYPES) at ``dst``; n_threads 0 = all cores.

    ``bar(total, label, unit)`` gives a progress bar over the bytes written (llama.cpp writes tensor after
    tensor; the total is an estimate from the F16 file's size)."""
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
        with bar(int(src.stat().st_size * BITS[qtype] / 16), "quantizing", "B") as written, \
                _Watch(Path(tmp), written):
            rc = lc.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise ArtifactError(f"llama.cpp could not quantize {src} to {qtype} (code {rc}); "
                                "run with verbose=True to see its log")
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dst


class _Watch:
    """While llama.cpp quantizes (one C call), a thread reports how far the output file has grown."""

    def __init__(self, path: Path, bar: Progress):
        self.path, self.bar, self.seen = path, bar, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quantize-progress", daemon=True)

    def __enter__(self):
        if self.bar.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._poll()
        return False

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:   # not there yet, or already renamed
            return
        if size > self.seen:
            self.bar.update(size - self.seen)
            self.seen = size
