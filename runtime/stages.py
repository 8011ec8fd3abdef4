"""The two compute stages of a window: encoders (ONNX Runtime) and the LLM scorer (llama.cpp).

Both work on plain dicts, the form in which items travel over the stage links (runtime/link.py):
a window item has the arrays of :class:`~edge_emollama.runtime.windows.Window`; the encoder stage adds
``rows`` (the media block); the LLM stage adds ``probabilities``.

Absent input follows the original's zero rule: a branch whose input is missing (no face in the window,
no audio source or silence below the threshold, or switched to ``zeros`` in the config) contributes the
row of a zero 1024-d feature, i.e. its projector's bias, and the estimate says so in ``presence``. Without
any video, EVA sees an all-zero (mean-colour) image.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import preprocess
from ..prompt import label_pieces, prompt_parts
from ..spec import FEATURE_BRANCHES, ModelSpec, get_preset
from ..errors import ArtifactError
from .artifacts import Artifacts
from .encoders import OnnxEncoders
from .fusion import softmax


FRAME_CACHE = 1024   # MAE rows of recent frames (a 2 s window at 30 fps holds 60)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class EncoderStage:
    """window item -> media rows [media_rows, hidden] float32 (the documented order)."""

    def __init__(self, artifacts: Artifacts, precision: str = "fp32", providers: list | None = None,
                 threads: int = 0, zeros: tuple = (), parallel: bool = True):
        self.spec: ModelSpec = get_preset(artifacts.preset)
        self.zeros = tuple(zeros) + tuple(b for b in FEATURE_BRANCHES if artifacts.manifest["features"][b] == "zeros")
        branches = ("eva",) + tuple(b for b in FEATURE_BRANCHES if b not in self.zeros)
        self.encoders = OnnxEncoders(artifacts, precision, providers, threads, branches)
        self.zero_rows = np.load(artifacts.root / artifacts.manifest["features"]["zero_rows"])
        self._pool = ThreadPoolExecutor(len(branches), thread_name_prefix="encoder") if parallel else None
        self._frame_rows: OrderedDict = OrderedDict()   # (capture ns, face box) -> MAE row of that frame
        self.frames_reused = 0                           # MAE frames served from the cache (bench reports it)

    def _jobs(self, item: dict) -> dict:
        """branch -> a job returning (outputs, preprocess ms, run ms); branches absent here give their zero row."""
        spec, frame, audio = self.spec, item.get("frame"), item.get("audio")

        def eva_feed() -> dict:
            if frame is None:   # no video: an all-zero (mean-colour) image
                return {"pixels": np.zeros((1, 3, spec.eva.image_size, spec.eva.image_size), np.float32)}
            return {"pixels": preprocess.eva_pixels(frame, spec)}

        jobs = {"eva": lambda: self._timed("eva", eva_feed)}
        if item.get("face_present"):
            jobs["mae"] = lambda: self._mae_rows(item)
            jobs["videomae"] = lambda: self._timed("videomae", lambda: {
                "clip": preprocess.video_clip(item["videomae_frames"], spec)})
        if audio is not None and item.get("audio_present"):
            jobs["hubert"] = lambda: self._timed("hubert", lambda: {"pcm": preprocess.audio_pcm(audio, spec)})
        return {name: job for name, job in jobs.items() if name not in self.zeros}

    def __call__(self, item: dict) -> dict:
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
            timings[f"preprocess_{name}"], timings[f"encoder_{name}"] = prep_ms, run_ms
        patch_rows, cls_row = outputs["eva"][0]
        rows = [patch_rows]
        for i, name in enumerate(FEATURE_BRANCHES):
            rows.append(outputs[name][0][0] if name in outputs else self.zero_rows[i:i + 1])
        rows.append(cls_row)
        timings["encoders"] = _ms(start)
        return {"rows": np.concatenate(rows).astype(np.float32, copy=False), "encoder_timings": timings}

    def warmup(self) -> None:
        """One synthetic window through every branch (ONNX Runtime plans its first run lazily)."""
        spec, rng = self.spec, np.random.default_rng(0)
        crops = rng.integers(0, 255, (spec.videomae.frames, spec.mae.image_size, spec.mae.image_size, 3), np.uint8)
        self({"frame": rng.integers(0, 255, (96, 128, 3), np.uint8), "face_present": True, "face_crops": crops,
              "videomae_frames": crops, "audio": np.zeros(spec.hubert.sample_rate, np.float32),
              "audio_present": True})

    def _timed(self, name: str, prepare) -> tuple:
        start = time.perf_counter()
        feed = prepare()
        prepared = time.perf_counter()
        return self.encoders.run(name, feed), (prepared - start) * 1e3, _ms(prepared)

    def _mae_rows(self, item: dict) -> tuple:
        """The MAE row of a window: the mean of its frames' rows, each frame computed once (cached by capture
        time and face box) however many overlapping windows cover it."""
        start = time.perf_counter()
        crops = np.asarray(item["face_crops"])
        keys = _frame_keys(item, len(crops))
        new = [i for i, key in enumerate(keys) if key is None or key not in self._frame_rows]
        prepared = run_ms = 0.0
        fresh = {}
        if new:
            feed = {"faces": preprocess.face_batch(crops[new], self.spec)}
            prepared = time.perf_counter()
            fresh = dict(zip(new, self.encoders.run("mae", feed)[0]))
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


def _frame_keys(item: dict, count: int) -> list:
    """(capture time, face box) per crop; None where the window does not say (nothing is cached then)."""
    times, boxes = item.get("frame_times_ns"), item.get("face_boxes")
    if times is None or boxes is None or len(times) != count:
        return [None] * count
    return [(int(t), tuple(int(v) for v in box)) for t, box in zip(times, boxes)]


class LlmStage:
    """media rows -> label distribution (prompt order), the prompt prefix kept in llama.cpp's KV cache."""

    def __init__(self, artifacts: Artifacts, quant: str = "F16", threads: int | None = None, n_gpu_layers: int = 0,
                 layout: str | None = None, n_ctx: int = 0):
        from .llm import LlamaCppScorer

        self.spec = get_preset(artifacts.preset)
        self.layout = layout or artifacts.manifest["prompt"]["layout"]
        self.path = artifacts.path(format="gguf", quant=quant)
        self.n_ctx = n_ctx or min(self.spec.llama.context, 2048)
        self.scorer = LlamaCppScorer(self.path, n_ctx=self.n_ctx, n_threads=threads or None, n_gpu_layers=n_gpu_layers)
        self.tokenizer = self.scorer.tokenizer
        self.pieces = [list(p) for p in artifacts.manifest["label_pieces"]]
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

    def __call__(self, rows: np.ndarray, subtitle: str = "") -> dict:
        start = time.perf_counter()
        logprobs = self.scorer.label_logprobs(self.parts(subtitle), rows, self.pieces)
        return {"probabilities": softmax(logprobs), "llm_ms": _ms(start), "llm_reused": self.scorer.reused}

    def warmup(self) -> None:
        self(np.zeros((self.spec.media_rows, self.spec.llama.hidden), np.float32), "")

    def close(self) -> None:
        self.scorer.close()
