"""Capture: camera, microphone and video files, stamped at capture on the monotonic clock.

Each source fills bounded, thread-safe rings from its own thread (or PortAudio's callback):

- :class:`FrameRing` holds :class:`Frame` items (RGB uint8, capture time in monotonic ns). Live sources
  keep the newest frames (the oldest fall out); file sources in as-fast-as-possible mode block instead, so
  that no frame is lost while the consumer is behind.
- :class:`AudioRing` holds float32 mono PCM at the model's rate (16 kHz) as chunks on the same timeline. Consecutive chunks
  are placed by sample counting (no jitter from callback scheduling); a chunk whose stamp disagrees with the
  count by more than ``continuity_tolerance_s`` (an overrun, a gap, clock drift) re-anchors the count.
  Microphone callbacks arrive late by a varying delay (PulseAudio delivers in bursts); their stamps go through
  a minimum filter (the least delayed callback of the last seconds) before they reach the ring.

Time ranges are half-open, ``t0 <= t < t1``, so that ``read(t0, t1)`` returns exactly
``round((t1 - t0) * rate / 1e9)`` samples and adjacent ranges never share an item.

A source whose thread fails stores the exception and stops; :meth:`Source.check` re-raises it (bad input
as the InputError it is; anything unexpected as itself, with its traceback, after logging which source
failed), and :attr:`Source.finished` turns true. A source may be absent:
a window stage takes ``frames=None`` or ``audio=None`` for audio-only or video-only operation.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import CameraConfig, FileConfig, MicrophoneConfig
from ..errors import EdgeEmollamaError, InputError
from ..lazy import require
from .clock import NS_PER_S, now_ns

__all__ = ["Frame", "FrameRing", "AudioRing", "Source", "CameraSource", "MicrophoneSource", "VideoFileSource"]

log = logging.getLogger(__name__)

_WAIT_S = 0.05  # longest single wait of any loop here, so that stop() is honoured quickly


@dataclass(frozen=True)
class Frame:
    """One video frame: RGB uint8 ``[H, W, 3]`` captured at ``t_ns`` (monotonic); ``index`` counts from 0."""
    t_ns: int
    image: np.ndarray
    index: int


class _Ring:
    """Lock, wake-ups and listeners shared by both rings."""

    def __init__(self, block_when_full: bool):
        self.block_when_full = block_when_full
        self._cond = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self.dropped = 0  # items dropped because the ring was full (live mode)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (without the ring's lock) after every write and on close."""
        self._listeners.append(callback)

    def close(self) -> None:
        """Wake and refuse blocked writers (the source is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._notify()

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    def _wait_for_room(self, full: Callable[[], bool]) -> bool:
        """Called with the lock held: False when closed while waiting."""
        while self.block_when_full and full() and not self._closed:
            self._cond.wait(_WAIT_S)
        return not self._closed


class FrameRing(_Ring):
    """At most ``capacity`` frames in capture order."""

    def __init__(self, capacity: int, *, block_when_full: bool = False):
        super().__init__(block_when_full)
        if capacity < 2:
            raise ValueError(f"FrameRing capacity must be >= 2, got {capacity}")
        self.capacity = int(capacity)
        self._frames: deque[Frame] = deque()
        self.out_of_order = 0  # frames refused because their time did not increase

    def put(self, frame: Frame) -> bool:
        """Add a frame; False when the ring was closed or the frame's time does not increase."""
        with self._cond:
            if not self._wait_for_room(lambda: len(self._frames) >= self.capacity):
                return False
            if self._frames and frame.t_ns <= self._frames[-1].t_ns:
                self.out_of_order += 1
                return False
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
        self._notify()
        return True

    def between(self, t0_ns: int, t1_ns: int) -> list[Frame]:
        """Frames with ``t0 <= t < t1``, oldest first."""
        with self._cond:
            return [f for f in self._frames if t0_ns <= f.t_ns < t1_ns]

    def latest(self) -> Frame | None:
        with self._cond:
            return self._frames[-1] if self._frames else None

    def first_t_ns(self) -> int | None:
        with self._cond:
            return self._frames[0].t_ns if self._frames else None

    def last_t_ns(self) -> int | None:
        with self._cond:
            return self._frames[-1].t_ns if self._frames else None

    def discard_before(self, t_ns: int) -> None:
        """Forget frames older than ``t_ns`` (frees room for a blocked writer)."""
        with self._cond:
            while self._frames and self._frames[0].t_ns < t_ns:
                self._frames.popleft()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)


class AudioRing(_Ring):
    """Mono float32 PCM on the monotonic timeline, at most ``capacity_s`` seconds."""

    def __init__(self, sample_rate: int, capacity_s: float = 30.0, *,
                 continuity_tolerance_s: float = 0.04, block_when_full: bool = False):
        super().__init__(block_when_full)
        self.sample_rate = int(sample_rate)
        self.capacity = int(capacity_s * sample_rate)
        self.tolerance_ns = int(continuity_tolerance_s * NS_PER_S)
        self._chunks: deque[tuple[int, np.ndarray]] = deque()
        self._size = 0
        self._anchor_ns: int | None = None  # time of sample 0 of the current continuous run
        self._count = 0                     # samples written since the anchor
        self.resyncs = 0                    # times a stamp disagreed with the sample count

    def _time_of(self, count: int) -> int:
        return self._anchor_ns + count * NS_PER_S // self.sample_rate

    def write(self, samples: np.ndarray, t_start_ns: int) -> int | None:
        """Append samples whose first one was captured at ``t_start_ns``; returns the time used (None: closed)."""
        x = _as_float_pcm(samples)
        with self._cond:
            if not self._wait_for_room(lambda: self._size + x.size > self.capacity and self._size > 0):
                return None
            if self._anchor_ns is None or abs(t_start_ns - self._time_of(self._count)) > self.tolerance_ns:
                self.resyncs += self._anchor_ns is not None
                self._anchor_ns, self._count = int(t_start_ns), 0
            t = self._time_of(self._count)
            self._count += x.size
            self._chunks.append((t, x))
            self._size += x.size
            while self._size > self.capacity and len(self._chunks) > 1:
                self._size -= self._chunks.popleft()[1].size
                self.dropped += 1
        self._notify()
        return t

    def read(self, t0_ns: int, t1_ns: int) -> tuple[np.ndarray, float]:
        """``(samples, coverage)``: exactly ``round((t1 - t0) * rate / 1e9)`` samples of ``[t0, t1)``, zeros
        where nothing was captured, and the fraction of them that was captured."""
        n = int(round((t1_ns - t0_ns) * self.sample_rate / NS_PER_S))
        out = np.zeros(n, np.float32)
        have = np.zeros(n, bool)
        with self._cond:
            chunks = list(self._chunks)
        for t, x in chunks:
            offset = int(round((t - t0_ns) * self.sample_rate / NS_PER_S))
            lo, hi = max(0, offset), min(n, offset + x.size)
            if lo < hi:
                out[lo:hi] = x[lo - offset:hi - offset]
                have[lo:hi] = True
        return out, (float(have.mean()) if n else 0.0)

    def end_ns(self) -> int | None:
        """Capture time just after the newest sample."""
        with self._cond:
            return None if self._anchor_ns is None else self._time_of(self._count)

    def start_ns(self) -> int | None:
        with self._cond:
            return self._chunks[0][0] if self._chunks else None

    def discard_before(self, t_ns: int) -> None:
        """Forget chunks that end before ``t_ns``."""
        step = NS_PER_S / self.sample_rate
        with self._cond:
            while self._chunks and self._chunks[0][0] + self._chunks[0][1].size * step <= t_ns:
                self._size -= self._chunks.popleft()[1].size
            self._cond.notify_all()


def _as_float_pcm(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InputError(f"audio chunks must be mono [S], got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    return x.astype(np.float32, copy=False)


class _SampleClock:
    """Capture times of a sample stream from callback stamps, which arrive late by a varying delay.

    Each stamp gives ``offset = stamp_end - samples_so_far / rate``; the least delayed stamp of the last
    ``memory_s`` seconds is the best estimate, so a chunk starts at ``min(offset) + samples_before / rate``.
    Bursty delivery then leaves the timeline contiguous; lost samples or clock drift move it once the old
    minimum has aged out.
    """

    def __init__(self, rate: int, memory_s: float = 5.0):
        self.rate = rate
        self.memory_ns = int(memory_s * NS_PER_S)
        self._count = 0
        self._offsets: deque[tuple[int, int]] = deque()

    def place(self, n: int, stamp_end_ns: int) -> int:
        """The capture time of the first of ``n`` samples whose last one was stamped at ``stamp_end_ns``."""
        self._offsets.append((stamp_end_ns, stamp_end_ns - (self._count + n) * NS_PER_S // self.rate))
        while self._offsets[0][0] < stamp_end_ns - self.memory_ns:
            self._offsets.popleft()
        t_start = min(o for _, o in self._offsets) + self._count * NS_PER_S // self.rate
        self._count += n
        return t_start


def _sleep_until(t_ns: int, stop: threading.Event) -> bool:
    """Wait until the monotonic clock reaches ``t_ns``; False if ``stop`` was set first."""
    while not stop.is_set():
        left = t_ns - now_ns()
        if left <= 0:
            return True
        stop.wait(min(left / NS_PER_S, _WAIT_S))
    return False


class Source:
    """A camera, microphone or file filling ``frames`` and/or ``audio`` from its own thread(s)."""
    kind = "source"

    def __init__(self, name: str, realtime: bool):
        self.name = name
        self.realtime = realtime
        self.frames: FrameRing | None = None
        self.audio: AudioRing | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._reported = False
        self._started = False

    # --- life cycle -------------------------------------------------------------------------------------
    def start(self) -> "Source":
        """Open the device or file (raising InputError when it cannot be used) and start capturing."""
        if self._started:
            return self
        self._open()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop capturing, wake blocked writers and join the threads (bounded wait)."""
        self._stop.set()
        for ring in (self.frames, self.audio):
            if ring is not None:
                ring.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._close()

    def __enter__(self) -> "Source":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- state --------------------------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def finished(self) -> bool:
        """True once capture has ended: end of file, failure or stop()."""
        with self._lock:
            return self._started and self._running == 0

    def check(self) -> None:
        """Re-raise the failure of a capture thread. Bad input stays the error it is; an OSError (a device or
        file gone) becomes an InputError naming this source; anything else is a bug and is raised unchanged
        (its type and traceback kept) after logging which source it came from."""
        error = self._error
        if error is None:
            return
        if isinstance(error, OSError):
            raise InputError(f"{self.kind} {self.name} failed: {type(error).__name__}: {error}") from error
        if not isinstance(error, EdgeEmollamaError) and not self._reported:
            self._reported = True
            log.error("%s %s failed unexpectedly", self.kind, self.name, exc_info=error)
        raise error

    # --- for subclasses -----------------------------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release the device (after the threads ended)."""

    def _spawn(self, name: str, body: Callable[[], None]) -> None:
        with self._lock:
            self._running += 1
        thread = threading.Thread(target=self._run, args=(body,), name=f"{self.kind}-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # recorded, reported by check(); the thread ends here
            self._fail(exc)
        finally:
            with self._lock:
                self._running -= 1
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    def _wake(self) -> None:
        for ring in (self.frames, self.audio):
            if ring is not None:
                ring._notify()


# ---------------------------------------------------------------------------------------------------------
class CameraSource(Source):
    """A camera (index or /dev/videoN) or a stream URL through OpenCV, read in its own thread."""
    kind = "camera"

    def __init__(self, device: int | str = 0, options: CameraConfig = CameraConfig()):
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        super().__init__(str(device), realtime=True)
        self.device = device
        self.options = options
        self.fps: float | None = None
        self._cap = None

    def _open(self) -> None:
        cv2 = require("cv2")
        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            raise InputError(f"camera {self.device} could not be opened: {self._why_not()}. "
                             "Check the device and its cable, or use --video FILE")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.options.width),
                            (cv2.CAP_PROP_FRAME_HEIGHT, self.options.height), (cv2.CAP_PROP_FPS, self.options.fps)):
            if value:
                cap.set(prop, value)
        reported = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(reported) if reported and 1 <= reported <= 240 else 30.0
        self._cap = cap
        self.frames = FrameRing(max(2, math.ceil(self.options.ring_seconds * self.fps) + 1))
        self._spawn("reader", self._read_loop)

    def _why_not(self) -> str:
        if isinstance(self.device, int):
            node = f"/dev/video{self.device}"
            if not os.path.exists(node):
                return f"{node} does not exist"
            return f"OpenCV cannot read {node} (is another program using it?)"
        return "OpenCV cannot open this path or URL"

    def _read_loop(self) -> None:
        cv2 = require("cv2")
        failures, index = 0, 0
        while not self._stop.is_set():
            ok = self._cap.grab()
            t = now_ns()
            ok = ok and self._retrieve(cv2, t, index)
            if ok:
                failures, index = 0, index + 1
                continue
            failures += 1
            if failures >= self.options.max_failed_reads:
                raise InputError(f"camera {self.device} stopped delivering frames ({failures} failed reads in a "
                                 "row): check the cable/driver, or use --video FILE")
            self._stop.wait(0.01)

    def _retrieve(self, cv2, t: int, index: int) -> bool:
        ok, bgr = self._cap.retrieve()
        if not ok or bgr is None:
            return False
        self.frames.put(Frame(t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), index))
        return True

    def _close(self) -> None:
        if any(t.is_alive() for t in self._threads):
            return  # the reader is stuck inside the driver: releasing now could crash it; it is a daemon thread
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# ---------------------------------------------------------------------------------------------------------
class MicrophoneSource(Source):
    """A microphone through PyAudio (PortAudio), mono int16 at ``sample_rate``, fed by PortAudio's callback.

    ``device``: None (the default input), an index, or a name (exact, else a case-insensitive substring).
    """
    kind = "microphone"

    def __init__(self, device: int | str | None, sample_rate: int, options: MicrophoneConfig = MicrophoneConfig()):
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        super().__init__("default" if device is None else str(device), realtime=True)
        self.device = device
        self.sample_rate = int(sample_rate)
        self.options = options
        self.device_name: str | None = None
        self.overflows = 0
        self._pa = self._stream = None
        self._latency_ns = 0

    def _open(self) -> None:
        pyaudio = self._pyaudio = require("pyaudio")
        self._pa = pyaudio.PyAudio()
        try:
            info = self._resolve(pyaudio)
            self.device_name = info["name"]
            self.audio = AudioRing(self.sample_rate, self.options.ring_seconds)
            self._stream = self._pa.open(
                format=pyaudio.paInt16, channels=1, rate=self.sample_rate, input=True,
                input_device_index=int(info["index"]), frames_per_buffer=self.options.frames_per_buffer,
                stream_callback=self._callback, start=False)
        except OSError as exc:
            self._terminate()
            raise InputError(f"microphone {self.name} could not be opened at {self.sample_rate} Hz mono "
                             f"int16 ({exc}); choose the 'pulse' or 'default' device (they resample) with --mic, "
                             "or use --no-mic") from exc
        except BaseException:
            self._terminate()
            raise
        latency = self.options.latency_s
        self._latency_ns = int((self._stream.get_input_latency() if latency is None else latency) * NS_PER_S)
        self._clock = _SampleClock(self.sample_rate)
        with self._lock:
            self._running = 1  # the PortAudio callback counts as this source's thread
        self._stream.start_stream()

    def _inputs(self) -> list[dict]:
        infos = (self._pa.get_device_info_by_index(i) for i in range(self._pa.get_device_count()))
        return [info for info in infos if info.get("maxInputChannels", 0) > 0]

    def _resolve(self, pyaudio) -> dict:
        inputs = self._inputs()
        listing = ", ".join(f"{d['index']}: {d['name']}" for d in inputs) or "none"
        if not inputs:
            raise InputError("no microphone: PortAudio lists no input device. Connect one (check `arecord -l` "
                             "or that PulseAudio runs), or use --no-mic or --video FILE")
        if self.device is None:
            try:
                return self._pa.get_default_input_device_info()
            except OSError:
                return inputs[0]
        if isinstance(self.device, int):
            match = [d for d in inputs if d["index"] == self.device]
        else:
            match = ([d for d in inputs if d["name"] == self.device]
                     or [d for d in inputs if self.device.lower() in d["name"].lower()])
        if not match:
            raise InputError(f"microphone '{self.device}' not found among the input devices ({listing}); "
                             "pass one of these names or indexes with --mic, or use --no-mic")
        return match[0]

    def _callback(self, in_data, frame_count, time_info, status):
        pyaudio = self._pyaudio
        try:
            t_end = now_ns() - self._latency_ns
            samples = np.frombuffer(in_data, dtype=np.int16)
            if status & pyaudio.paInputOverflow:
                self.overflows += 1
            self.audio.write(samples, self._clock.place(samples.size, t_end))
        except BaseException as exc:  # recorded; returning paComplete stops the stream
            self._fail(exc)
            self._end_callback_thread()
            return None, pyaudio.paComplete
        if self._stop.is_set():
            self._end_callback_thread()
            return None, pyaudio.paComplete
        return None, pyaudio.paContinue

    def _end_callback_thread(self) -> None:
        with self._lock:
            self._running = 0
        self._wake()

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.stop_stream()
            self._stream.close()
            self._stream = None
        self._end_callback_thread()
        self._terminate()

    def _terminate(self) -> None:
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None


# ---------------------------------------------------------------------------------------------------------
class VideoFileSource(Source):
    """A video file through PyAV: frames and the audio track (resampled to ``sample_rate`` mono float32).

    The file's presentation times are mapped onto the monotonic clock from ``start()``:
    ``t = origin_ns + (pts_seconds - file_start_seconds) * 1e9``. With ``realtime=True`` every item is
    released when the clock reaches its capture time (a live camera/microphone, played back); with
    ``realtime=False`` decoding runs as fast as possible, the capture times stay those of the timeline, and
    the rings block instead of dropping so that no window is lost. Video and audio decode in two threads
    (one demuxer each), so one track never waits on the other.
    """
    kind = "file"

    def __init__(self, path: str | os.PathLike, sample_rate: int, realtime: bool = True,
                 options: FileConfig = FileConfig()):
        super().__init__(str(path), realtime=realtime)
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.options = options
        self.origin_ns: int | None = None
        self.fps: float | None = None
        self.duration_s: float | None = None
        self._file_start = 0.0

    def _open(self) -> None:
        av = require("av")
        if not self.path.is_file():
            raise InputError(f"video file {self.path} not found: check the path given to --video")
        try:
            with av.open(str(self.path)) as container:
                has_video, has_audio = self._probe(container)
        except av.FFmpegError as exc:
            raise InputError(f"cannot decode {self.path}: {exc}; convert it (e.g. to MP4 with H.264 + AAC)") from exc
        if not (has_video or has_audio):
            raise InputError(f"{self.path} has no usable track (video={self.options.video}, "
                             f"audio={self.options.audio} requested): pass a file with video and/or audio")
        block = not self.realtime
        if has_video:
            capacity = max(2, math.ceil(self.options.ring_seconds * self.fps) + 1)
            self.frames = FrameRing(capacity, block_when_full=block)
        if has_audio:
            self.audio = AudioRing(self.sample_rate, self.options.audio_ring_seconds, block_when_full=block)
        self.origin_ns = now_ns()
        if has_video:
            self._spawn("video", self._video_loop)
        if has_audio:
            self._spawn("audio", self._audio_loop)

    def _probe(self, container) -> tuple[bool, bool]:
        self._file_start = container.start_time / 1e6 if container.start_time is not None else 0.0
        self.duration_s = container.duration / 1e6 if container.duration is not None else None
        video = self.options.video and bool(container.streams.video)
        audio = self.options.audio and bool(container.streams.audio)
        if video:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 30
            self.fps = float(rate)
        return video, audio

    def _timeline(self, seconds: float) -> int:
        return self.origin_ns + int(round((seconds - self._file_start) * NS_PER_S))

    def _video_loop(self) -> None:
        av = require("av")
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            index = 0
            for frame in container.decode(stream):
                seconds = frame.time if frame.time is not None else index / self.fps
                t = self._timeline(seconds)
                if self.realtime and not _sleep_until(t, self._stop):
                    return
                self.frames.put(Frame(t, self._rgb(frame), index))
                if self._stop.is_set():
                    return
                index += 1

    def _rgb(self, frame) -> np.ndarray:
        width, height = frame.width, frame.height
        limit = self.options.max_width
        if limit and width > limit:
            width, height = limit, max(2, int(round(height * limit / width / 2)) * 2)
        return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()

    def _audio_loop(self) -> None:
        av = require("av")
        rate = self.sample_rate
        with av.open(str(self.path)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            first, count = None, 0
            for frame in container.decode(stream):
                if first is None:
                    first = frame.time if frame.time is not None else self._file_start
                for out in resampler.resample(frame):
                    if not self._push_audio(out.to_ndarray().reshape(-1), first, count):
                        return
                    count += out.samples
            for out in resampler.resample(None):
                if not self._push_audio(out.to_ndarray().reshape(-1), first, count):
                    return
                count += out.samples

    def _push_audio(self, samples: np.ndarray, first: float, count: int) -> bool:
        rate = self.sample_rate
        t = self._timeline(first) + count * NS_PER_S // rate
        if self.realtime and not _sleep_until(t + samples.size * NS_PER_S // rate, self._stop):
            return False
        return not self._stop.is_set() and self.audio.write(samples, t) is not None
