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

Faults (docs/sources.md): a ring says when its writer is done (``complete``) and, for a file's track, where
the track starts on the timeline (``known_start_ns``, from the container), so that windows follow a file's
own timeline. A file's unreadable packet is skipped and counted (``bad_packets``); a file cut short ends as
end of input with a warning (``cut_short``). A camera or microphone that is lost is reopened with exponential
backoff; meanwhile ``state`` is ``"lost"`` and windows go on without it (``losses``, ``reconnects`` count).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
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

# Reconnecting live sources. Wanted as config keys (runtime.camera.* / runtime.microphone.*): reconnect_s,
# reconnect_max_s, lost_after_s; until then these constants hold for both.
STREAM_OPEN_TIMEOUT_MS = 3000  # a network camera (URL): opening it gives up after this
STREAM_READ_TIMEOUT_MS = 2000  # ... and a read that stalls after this (OpenCV's own default is 30 s)

# Damaged files.
MAX_DEMUX_ERRORS_IN_A_ROW = 20  # the demuxer failing this often without a good packet: the file cannot go on
CUT_SHORT_TOLERANCE_S = 0.5     # a track ending this much before its header's end counts as cut short
AUDIO_GAP_S = 0.02              # a decoded audio frame starting this much after the previous one: a gap


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
        self.complete = False  # the writer is done: nothing more will come (end of a track, source stopped)
        self.known_start_ns: int | None = None  # a file's track: where it starts on the timeline (None: live)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (without the ring's lock) after every write and on close."""
        self._listeners.append(callback)

    def close(self) -> None:
        """Wake and refuse blocked writers (the source is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._notify()

    def mark_complete(self) -> None:
        """The writer is done (end of its track or of the source): readers stop waiting for more."""
        with self._cond:
            self.complete = True
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


@contextlib.contextmanager
def _native_stderr_to_debug_log(what: str):
    """What C libraries write to file descriptor 2 meanwhile goes to the debug log instead of the terminal
    (ALSA and JACK probing every device), so a clear error of ours is not buried under it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            noise = sink.read().decode("utf-8", errors="replace").strip()
            if noise:
                log.debug("%s wrote while opening:\n%s", what, noise)


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
        self.losses = 0       # times a live device was lost
        self.reconnects = 0   # times it came back

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

    @property
    def state(self) -> str:
        """``capturing``, ``ended`` (end of input or stopped) or ``failed``; live sources add ``lost``."""
        if self._error is not None:
            return "failed"
        return "ended" if self.finished else "capturing"

    @property
    def connected(self) -> bool:
        """True while the source delivers (or can deliver) data."""
        return self.state == "capturing"

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


class _Backoff:
    """Waits between attempts to reopen a lost device: ``first_s`` doubling up to ``max_s``."""

    def __init__(self, first_s: float, max_s: float):
        self.first_s, self.max_s = first_s, max_s
        self.delay_s = first_s

    def reset(self) -> None:
        self.delay_s = self.first_s

    def next_s(self) -> float:
        """The wait before the next attempt (and double the one after)."""
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_s)
        return delay


# ---------------------------------------------------------------------------------------------------------
class CameraSource(Source):
    """A camera (index or /dev/videoN) or a stream URL through OpenCV, read in its own thread.

    Opening it at ``start()`` must succeed (else InputError). Later, ``max_failed_reads`` failed reads in a
    row, or failed reads for ``lost_after_s``, count as a loss: ``state`` turns ``"lost"``, the device
    is released and reopened after 0.5, 1, 2, 4, 5, 5 ... s (a device node that reappears is tried at once)
    until it delivers again or the source is stopped. A regular file given as the device is not reopened: its
    end is the end of input.
    """
    kind = "camera"

    def __init__(self, device: int | str = 0, options: CameraConfig = CameraConfig()):
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        super().__init__(str(device), realtime=True)
        self.device = device
        self.options = options
        self.fps: float | None = None
        self._cap = None
        self._lost = False
        self._index = 0
        self._backoff = _Backoff(options.reconnect_s, options.reconnect_max_s)

    @property
    def state(self) -> str:
        base = super().state
        return "lost" if base == "capturing" and self._lost else base

    def _open(self) -> None:
        cv2 = require("cv2")
        cap = self._open_capture(cv2)
        if cap is None:
            raise InputError(f"camera {self.device} could not be opened: {self._why_not()}. "
                             "Check the device and its cable, or use --video FILE")
        reported = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(reported) if reported and 1 <= reported <= 240 else 30.0
        self._cap = cap
        self.frames = FrameRing(max(2, math.ceil(self.options.ring_seconds * self.fps) + 1))
        self._spawn("reader", self._read_loop)

    def _open_capture(self, cv2):
        """An opened ``cv2.VideoCapture`` with the requested size and rate, or None."""
        if isinstance(self.device, str) and "://" in self.device:   # a network stream: bounded waits
            cap = cv2.VideoCapture(self.device, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_OPEN_TIMEOUT_MS,
                                                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_READ_TIMEOUT_MS])
        else:
            cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            return None
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.options.width),
                            (cv2.CAP_PROP_FRAME_HEIGHT, self.options.height), (cv2.CAP_PROP_FPS, self.options.fps)):
            if value:
                cap.set(prop, value)
        return cap

    def _why_not(self) -> str:
        if isinstance(self.device, int):
            node = f"/dev/video{self.device}"
            if not os.path.exists(node):
                return f"{node} does not exist"
            return f"OpenCV cannot read {node} (is another program using it?)"
        return "OpenCV cannot open this path or URL"

    def _node(self) -> str | None:
        """The device node whose reappearance is worth an immediate attempt (None for URLs)."""
        if isinstance(self.device, int):
            return f"/dev/video{self.device}"
        return self.device if self.device.startswith("/dev/") else None

    def _is_regular_file(self) -> bool:
        return isinstance(self.device, str) and "://" not in self.device and os.path.isfile(self.device)

    def _read_loop(self) -> None:
        cv2 = require("cv2")
        try:
            while not self._stop.is_set():
                if self._cap is None and not self._reopen(cv2):
                    continue
                self._read_until_lost(cv2)
                if self._is_regular_file():
                    log.warning("camera %s: the file ended; end of input", self.device)
                    return
        finally:
            self._release()
            self.frames.mark_complete()

    def _read_until_lost(self, cv2) -> None:
        """Read frames until the device fails (then mark it lost) or the source is stopped."""
        failures, last_good = 0, now_ns()
        lost_after_ns = int(self.options.lost_after_s * NS_PER_S)
        while not self._stop.is_set():
            ok = self._cap.grab()
            t = now_ns()
            if ok and self._retrieve(cv2, t, self._index):
                failures, last_good, self._index = 0, t, self._index + 1
                continue
            failures += 1
            if failures >= self.options.max_failed_reads or t - last_good >= lost_after_ns:
                self._mark_lost(failures, (t - last_good) / NS_PER_S)
                return
            self._stop.wait(0.01)

    def _mark_lost(self, failures: int, silent_s: float) -> None:
        self.losses += 1
        self._lost = True
        self._release()
        if not self._is_regular_file():
            log.warning("camera %s lost (%d failed reads, no frame for %.1f s): reopening it every %g-%g s; "
                        "windows go on without video", self.device, failures, silent_s, self.options.reconnect_s,
                        self.options.reconnect_max_s)

    def _reopen(self, cv2) -> bool:
        """Wait the backoff (cut short when the device node reappears), then try to open the device once."""
        deadline = now_ns() + int(self._backoff.next_s() * NS_PER_S)
        node = self._node()
        absent = node is not None and not os.path.exists(node)
        while now_ns() < deadline and not self._stop.is_set():
            if absent and os.path.exists(node):
                break
            self._stop.wait(_WAIT_S)
        if self._stop.is_set():
            return False
        cap = self._open_capture(cv2)
        if cap is None:
            return False
        self._cap, self._lost = cap, False
        self.reconnects += 1
        self._backoff.reset()
        log.warning("camera %s is back (reconnect %d)", self.device, self.reconnects)
        return True

    def _retrieve(self, cv2, t: int, index: int) -> bool:
        ok, bgr = self._cap.retrieve()
        if not ok or bgr is None:
            return False
        self.frames.put(Frame(t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), index))
        return True

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _close(self) -> None:
        if any(t.is_alive() for t in self._threads):
            return  # the reader is stuck inside the driver: releasing now could crash it; it is a daemon thread
        self._release()


# ---------------------------------------------------------------------------------------------------------
class MicrophoneSource(Source):
    """A microphone through PyAudio (PortAudio), mono int16 at ``sample_rate``, fed by PortAudio's callback.

    ``device``: None (the default input), an index, or a name (exact, else a case-insensitive substring).
    Opening it at ``start()`` must succeed (else InputError). A watcher thread then checks the stream: one
    that PortAudio stopped (a device error) or that delivers no callback for ``stall_s`` counts as lost;
    it is closed and reopened (the device looked up again by name) with the camera's backoff.
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
        self._last_callback_ns = 0
        self._backoff = _Backoff(options.reconnect_s, options.reconnect_max_s)

    @property
    def state(self) -> str:
        base = super().state
        return "lost" if base == "capturing" and self._stream is None else base

    def _open(self) -> None:
        self._pyaudio = require("pyaudio")
        self.audio = AudioRing(self.sample_rate, self.options.ring_seconds)
        self._open_stream()
        self._spawn("watcher", self._watch_loop)

    def _open_stream(self) -> None:
        """Open and start the stream (InputError when the device cannot be used)."""
        pyaudio = self._pyaudio
        with _native_stderr_to_debug_log("PortAudio/ALSA"):
            self._pa = pyaudio.PyAudio()   # ALSA prints dozens of "cannot find card" lines on such machines
        try:
            info = self._resolve(pyaudio)
            self.device_name = info["name"]
            stream = self._pa.open(
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
        self._latency_ns = int((stream.get_input_latency() if latency is None else latency) * NS_PER_S)
        self._clock = _SampleClock(self.sample_rate)   # a new stream counts its samples from 0
        self._last_callback_ns = now_ns()
        self._stream = stream
        stream.start_stream()

    def _watch_loop(self) -> None:
        """Until stopped: notice a broken stream, and reopen a lost one after the backoff."""
        retry_at = 0
        while not self._stop.wait(2 * _WAIT_S) and self._error is None:
            if self._stream is not None:
                if self._broken():
                    self._mark_lost()
                    retry_at = now_ns() + int(self._backoff.next_s() * NS_PER_S)
            elif now_ns() >= retry_at:
                retry_at = now_ns() + int(self._backoff.next_s() * NS_PER_S)
                self._try_reopen()

    def _broken(self) -> bool:
        try:
            active = self._stream.is_active()
        except OSError:
            active = False
        return not active or now_ns() - self._last_callback_ns > self.options.stall_s * NS_PER_S

    def _mark_lost(self) -> None:
        self.losses += 1
        log.warning("microphone %s lost (stream stopped or silent for %g s): reopening it every %g-%g s; "
                    "windows go on without audio", self.name, self.options.stall_s, self.options.reconnect_s,
                    self.options.reconnect_max_s)
        self._close_stream()

    def _try_reopen(self) -> None:
        try:
            self._open_stream()
        except InputError as exc:
            log.info("microphone %s not back yet: %s", self.name, exc)
            return
        self.reconnects += 1
        self._backoff.reset()
        log.warning("microphone %s is back (reconnect %d)", self.name, self.reconnects)

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
            self._last_callback_ns = now_ns()
            samples = np.frombuffer(in_data, dtype=np.int16)
            if status & pyaudio.paInputOverflow:
                self.overflows += 1
            self.audio.write(samples, self._clock.place(samples.size, t_end))
        except BaseException as exc:  # recorded (the watcher ends, check() raises it); the stream stops
            self._fail(exc)
            self._wake()
            return None, pyaudio.paComplete
        if self._stop.is_set():
            return None, pyaudio.paComplete
        return None, pyaudio.paContinue

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop_stream()
                stream.close()
            except OSError as exc:   # the device is already gone
                log.info("microphone %s: closing the stream: %s", self.name, exc)
        self._terminate()

    def _close(self) -> None:
        self._close_stream()
        if self.audio is not None:
            self.audio.mark_complete()

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

    Each ring's ``known_start_ns`` is its track's start from the container (a track may start seconds after
    the other), and ``complete`` turns true when its track ends. A packet that cannot be demuxed or decoded is
    skipped and counted in ``bad_packets`` (per track); the demuxer failing ``MAX_DEMUX_ERRORS_IN_A_ROW``
    times in a row ends the track there (a warning). A track that ends well before its header's end sets
    ``cut_short`` and warns: the file ends there. A track of which nothing at all decodes is an InputError.
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
        self.track_spans_s: dict[str, tuple[float, float | None]] = {}   # track -> (start, end) in file seconds
        self.bad_packets = {"video": 0, "audio": 0}
        self.cut_short = False
        self._file_start = 0.0

    def _open(self) -> None:
        av = require("av")
        if not self.path.is_file():
            raise InputError(f"video file {self.path} not found: check the path given to --video")
        try:
            with av.open(str(self.path)) as container:
                has_video, has_audio = self._probe(container)
        except av.FFmpegError as exc:
            raise InputError(f"cannot decode {self.path}: {exc}; the file is damaged or incomplete (cut short?) "
                             "or in a format FFmpeg does not read: convert it (e.g. to MP4 with H.264 + AAC)") from exc
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
        for track, ring, loop in (("video", self.frames, self._video_loop), ("audio", self.audio, self._audio_loop)):
            if ring is not None:
                ring.known_start_ns = self._timeline(self.track_spans_s[track][0])
                self._spawn(track, self._track_body(track, ring, loop))

    def _probe(self, container) -> tuple[bool, bool]:
        self._file_start = container.start_time / 1e6 if container.start_time is not None else 0.0
        self.duration_s = container.duration / 1e6 if container.duration is not None else None
        file_end = self._file_start + self.duration_s if self.duration_s is not None else None
        video = self.options.video and bool(container.streams.video)
        audio = self.options.audio and bool(container.streams.audio)
        if video:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 30
            self.fps = float(rate)
            self.track_spans_s["video"] = _stream_span(stream, self._file_start, file_end)
        if audio:
            self.track_spans_s["audio"] = _stream_span(container.streams.audio[0], self._file_start, file_end)
        return video, audio

    def _timeline(self, seconds: float) -> int:
        return self.origin_ns + int(round((seconds - self._file_start) * NS_PER_S))

    def _track_body(self, track: str, ring: _Ring, loop: Callable[[], float | None]) -> Callable[[], None]:
        """The thread of one track: decode it, check where it ended, then mark its ring complete."""
        def body() -> None:
            try:
                last_s = loop()
                if last_s is None and self.bad_packets[track] and not self._stop.is_set():
                    raise self._nothing_decoded(track)
                if last_s is not None and not self._stop.is_set():
                    self._check_end(track, last_s)
            finally:
                ring.mark_complete()
        return body

    def _nothing_decoded(self, track: str) -> InputError:
        other = "audio" if track == "video" else "video"
        return InputError(f"no {track} of {self.path} could be decoded ({self.bad_packets[track]} unreadable "
                          f"packets): the file is damaged; re-record or convert it, or pass --no-{track} to use "
                          f"its {other} only")

    def _check_end(self, track: str, last_s: float) -> None:
        end_s = self.track_spans_s[track][1]
        if end_s is not None and last_s < end_s - CUT_SHORT_TOLERANCE_S:
            self.cut_short = True
            log.warning("%s: the %s track ends at %.2f s although the file's header says %.2f s (the file was cut "
                        "short?): treated as the end of input", self.path, track, last_s - self._file_start,
                        end_s - self._file_start)

    def _packets_decoded(self, container, stream, track: str):
        """The decoded frames of ``stream``; an unreadable packet is skipped and counted."""
        av = require("av")
        errors_in_row = 0
        while not self._stop.is_set():
            try:
                for packet in container.demux(stream):
                    errors_in_row = 0
                    yield from self._decode(av, packet, track)
                return
            except av.FFmpegError as exc:   # the demuxer: try to go on from where it is
                errors_in_row += 1
                self._count_bad(track, exc)
                if errors_in_row >= MAX_DEMUX_ERRORS_IN_A_ROW:
                    log.warning("%s: the %s track cannot be read past this point (%d errors in a row, last: %s): "
                                "it ends here", self.path, track, errors_in_row, exc)
                    return

    def _decode(self, av, packet, track: str) -> list:
        try:
            return packet.decode()
        except av.FFmpegError as exc:
            self._count_bad(track, exc)
            return []

    def _count_bad(self, track: str, exc: Exception) -> None:
        self.bad_packets[track] += 1
        if self.bad_packets[track] == 1:
            log.warning("%s: an unreadable %s packet was skipped (%s: %s); further ones are counted in "
                        "bad_packets", self.path, track, type(exc).__name__, exc)

    def _video_loop(self) -> float | None:
        """Decode and release the frames; returns the time of the last one (file seconds), None if none."""
        av = require("av")
        last = None
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            index = 0
            for frame in self._packets_decoded(container, stream, "video"):
                seconds = frame.time if frame.time is not None else self.track_spans_s["video"][0] + index / self.fps
                t = self._timeline(seconds)
                if self.realtime and not _sleep_until(t, self._stop):
                    return last
                self.frames.put(Frame(t, self._rgb(frame), index))
                last = seconds + 1 / self.fps
                if self._stop.is_set():
                    return last
                index += 1
        return last

    def _rgb(self, frame) -> np.ndarray:
        width, height = frame.width, frame.height
        limit = self.options.max_width
        if limit and width > limit:
            width, height = limit, max(2, int(round(height * limit / width / 2)) * 2)
        return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()

    def _audio_loop(self) -> float | None:
        """Decode, resample and release the audio; returns where it ended (file seconds), None if nothing."""
        av = require("av")
        with av.open(str(self.path)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)
            timeline = _AudioTimeline(self.sample_rate, self.track_spans_s["audio"][0])
            for frame in self._packets_decoded(container, stream, "audio"):
                timeline.follow(frame)
                for out in resampler.resample(frame):
                    if not self._push_audio(out.to_ndarray().reshape(-1), timeline):
                        return timeline.end_s
            if timeline.started:
                for out in resampler.resample(None):
                    if not self._push_audio(out.to_ndarray().reshape(-1), timeline):
                        break
            return timeline.end_s

    def _push_audio(self, samples: np.ndarray, timeline: "_AudioTimeline") -> bool:
        t = self._timeline(timeline.place(samples.size))
        if self.realtime and not _sleep_until(t + samples.size * NS_PER_S // self.sample_rate, self._stop):
            return False
        return not self._stop.is_set() and self.audio.write(samples, t) is not None


def _stream_span(stream, file_start: float, file_end: float | None) -> tuple[float, float | None]:
    """A track's (start, end) in file seconds: its own times from the container, else the file's."""
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None and base else file_start
    if stream.duration is not None and base:
        return start, start + float(stream.duration * base)
    tagged = _duration_tag(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    return start, (start + tagged if tagged is not None else file_end)


def _duration_tag(text: str | None) -> float | None:
    """Matroska's per-track ``DURATION`` tag, ``HH:MM:SS.nnnnnnnnn``, in seconds (None when absent or odd)."""
    try:
        hours, minutes, seconds = str(text).split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


class _AudioTimeline:
    """File times of a decoded, resampled audio track: counted in output samples from its first frame, moved
    on by the gap when a frame starts later than the previous one ended (a packet skipped)."""

    def __init__(self, rate: int, start_s: float):
        self.rate = rate
        self.start_s = start_s
        self.started = False
        self._count = 0
        self._gap_s = 0.0
        self._next_in_s: float | None = None   # where the next decoded frame should start

    def follow(self, frame) -> None:
        """Take a decoded frame's own time into account before its samples are placed."""
        t = frame.time
        if not self.started:
            self.started, self.start_s = True, t if t is not None else self.start_s
        elif t is not None and self._next_in_s is not None and t - self._next_in_s > AUDIO_GAP_S:
            self._gap_s += t - self._next_in_s
        base = t if t is not None else self._next_in_s
        if base is not None:
            self._next_in_s = base + frame.samples / frame.sample_rate

    def place(self, n: int) -> float:
        """The file time of the first of the next ``n`` output samples."""
        seconds = self.start_s + self._gap_s + self._count / self.rate
        self._count += n
        return seconds

    @property
    def end_s(self) -> float | None:
        return self.start_s + self._gap_s + self._count / self.rate if self.started else None
