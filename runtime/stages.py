"""The two compute stages of a window: encoders (ONNX Runtime) and the LLM scorer (llama.cpp).

The encoder stage turns a :class:`~edge_emollama.runtime.items.WindowItem` into the media block; the LLM stage
turns the media block into the label distribution. What each branch feeds, and when it gives its zero row
instead (no face in the window, no audio above the threshold, or ``zeros`` in the manifest), is the branch's
declaration (edge_emollama/branches.py). Without any video, EVA sees an all-zero (mean-colour) image.
"""
from __future__ import annotations

import functools
import logging
import os
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
    """window items -> (media rows [media_rows, hidden] float32 in the documented order, timings in ms) each.

    Windows encoded together (:meth:`encode`: the people of a window, other streams' windows) share each
    branch's run: the batched branches (EVA, VideoMAE, HuBERT) stack their feeds along the batch axis, MAE
    runs on all their new frames at once. EVA's and HuBERT's outputs are computed once per window for all of
    its people (cached by window), MAE's once per frame for all the windows that cover it."""

    def __init__(self, artifacts: Artifacts, config: EncoderConfig = EncoderConfig(), parallel: bool = True):
        self.spec = artifacts.spec
        self.batch = max(1, config.batch_windows)   # windows the pipeline hands :meth:`encode` at once
        self.zeros = artifacts.manifest.features.zeros()
        names = tuple(name for name in BRANCHES if name not in self.zeros)
        self.encoders = OnnxEncoders(artifacts, resolve("precision", config.precision), config.providers,
                                     config.threads or _threads_per_branch(len(names) if parallel else 1), names,
                                     io_binding=config.io_binding, cuda_graphs=config.cuda_graphs)
        self.zero_rows = artifacts.zero_rows()
        self._pool = ThreadPoolExecutor(len(names), thread_name_prefix="encoder") if parallel else None
        self._frame_rows: OrderedDict = OrderedDict()   # (source, capture ns, face box) -> MAE row of that frame
        # per shared branch (EVA, HuBERT; each touched by its own job only): (source, window, content) -> outputs
        self._shared = {name: OrderedDict() for name in names if not BRANCHES[name].per_person}
        self.frames_reused = 0                           # MAE frames served from the cache (bench reports it)
        self.shared_reused = 0                           # EVA / HuBERT outputs reused for another person
        self._counting = threading.Lock()                # the branch jobs count on the pool's threads

    def __call__(self, item) -> tuple:
        return self.encode([item])[0]

    def encode(self, items: list) -> list:
        """[(media rows, timings)] for ``items``, each branch one job for all of them, the jobs overlapping on a
        thread pool (ONNX Runtime and the numpy/Pillow preprocessing release the GIL). A branch's timings are
        its whole run for the items together."""
        start = time.perf_counter()
        jobs = {name: functools.partial(self._branch, branch, items) for name, branch in BRANCHES.items()
                if name not in self.zeros}
        if self._pool is not None:
            futures = {name: self._pool.submit(job) for name, job in jobs.items()}
            done = {name: future.result() for name, future in futures.items()}
        else:
            done = {name: job() for name, job in jobs.items()}
        total = _ms(start)
        return [self._media(index, done, total) for index in range(len(items))]

    def _media(self, index: int, done: dict, total_ms: float) -> tuple:
        """One item's media block and timings from the branches' results (its zero rows where it has none)."""
        timings = {}
        for name, (outputs, prep_ms, run_ms) in done.items():
            if index in outputs:
                timings[f"preprocess_{name}_ms"], timings[f"encoder_{name}_ms"] = prep_ms, run_ms
        patch_rows, cls_row = done["eva"][0][index]
        rows = [done[b.name][0][index][0] if b.name in done and index in done[b.name][0] else self.zero_rows[i:i + 1]
                for i, b in enumerate(FEATURES)]
        timings["encoders_ms"] = total_ms
        return assemble_media(patch_rows, rows, cls_row), timings

    def _branch(self, branch, items: list) -> tuple:
        """({item index: the branch's outputs for it}, preprocess ms, run ms), for the items it has input for
        (EVA: every item; without video it sees a mean-colour image)."""
        raws = {i: raw for i, raw in enumerate(branch.raw(item) for item in items) if raw is not None or branch is EVA}
        if branch.per_frame:
            return self._per_frame(branch, items, raws)
        if branch.per_person:
            return self._batched(branch, raws)
        return self._shared_run(branch, items, raws)

    def _batched(self, branch, raws: dict) -> tuple:
        """{key: raw} -> ({key: outputs}, preprocess ms, run ms): the feeds stacked along the batch axis, one run
        per group of equal shapes (HuBERT's audio lengths may differ)."""
        start = time.perf_counter()
        feeds = {key: branch.feed(raw, self.spec) for key, raw in raws.items()}
        groups: dict = {}
        for key, feed in feeds.items():
            groups.setdefault(tuple(v.shape for v in feed.values()), []).append(key)
        prepared = time.perf_counter()
        outputs = {}
        for keys in groups.values():
            stacked = feeds[keys[0]] if len(keys) == 1 else \
                {name: np.concatenate([feeds[key][name] for key in keys]) for name in branch.input_names}
            outputs.update(zip(keys, branch.split(self.encoders.run(branch.name, stacked), len(keys))))
        return outputs, (prepared - start) * 1e3, _ms(prepared)

    def _shared_run(self, branch, items: list, raws: dict) -> tuple:
        """EVA's and HuBERT's outputs, computed once per window for all the people of that window."""
        cache = self._shared[branch.name]
        keys = {i: (items[i].stamp.source, items[i].index, items[i].t1_ns, _fingerprint(raw)) for i, raw in raws.items()}
        missing = {key: raws[i] for i, key in keys.items() if key not in cache}
        fresh, prep_ms, run_ms = self._batched(branch, missing)
        with self._counting:
            self.shared_reused += len(keys) - len(fresh)
        outputs = {i: fresh[key] if key in fresh else cache[key] for i, key in keys.items()}
        cache.update(fresh)
        while len(cache) > SHARED_CACHE:
            cache.popitem(last=False)
        return outputs, prep_ms, run_ms

    def warmup(self) -> None:
        """One synthetic window through every branch (ONNX Runtime plans its first run lazily)."""
        self(synthetic_window(self.spec, np.random.default_rng(0)))

    def _per_frame(self, branch, items: list, raws: dict) -> tuple:
        """A per-frame branch's rows (MAE): each window's row is the mean of its frames' rows, each frame computed
        once (cached by source, capture time and face box) for all the windows that cover it; the new frames of
        all ``items`` in one run."""
        start = time.perf_counter()
        crops = {i: np.asarray(raw) for i, raw in raws.items()}
        keys = {i: [k if k is None else (items[i].stamp.source, *k) for k in _frame_keys(items[i], len(c))]
                for i, c in crops.items()}
        new, pending = [], set()
        for i, frame_keys in keys.items():
            for j, key in enumerate(frame_keys):
                if key is None or (key not in self._frame_rows and key not in pending):
                    new.append((i, j))
                    pending.add(key)
        prepared = run_ms = 0.0
        fresh = {}
        if new:
            feed = branch.feed([crops[i][j] for i, j in new], self.spec)
            prepared = time.perf_counter()
            fresh = dict(zip(new, self.encoders.run(branch.name, feed)[0]))
            run_ms = _ms(prepared)
            prepared = (prepared - start) * 1e3
        self._frame_rows.update((keys[i][j], row) for (i, j), row in fresh.items() if keys[i][j] is not None)
        outputs = {i: [np.stack([fresh[(i, j)] if (i, j) in fresh else self._frame_rows[key]
                                 for j, key in enumerate(frame_keys)]).mean(axis=0, keepdims=True)]
                   for i, frame_keys in keys.items()}
        self.frames_reused += sum(len(k) for k in keys.values()) - len(fresh)
        while len(self._frame_rows) > FRAME_CACHE:
            self._frame_rows.popitem(last=False)
        return outputs, prepared, run_ms

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _threads_per_branch(overlapping: int) -> int:
    """ONNX Runtime threads per branch session when ``runtime.encoders.threads`` is 0: the cores shared by the
    branches that run at once (at least 1). Each session taking every core oversubscribed them: on 2 cores, mid
    preset, 4 overlapping branches took 101-103 ms p50 with 2 threads each and 87-88 ms with 1 (BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // overlapping)


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
