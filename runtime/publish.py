"""The ZeroMQ publisher: estimates, events, reasons and a ~1 Hz status on the PUB socket.

The wire form (topics, header, frames, schema) is edge_emollama/protocol.py; this module decides when and
what to send:

- Never blocks the pipeline: ``publish()`` serialises the payload (so a bad one fails in the caller) and
  hands it to a sender thread through a bounded queue; the PUB socket has a low ``SNDHWM`` and sends with
  ``NOBLOCK``, so a slow or absent subscriber only loses old messages (visible to it as a ``seq`` gap).
- The sender thread also publishes the status (from :class:`StatusTracker`) every ``status_interval_s``,
  so liveness is reported even when the pipeline is stuck. If the thread fails, the error is kept and the
  next ``publish()`` raises it.
- Sinks (runtime/outputs.py: a recording, an LSL outlet, a \\psi socket) see every message after it was sent:
  ``sink(topic, header, payload)`` on the sender thread. A sink that raises is logged with its traceback,
  counted as an error in the status and disabled; the publisher goes on. ``close()`` closes them.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from collections import OrderedDict, deque
from typing import Callable, Sequence

from ..config import PublishConfig, SecurityConfig
from ..errors import ConfigError, InputError
from ..lazy import require
from ..protocol import (DEFAULT_SOURCE, PER_PERSON, TOPICS, bind_socket, check_source_name, dumps, encode_message,
                        header)
from ..security import Security, security_of
from .clock import NS_PER_S, ClockAnchor, now_ns, run_anchor
from .fusion import FusedEstimate, FusionEvent

__all__ = ["Publisher", "StatusTracker", "Sink", "estimate_payload"]

log = logging.getLogger(__name__)
_STOP = object()
MAX_TOPICS = 1024   # per-topic seq counters kept (one per person and source that was estimated)
MAX_LATEST = 256    # per-topic last messages kept for the control verb ``latest``
FAULT_S = 60.0   # how long a component's failure keeps the status 'degraded' after it restarted
Sink = Callable[[str, dict, dict], None]   # sink(topic, header, payload); an optional close() is called at the end


def estimate_payload(fused: FusedEstimate, presence: dict, timings_ms: dict, window_index: int,
                     smoothing: str, spans: dict | None = None, subtitle: str | None = None,
                     box: list | None = None) -> dict:
    """The estimate payload of one window (``latency_ms`` is added when sent)."""
    extra = {"spans": spans} if spans else {}
    if subtitle is not None:
        extra["subtitle"] = subtitle
    return {**extra,
        "window_index": int(window_index),
        "box": None if box is None else [int(v) for v in box],
        "labels": list(fused.labels),
        "probabilities": [float(p) for p in fused.probabilities],
        "smoothed": [float(p) for p in fused.smoothed],
        "dominant": {"label": fused.dominant, "probability": float(fused.dominant_probability),
                     "since_ns": int(fused.dominant_since_ns)},
        "smoothing": smoothing,
        "presence": presence,
        "timings_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
    }


class StatusTracker:
    """What the status message says: state, rates, latency, presence, counters. Thread-safe."""

    def __init__(self, stall_s: float = 3.0, latency_budget_ms: float | None = None):
        self.stall_ns = int(stall_s * NS_PER_S)
        self.latency_budget_ms = latency_budget_ms
        self._lock = threading.Lock()
        self._started = now_ns()
        self._times: deque[int] = deque(maxlen=64)
        self._latencies: deque[float] = deque(maxlen=32)
        self._presence: dict | None = None
        self._last_seq: int | None = None
        self._counters = dict(estimates=0, events=0, reasons=0, dropped_windows=0, send_dropped=0, errors=0,
                              extra_link_peers=0)
        self._last_error: dict | None = None
        self._fatal = False
        self._faults: dict[str, tuple] = {}   # component -> (failures, last reason, when): status degraded
        self._video_seen = False              # a window had video: its absence later means the camera is lost
        self._recent_drops: deque[int] = deque(maxlen=64)
        self._link_peers: dict[str, int] = {}   # stage link -> peers connected now, while more than one
        self._tracks: list = []                 # the live estimate streams (runtime/streams.py)
        self._stopped = False

    def record_sent(self, kind: str, seq: int, payload: dict, publish_ns: int) -> None:
        with self._lock:
            if kind == "estimate":
                self._counters["estimates"] += 1
                self._times.append(publish_ns)
                self._latencies.append(float(payload["latency_ms"]))
                p = payload["presence"]
                self._presence = {m: bool(p[m]["present"]) for m in ("video", "face", "audio")}
                self._video_seen = self._video_seen or self._presence["video"]
                self._last_seq = seq
            elif kind in ("event", "reason"):
                self._counters[kind + "s"] += 1

    def record_dropped_windows(self, count: int) -> None:
        """Windows skipped because the pipeline was behind (the scheduler's ``dropped`` increase)."""
        if count > 0:
            with self._lock:
                self._counters["dropped_windows"] += count
                self._recent_drops.append(now_ns())

    def record_send_dropped(self, count: int = 1) -> None:
        with self._lock:
            self._counters["send_dropped"] += count

    def record_error(self, stage: str, error: BaseException | str, fatal: bool = False) -> None:
        with self._lock:
            self._counters["errors"] += 1
            self._last_error = {"stage": stage, "message": str(error), "t_ns": now_ns()}
            self._fatal = self._fatal or fatal

    def record_fault(self, component: str, error: BaseException) -> None:
        """A component whose thread failed without stopping the run (the control socket's loop, which restarts
        itself): counted as an error; the status is 'degraded' naming it, with how often, for FAULT_S after
        the last failure."""
        self.record_error(component, error)
        with self._lock:
            count = self._faults.get(component, (0, "", 0))[0] + 1
            self._faults[component] = (count, f"{type(error).__name__}: {error}", now_ns())

    def record_link_peers(self, link: str, peers: int, new_peers: int) -> None:
        """A point-to-point stage link's peer count (runtime/link.py's monitor): ``new_peers`` peers beyond the
        first one that just connected (counted); the status stays 'degraded' while more than one is connected."""
        with self._lock:
            self._counters["extra_link_peers"] += new_peers
            if peers > 1:
                self._link_peers[link] = peers
            else:
                self._link_peers.pop(link, None)

    def record_tracks(self, tracks: list) -> None:
        """The live estimate streams, as runtime/streams.py's StreamBook lists them."""
        with self._lock:
            self._tracks = list(tracks)

    def mark_stopped(self) -> None:
        with self._lock:
            self._stopped = True

    def snapshot(self) -> dict:
        """The status payload now."""
        now = now_ns()
        with self._lock:
            state, reasons = self._state(now)
            lat = list(self._latencies)
            return {
                "state": state, "reasons": reasons, "uptime_s": round((now - self._started) / NS_PER_S, 3),
                "rates_hz": {"estimates": self._rate(now)},
                "latency_ms": None if not lat else {"last": round(lat[-1], 3), "mean": round(sum(lat) / len(lat), 3),
                                                    "max": round(max(lat), 3)},
                "presence": dict(self._presence) if self._presence else None,
                "counters": dict(self._counters), "last_error": dict(self._last_error) if self._last_error else None,
                "last_estimate_seq": self._last_seq, "tracks": [dict(t) for t in self._tracks],
            }

    def _rate(self, now: int) -> float:
        span = 5 * NS_PER_S
        recent = [t for t in self._times if now - t <= span]
        window = min(span, now - self._started)
        return round(len(recent) * NS_PER_S / window, 3) if window > 0 else 0.0

    def _state(self, now: int) -> tuple[str, list[str]]:
        if self._stopped:
            return "stopped", []
        if self._fatal:
            return "error", [f"{self._last_error['stage']}: {self._last_error['message']}"]
        if not self._times:
            if self._degraded(now):
                return "degraded", self._degraded(now)
            if now - self._started < self.stall_ns:
                return "starting", []
            return "degraded", [f"no estimate {round((now - self._started) / NS_PER_S, 1)} s after the start"]
        reasons = self._degraded(now)
        if reasons:
            return "degraded", reasons
        video, face, audio = self._presence["video"], self._presence["face"], self._presence["audio"]
        if not video and self._video_seen:
            return "no_video", ["no video frames in the last window: the camera is lost (reopening)"]
        if not face and not audio:
            return "no_input", ["no face and no audio in the last window"]
        if not face:
            return "no_face", ["no face in the last window"]
        if not audio:
            return "no_audio", ["no audio above the threshold in the last window"]
        return "running", []

    def _degraded(self, now: int) -> list[str]:
        reasons = [f"{component} stopped {count}x, restarted (last: {why})"
                   for component, (count, why, at) in self._faults.items() if now - at <= FAULT_S * NS_PER_S]
        reasons += [f"stage link {link}: {peers} peers connected to a point-to-point link (items are split between "
                    "them)" for link, peers in self._link_peers.items()]
        age = now - (self._times[-1] if self._times else self._started)
        if self._times and age > self.stall_ns:
            reasons.append(f"no estimate for {round(age / NS_PER_S, 1)} s")
        if self.latency_budget_ms is not None and self._latencies:
            mean = sum(self._latencies) / len(self._latencies)
            if mean > self.latency_budget_ms:
                reasons.append(f"mean latency {mean:.0f} ms over the budget of {self.latency_budget_ms:.0f} ms")
        if any(now - t <= 5 * NS_PER_S for t in self._recent_drops):
            reasons.append("windows dropped in the last 5 s: the pipeline is slower than the hop")
        return reasons


class Publisher:
    """A PUB socket with its sender thread. ``start()`` binds; ``publish()`` never blocks.

    ``security``: ``runtime.security`` (or a loaded Security): CURVE with the allow-listed client keys; None:
    no CURVE, loopback only (edge_emollama/protocol.py's bind policy). ``sinks``: called with every message
    sent (the module's docstring); the publisher owns them from here on and closes them in ``close()``."""

    def __init__(self, options: PublishConfig = PublishConfig(), *, context=None,
                 stream_id: str | None = None, anchor: ClockAnchor | None = None,
                 security: Security | SecurityConfig | None = None, sinks: Sequence[Sink] = ()):
        self.options = options.validate()
        self.security = security_of(security)
        self._zmq = require("zmq")
        self._context = context or self._zmq.Context.instance()
        self.stream_id = stream_id or str(uuid.uuid4())
        self.anchor = anchor or run_anchor()
        self.tracker = StatusTracker(options.stall_s, options.latency_budget_ms)
        self._queue: queue.Queue = queue.Queue(maxsize=options.queue_size)
        self._seq: OrderedDict[str, int] = OrderedDict()   # topic -> next seq (the newest MAX_TOPICS topics)
        self._latest: dict[str, dict] = {}                     # kind -> its last message
        self._latest_by_topic: OrderedDict[str, dict] = OrderedDict()   # topic -> its last (newest MAX_LATEST)
        self._lock = threading.Lock()
        self._socket = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint: str | None = None
        self._sinks: list[Sink] = list(sinks)
        self.failed_sinks: list[str] = []   # the names of the sinks disabled after they raised

    def start(self) -> "Publisher":
        """Bind and start the sender thread; a second call does nothing (two threads on one socket would
        interleave the frames of their messages)."""
        if self._thread is not None:
            return self
        o = self.options
        try:
            self._socket, self.endpoint = bind_socket(
                self._context, self._zmq.PUB, o.endpoint, {self._zmq.SNDHWM: o.sndhwm}, o.heartbeat,
                "the publisher", "another edge-emollama running? choose another endpoint with --publish",
                security=self.security)
        except BaseException:
            self._close_sinks()
            raise
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout_s: float = 2.0) -> None:
        """Send a final 'stopped' status, stop the thread, close the sinks and the socket."""
        if self._thread is None:
            self._close_sinks()   # never started: the sinks it was handed are closed all the same
            return
        self.tracker.mark_stopped()
        self._put(("status", None, None, None), force=True)
        self._put((_STOP, None, None, None), force=True)
        self._thread.join(timeout_s)
        self._thread = None
        self._close_sinks()
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Re-raise the sender thread's failure (as it was: an unexpected one keeps its type and traceback)."""
        if self._error is not None:
            raise self._error

    # --- publishing -----------------------------------------------------------------------------------------
    def publish(self, kind: str, payload: dict, window: tuple[int, int] | None = None,
                stream: tuple = (DEFAULT_SOURCE, None)) -> bool:
        """Queue one message of ``kind`` (estimate, event, reason, status); False when the queue was full.

        ``window``: the capture window ``(t0_ns, t1_ns)`` it is about (required for estimates); ``stream``:
        the ``(source, face_id)`` an estimate or event is about (its topic and header name them)."""
        self.check()
        if self._thread is None:
            raise ConfigError("Publisher.publish() before start(): call start() (or use it as a context manager)")
        if kind not in TOPICS:
            raise InputError(f"unknown message kind '{kind}': use one of {sorted(TOPICS)}")
        if kind == "estimate" and window is None:
            raise InputError("an estimate needs its capture window (t0_ns, t1_ns)")
        if kind in PER_PERSON:
            check_source_name(stream[0])   # it becomes part of the topic
        try:
            dumps(payload)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{kind} payload is not strict JSON ({exc}): no NaN/Infinity, only JSON types") from exc
        return self._put((kind, payload, window, tuple(stream)))

    def publish_estimate(self, fused: FusedEstimate, presence: dict, timings_ms: dict, window_index: int,
                         smoothing: str, spans: dict | None = None, subtitle: str | None = None, *,
                         stream: tuple = (DEFAULT_SOURCE, None), box: list | None = None) -> bool:
        payload = estimate_payload(fused, presence, timings_ms, window_index, smoothing, spans, subtitle, box)
        return self.publish("estimate", payload, (fused.t0_ns, fused.t1_ns), stream)

    def publish_event(self, event: FusionEvent | dict, window: tuple[int, int] | None = None,
                      stream: tuple = (DEFAULT_SOURCE, None)) -> bool:
        return self.publish("event", event if isinstance(event, dict) else event.to_dict(), window, stream)

    def latest(self, kind: str = "estimate") -> dict | None:
        """The last message of ``kind`` (about anyone), or of one full topic (one person's, e.g.
        ``emollama.v2.estimate.hall.face-1.``), as ``{"topic", "header", "payload"}`` (None if none)."""
        with self._lock:
            item = self._latest.get(kind) if kind in TOPICS else self._latest_by_topic.get(kind)
            return json.loads(json.dumps(item)) if item is not None else None

    def _put(self, item, force: bool = False) -> bool:
        try:
            self._queue.put(item, timeout=1.0) if force else self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.tracker.record_send_dropped()
            return False

    # --- the sender thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # kept; publish() raises it
            log.error("the publisher thread failed", exc_info=True)
            self._error = exc
            self.tracker.record_error("publisher", exc, fatal=True)

    def _loop(self) -> None:
        interval = int(self.options.status_interval_s * NS_PER_S)
        next_status = now_ns()
        while True:
            wait = max(0.0, (next_status - now_ns()) / NS_PER_S)
            try:
                kind, payload, window, stream = self._queue.get(timeout=wait)
            except queue.Empty:
                kind = None
            if kind is _STOP:
                return
            if kind == "status" and payload is None:
                self._send("status", self.tracker.snapshot(), None, None)
            elif kind is not None:
                self._send(kind, payload, window, stream)
            if now_ns() >= next_status:
                self._send("status", self.tracker.snapshot(), None, None)
                next_status = max(next_status + interval, now_ns() + interval // 2)

    def _send(self, kind: str, payload: dict, window, stream) -> None:
        zmq = self._zmq
        publish_ns = now_ns()
        head = header(kind, self.stream_id, 0, window, publish_ns, self.anchor.to_dict(),
                      *(stream if kind in PER_PERSON else ()))
        head["seq"] = self._next_seq(head["topic"])
        if kind == "estimate":
            payload = {**payload, "latency_ms": round((publish_ns - int(window[1])) / 1e6, 3)}
        frames = encode_message(head, payload)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.tracker.record_send_dropped()
        with self._lock:
            self._latest[kind] = self._latest_by_topic[head["topic"]] = {"topic": head["topic"], "header": head,
                                                                         "payload": payload}
            self._latest_by_topic.move_to_end(head["topic"])
            while len(self._latest_by_topic) > MAX_LATEST:
                self._latest_by_topic.popitem(last=False)
        self.tracker.record_sent(kind, head["seq"], payload, publish_ns)
        self._feed_sinks(head["topic"], head, payload)

    def _next_seq(self, topic: str) -> int:
        """0, 1, 2, ... per topic (topics of long-ended tracks are forgotten beyond MAX_TOPICS)."""
        seq = self._seq.pop(topic, 0)
        self._seq[topic] = seq + 1
        while len(self._seq) > MAX_TOPICS:
            self._seq.popitem(last=False)
        return seq

    # --- sinks ----------------------------------------------------------------------------------------------
    def _feed_sinks(self, topic: str, head: dict, payload: dict) -> None:
        """Every sink sees the message; one that raises is logged, counted and disabled."""
        for sink in list(self._sinks):
            try:
                sink(topic, head, payload)
            except Exception as exc:
                name = _sink_name(sink)
                log.error("output %s failed and is disabled (the publisher goes on)", name, exc_info=True)
                self._sinks.remove(sink)
                self.failed_sinks.append(name)
                self.tracker.record_error(f"output {name}", exc)
                _close_sink(sink)

    def _close_sinks(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            _close_sink(sink)


def _sink_name(sink) -> str:
    return getattr(sink, "name", None) or type(sink).__name__


def _close_sink(sink) -> None:
    """Close a sink that has ``close()``; a failure there is logged with its traceback, never raised."""
    close = getattr(sink, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.error("closing output %s failed", _sink_name(sink), exc_info=True)
