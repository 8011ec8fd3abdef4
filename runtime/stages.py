"""The two compute stages of a window: encoders (ONNX Runtime) and the LLM scorer (llama.cpp).

The encoder stage turns a :class:`~edge_emollama.runtime.items.WindowItem` into the media block; the LLM stage
turns the media block into the label distribution. What each branch feeds, and when it gives its zero row
instead (no face in the window, no audio above the threshold, or ``zeros`` in the manifest), is the branch's
declaration (edge_emollama/branches.py). Without any video, EVA sees an all-zero (mean-colour) image.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..branches import BRANCHES, EVA, FEATURES, assemble_media
from ..config import EncoderConfig, LlmConfig
from ..errors import ArtifactError
from ..manifest import Artifacts
from ..prompt import label_pieces, prompt_parts
from ..scoring import softmax
from .device import resolve
from .encoders import OnnxEncoders
from .items import synthetic_window
from .llm import LlamaCppScorer

log = logging.getLogger(__name__)
FRAME_CACHE = 1024   # MAE rows of recent frames (a 2 s window at 30 fps holds 60)
SHARED_CACHE = 32    # EVA / HuBERT outputs of recent windows, shared by the people of a window


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class EncoderStage:
    """window item -> (media rows [media_rows, hidden] float32 in the documented order, timings in ms)."""

    def __init__(self, artifacts: Artifacts, config: EncoderConfig = EncoderConfig(), parallel: bool = True):
        self.spec = artifacts.spec
        self.zeros = artifacts.manifest.features.zeros()
        names = tuple(name for name in BRANCHES if name not in self.zeros)
        self.encoders = OnnxEncoders(artifacts, resolve("precision", config.precision), config.providers,
                                     config.threads, names)
        self.zero_rows = artifacts.zero_rows()
        self._pool = ThreadPoolExecutor(len(names), thread_name_prefix="encoder") if parallel else None
        self._frame_rows: OrderedDict = OrderedDict()   # (source, capture ns, face box) -> MAE row of that frame
        self._shared: OrderedDict = OrderedDict()       # (branch, source, window index) -> EVA / HuBERT outputs
        self._shared_lock = threading.Lock()            # branches run on the pool's threads
        self.frames_reused = 0                           # MAE frames served from the cache (bench reports it)
        self.shared_reused = 0                           # EVA / HuBERT outputs reused for another person

    def _jobs(self, item) -> dict:
        """branch -> a job returning (outputs, preprocess ms, run ms), for the branches this window feeds."""
        jobs = {}
        for name, branch in BRANCHES.items():
            raw = branch.raw(item)
            if name in self.zeros or (raw is None and branch is not EVA):
                continue
            if branch.per_frame:
                jobs[name] = lambda b=branch, r=raw: self._per_frame(b, item, r)
            elif branch.per_person:
                jobs[name] = lambda b=branch, r=raw: self._timed(b, lambda: b.feed(r, self.spec))
            else:
                jobs[name] = lambda b=branch, r=raw: self._shared_run(b, item, r)
        return jobs

    def _shared_run(self, branch, item, raw) -> tuple:
        """EVA's and HuBERT's outputs for a window, computed once for all the people of that window."""
        key = (branch.name, item.stamp.source, item.index, item.t1_ns, _fingerprint(raw))
        with self._shared_lock:
            if key in self._shared:
                self.shared_reused += 1
                return self._shared[key][0], 0.0, 0.0
        result = self._timed(branch, lambda: branch.feed(raw, self.spec))
        with self._shared_lock:
            self._shared[key] = result
            while len(self._shared) > SHARED_CACHE:
                self._shared.popitem(last=False)
        return result

    def __call__(self, item) -> tuple:
        """Each branch preprocesses and runs as one job, so the jobs overlap on a thread pool (ONNX Runtime and
        the numpy/Pillow preprocessing release the GIL)."""
        start = time.perf_counter()
        jobs = self._jobs(item)
        if self._pool is not None:
            futures = {name: self._pool.submit(job) for name, job in jobs.items()}
            outputs = {name: future.result() for name, future in futures.items()}
        else:
            outputs = {name: job() for name, job in jobs.items()}
        timings = {}
        for name, (_, prep_ms, run_ms) in outputs.items():
            timings[f"preprocess_{name}_ms"], timings[f"encoder_{name}_ms"] = prep_ms, run_ms
        patch_rows, cls_row = outputs["eva"][0]
        rows = [outputs[b.name][0][0] if b.name in outputs else self.zero_rows[i:i + 1] for i, b in enumerate(FEATURES)]
        timings["encoders_ms"] = _ms(start)
        return assemble_media(patch_rows, rows, cls_row), timings

    def warmup(self) -> None:
        """One synthetic window through every branch (ONNX Runtime plans its first run lazily)."""
        self(synthetic_window(self.spec, np.random.default_rng(0)))

    def _timed(self, branch, prepare) -> tuple:
        start = time.perf_counter()
        feed = prepare()
        prepared = time.perf_counter()
        return self.encoders.run(branch.name, feed), (prepared - start) * 1e3, _ms(prepared)

    def _per_frame(self, branch, item, crops) -> tuple:
        """A per-frame branch's row (MAE): the mean of its frames' rows, each frame computed once (cached by
        capture time and face box) however many overlapping windows cover it."""
        start = time.perf_counter()
        crops = np.asarray(crops)
        keys = [key if key is None else (item.stamp.source, *key) for key in _frame_keys(item, len(crops))]
        new = [i for i, key in enumerate(keys) if key is None or key not in self._frame_rows]
        prepared = run_ms = 0.0
        fresh = {}
        if new:
            feed = branch.feed(crops[new], self.spec)
            prepared = time.perf_counter()
            fresh = dict(zip(new, self.encoders.run(branch.name, feed)[0]))
            run_ms = _ms(prepared)
            prepared = (prepared - start) * 1e3
        rows = np.stack([fresh[i] if i in fresh else self._frame_rows[key] for i, key in enumerate(keys)])
        for i, row in fresh.items():
            if keys[i] is not None:
                self._frame_rows[keys[i]] = row
        while len(self._frame_rows) > FRAME_CACHE:
            self._frame_rows.popitem(last=False)
        self.frames_reused += len(keys) - len(new)
        return [rows.mean(axis=0, keepdims=True)], prepared, run_ms

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _fingerprint(raw) -> tuple | None:
    """A cheap summary of a window's frame or audio (its shape and every 997th value): the people of one window
    carry equal arrays (copied across links), and a different window with the same stamp differs here."""
    if raw is None:
        return None
    raw = np.asarray(raw)
    return raw.shape, hash(np.ascontiguousarray(raw.reshape(-1)[::997]).tobytes())


def _frame_keys(item, count: int) -> list:
    """(capture time, face box) per crop; None where the window does not say (nothing is cached then)."""
    times, boxes = item.frame_times_ns, item.face_boxes
    if times is None or boxes is None or len(times) != count:
        return [None] * count
    return [(int(t), tuple(int(v) for v in box)) for t, box in zip(times, boxes)]


class LlmStage:
    """media rows -> label distribution (prompt order), the prompt prefix kept in llama.cpp's KV cache.

    The GGUF (``quant``), the prompt layout and the label pieces are the manifest's; ``quant`` "auto" is the
    device class's default among the exported ones (runtime/device.py)."""

    def __init__(self, artifacts: Artifacts, config: LlmConfig = LlmConfig()):
        self.batch = max(1, config.batch_windows)   # windows :meth:`score_batch` scores in one llama_decode
        manifest = artifacts.manifest
        self.spec, self.layout = artifacts.spec, manifest.prompt.layout
        self.untrained = manifest.source.get("weights") == "seeded random"   # its words mean nothing
        self.quant = resolve("quant", config.quant, manifest.exported("quant", format="gguf"))
        self.path = artifacts.path(format="gguf", quant=self.quant)
        self.n_ctx = min(self.spec.llama.context, config.n_ctx)
        n_gpu_layers = resolve("n_gpu_layers", "auto" if config.n_gpu_layers is None else config.n_gpu_layers)
        self.scorer = LlamaCppScorer(self.path, n_ctx=self.n_ctx, n_threads=config.threads or None,
                                     n_gpu_layers=n_gpu_layers, windows=self.batch)
        self.tokenizer = self.scorer.tokenizer
        self.pieces = [list(p) for p in manifest.label_pieces]
        if self.pieces != label_pieces(self.tokenizer):
            self.scorer.close()
            raise ArtifactError(f"{self.path}: label pieces differ from the manifest's; re-export the folder")
        self._parts_cache: dict = {}

    def parts(self, subtitle: str, task: str = "emotion") -> list:
        key = (subtitle, task)
        if key not in self._parts_cache:
            if len(self._parts_cache) > 64:
                self._parts_cache.clear()
            self._parts_cache[key] = prompt_parts(self.tokenizer, self.spec, subtitle, self.layout, task)
        return self._parts_cache[key]

    @property
    def decode_calls(self) -> int:
        """llama_decode calls the last window took (1 when its prompt and label branches fit n_batch)."""
        return self.scorer.decode_calls

    def __call__(self, rows: np.ndarray, subtitle: str = "") -> tuple:
        """(label distribution, llm ms); ``decode_calls`` then says how many llama_decode calls it took."""
        start = time.perf_counter()
        return self._distribution(self.scorer.label_logprobs(self.parts(subtitle), rows, self.pieces)), _ms(start)

    def score_batch(self, blocks: list, subtitle: str = "") -> tuple:
        """([label distribution per media block], llm ms): windows with the same subtitle (the people of a window,
        other streams' windows), in one llama_decode when they fit (LlamaCppScorer.label_logprobs_batch)."""
        start = time.perf_counter()
        scores = self.scorer.label_logprobs_batch(self.parts(subtitle), blocks, self.pieces)
        return [self._distribution(logprobs) for logprobs in scores], _ms(start)

    def _distribution(self, logprobs: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(logprobs)):
            raise ArtifactError(f"{self.path} gave non-finite label scores {logprobs.tolist()}: the GGUF is damaged "
                                "or was written wrongly; re-export the folder")
        return softmax(logprobs)

    def warmup(self) -> None:
        self(np.zeros((self.spec.media_rows, self.spec.llama.hidden), np.float32), "")

    def close(self) -> None:
        self.scorer.close()
