"""The ZeroMQ publisher: estimates, events, reasons and a ~1 Hz status, as ``[topic, header, payload]``.

- Topics (dotted, versioned, none a prefix of another): see :data:`TOPICS`. Subscribe to one topic by its
  full name, or to all of version 1 with ``emollama.v1.`` (trailing dot).
- Header: strict JSON (``allow_nan=False``) with schema name and version, per-topic ``seq`` (0, 1, 2, ...),
  the run's ``stream_id`` (uuid4), the capture window in monotonic ns, ``publish_ns`` and the run's UTC
  anchor. Payload: strict JSON; ``runtime/schema/estimate.schema.json`` describes all of it.
- Never blocks the pipeline: ``publish()`` serialises the payload (so a bad one fails in the caller) and
  hands it to a sender thread through a bounded queue; the PUB socket has a low ``SNDHWM`` and sends with
  ``NOBLOCK``, so a slow or absent subscriber only loses old messages (visible to it as a ``seq`` gap).
- The sender thread also publishes the status (from :class:`StatusTracker`) every ``status_interval_s``,
  so liveness is reported even when the pipeline is stuck. If the thread fails, the error is kept and the
  next ``publish()`` raises it.
- ZMTP heartbeats (``HEARTBEAT_IVL/TIMEOUT/TTL``) drop dead TCP peers. Binds loopback by default.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, EdgeEmollamaError, InputError
from ..lazy import require
from .clock import NS_PER_S, ClockAnchor, now_ns, run_anchor
from .fusion import FusedEstimate, FusionEvent

__all__ = [
    "TOPICS", "SCHEMA_VERSION", "SCHEMA_PATH", "PublisherOptions", "Publisher", "StatusTracker",
    "estimate_payload", "load_schema", "schema_errors", "message_errors", "decode_message", "dumps",
    "set_heartbeats",
]

log = logging.getLogger(__name__)

TOPICS = {
    "estimate": "emollama.v1.estimate",
    "status": "emollama.v1.status",
    "event": "emollama.v1.event",
    "reason": "emollama.v1.reason",
}
SCHEMA_NAMES = {kind: f"emollama.{kind}" for kind in TOPICS}
SCHEMA_VERSION = "1.0.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "estimate.schema.json"
_KIND_OF_TOPIC = {topic: kind for kind, topic in TOPICS.items()}
_STOP = object()


def dumps(obj) -> bytes:
    """Strict, compact JSON (NaN/Infinity refused) as UTF-8."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The wire protocol's JSON Schema (draft 2020-12)."""
    try:
        return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"the wire schema {SCHEMA_PATH} is missing: reinstall edge-emollama") from exc


@lru_cache(maxsize=8)
def _validator(definition: str):
    jsonschema = require("jsonschema")
    schema = load_schema()
    root = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(root)


def schema_errors(definition: str, instance) -> list[str]:
    """Why ``instance`` does not follow ``#/$defs/<definition>`` of the schema (empty when it does)."""
    names = load_schema()["$defs"]
    if definition not in names:
        raise ConfigError(f"no definition '{definition}' in the wire schema: use one of {sorted(names)}")
    errors = sorted(_validator(definition).iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(message)'}: {e.message}" for e in errors]


def message_errors(topic: str, header, payload) -> list[str]:
    """Why ``[topic, header, payload]`` does not follow the schema (empty when it does)."""
    kind = _KIND_OF_TOPIC.get(topic)
    if kind is None:
        return [f"unknown topic {topic!r}: expected one of {sorted(_KIND_OF_TOPIC)}"]
    out = schema_errors(f"{kind}_message", {"topic": topic, "header": header, "payload": payload})
    if kind == "estimate" and not out:
        out += _sum_errors(payload)
    return out


def _sum_errors(payload: dict) -> list[str]:
    return [f"payload/{key}: sums to {sum(payload[key])!r}, not 1" for key in ("probabilities", "smoothed")
            if abs(sum(payload[key]) - 1.0) > 1e-6]


def decode_message(frames: list[bytes]) -> tuple[str, dict, dict]:
    """``[topic, header, payload]`` frames -> ``(topic, header, payload)``; InputError when not of that form."""
    if len(frames) != 3:
        raise InputError(f"expected 3 frames [topic, header, payload], got {len(frames)}")
    try:
        topic = frames[0].decode("utf-8")
        header, payload = json.loads(frames[1]), json.loads(frames[2])
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"a frame is not UTF-8 JSON: {exc}") from exc
    return topic, header, payload


def set_heartbeats(socket, ivl_ms: int, timeout_ms: int, ttl_ms: int) -> None:
    """ZMTP heartbeats on a socket (before bind/connect): a silent TCP peer is dropped after ``timeout_ms``."""
    zmq = require("zmq")
    socket.setsockopt(zmq.HEARTBEAT_IVL, int(ivl_ms))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout_ms))
    socket.setsockopt(zmq.HEARTBEAT_TTL, int(ttl_ms))


def bind_socket(context, kind: int, endpoint: str, options: dict, heartbeats: tuple, what: str, hint: str):
    """A bound socket with LINGER 0, ``options`` and ZMTP heartbeats; (socket, actual endpoint).

    ConfigError naming ``what`` and ``hint`` when the endpoint cannot be bound."""
    zmq = require("zmq")
    check_loopback(endpoint)
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(option, value)
    set_heartbeats(sock, *heartbeats)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ConfigError(f"cannot bind {what} to {endpoint}: {exc} ({hint})") from exc
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def estimate_payload(fused: FusedEstimate, presence: dict, timings_ms: dict, window_index: int,
                     smoothing: str = "ema") -> dict:
    """The estimate payload of one window (``latency_ms`` is added when sent)."""
    return {
        "window_index": int(window_index),
        "labels": list(fused.labels),
        "probabilities": [float(p) for p in fused.probabilities],
        "smoothed": [float(p) for p in fused.smoothed],
        "dominant": {"label": fused.dominant, "probability": float(fused.dominant_probability),
                     "since_ns": int(fused.dominant_since_ns)},
        "smoothing": smoothing,
        "presence": presence,
        "timings_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
    }


def check_loopback(endpoint: str) -> None:
    """Warn when a TCP endpoint binds beyond loopback (the protocol has no encryption enabled)."""
    if not endpoint.startswith("tcp://"):
        return
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning("binding %s: reachable from other hosts, unencrypted; bind tcp://127.0.0.1:PORT unless "
                    "the network is trusted", endpoint)


@dataclass(frozen=True)
class PublisherOptions:
    endpoint: str = "tcp://127.0.0.1:5555"
    sndhwm: int = 16                 # messages per subscriber before the oldest are dropped (~8 s at 2 Hz)
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 3000
    heartbeat_ttl_ms: int = 3000
    status_interval_s: float = 1.0
    queue_size: int = 256            # pipeline -> sender thread
    stall_s: float = 3.0             # status 'degraded' when no estimate for this long
    latency_budget_ms: float | None = None  # status 'degraded' when the mean latency exceeds it

    def validate(self) -> "PublisherOptions":
        if self.sndhwm < 1 or self.queue_size < 1:
            raise ConfigError(f"sndhwm={self.sndhwm}, queue_size={self.queue_size}: both must be >= 1")
        if not self.status_interval_s > 0:
            raise ConfigError(f"status_interval_s={self.status_interval_s}: must be > 0")
        return self


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
        self._counters = dict(estimates=0, events=0, reasons=0, dropped_windows=0, send_dropped=0, errors=0)
        self._last_error: dict | None = None
        self._fatal = False
        self._recent_drops: deque[int] = deque(maxlen=64)
        self._rates: dict[str, float] = {}
        self._stopped = False

    def record_sent(self, kind: str, seq: int, payload: dict, publish_ns: int) -> None:
        with self._lock:
            if kind == "estimate":
                self._counters["estimates"] += 1
                self._times.append(publish_ns)
                self._latencies.append(float(payload["latency_ms"]))
                p = payload["presence"]
                self._presence = {m: bool(p[m]["present"]) for m in ("video", "face", "audio")}
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

    def set_rate(self, name: str, hz: float) -> None:
        """An extra rate to report (e.g. ``frames``, ``audio_chunks``)."""
        with self._lock:
            self._rates[name] = max(0.0, float(hz))

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
                "rates_hz": {"estimates": self._rate(now), **self._rates},
                "latency_ms": None if not lat else {"last": round(lat[-1], 3), "mean": round(sum(lat) / len(lat), 3),
                                                    "max": round(max(lat), 3)},
                "presence": dict(self._presence) if self._presence else None,
                "counters": dict(self._counters), "last_error": dict(self._last_error) if self._last_error else None,
                "last_estimate_seq": self._last_seq,
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
            if now - self._started < self.stall_ns:
                return "starting", []
            return "degraded", [f"no estimate {round((now - self._started) / NS_PER_S, 1)} s after the start"]
        reasons = self._degraded(now)
        if reasons:
            return "degraded", reasons
        face, audio = self._presence["face"], self._presence["audio"]
        if not face and not audio:
            return "no_input", ["no face and no audio in the last window"]
        if not face:
            return "no_face", ["no face in the last window"]
        if not audio:
            return "no_audio", ["no audio above the threshold in the last window"]
        return "running", []

    def _degraded(self, now: int) -> list[str]:
        reasons = []
        age = now - self._times[-1]
        if age > self.stall_ns:
            reasons.append(f"no estimate for {round(age / NS_PER_S, 1)} s")
        if self.latency_budget_ms is not None and self._latencies:
            mean = sum(self._latencies) / len(self._latencies)
            if mean > self.latency_budget_ms:
                reasons.append(f"mean latency {mean:.0f} ms over the budget of {self.latency_budget_ms:.0f} ms")
        if any(now - t <= 5 * NS_PER_S for t in self._recent_drops):
            reasons.append("windows dropped in the last 5 s: the pipeline is slower than the hop")
        return reasons


class Publisher:
    """A PUB socket with its sender thread. ``start()`` binds; ``publish()`` never blocks."""

    def __init__(self, options: PublisherOptions = PublisherOptions(), *, context=None,
                 stream_id: str | None = None, anchor: ClockAnchor | None = None):
        self.options = options.validate()
        self._zmq = require("zmq")
        self._context = context or self._zmq.Context.instance()
        self.stream_id = stream_id or str(uuid.uuid4())
        self.anchor = anchor or run_anchor()
        self.tracker = StatusTracker(options.stall_s, options.latency_budget_ms)
        self._queue: queue.Queue = queue.Queue(maxsize=options.queue_size)
        self._seq = {kind: 0 for kind in TOPICS}
        self._latest: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._socket = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint: str | None = None

    def start(self) -> "Publisher":
        o = self.options
        self._socket, self.endpoint = bind_socket(
            self._context, self._zmq.PUB, o.endpoint, {self._zmq.SNDHWM: o.sndhwm},
            (o.heartbeat_ivl_ms, o.heartbeat_timeout_ms, o.heartbeat_ttl_ms),
            "the publisher", "another edge-emollama running? choose another endpoint with --publish")
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout_s: float = 2.0) -> None:
        """Send a final 'stopped' status, stop the thread and close the socket."""
        if self._thread is None:
            return
        self.tracker.mark_stopped()
        self._put(("status", None, None), force=True)
        self._put((_STOP, None, None), force=True)
        self._thread.join(timeout_s)
        self._thread = None
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Re-raise the sender thread's failure."""
        if self._error is not None:
            if isinstance(self._error, EdgeEmollamaError):
                raise self._error
            raise InputError(f"the publisher thread failed: {type(self._error).__name__}: {self._error}") \
                from self._error

    # --- publishing -----------------------------------------------------------------------------------------
    def publish(self, kind: str, payload: dict, window: tuple[int, int] | None = None) -> bool:
        """Queue one message of ``kind`` (estimate, event, reason, status); False when the queue was full.

        ``window``: the capture window ``(t0_ns, t1_ns)`` it is about (required for estimates)."""
        self.check()
        if self._thread is None:
            raise ConfigError("Publisher.publish() before start(): call start() (or use it as a context manager)")
        if kind not in TOPICS:
            raise InputError(f"unknown message kind '{kind}': use one of {sorted(TOPICS)}")
        if kind == "estimate" and window is None:
            raise InputError("an estimate needs its capture window (t0_ns, t1_ns)")
        try:
            dumps(payload)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{kind} payload is not strict JSON ({exc}): no NaN/Infinity, only JSON types") from exc
        return self._put((kind, payload, window))

    def publish_estimate(self, fused: FusedEstimate, presence: dict, timings_ms: dict, window_index: int,
                         smoothing: str = "ema") -> bool:
        payload = estimate_payload(fused, presence, timings_ms, window_index, smoothing)
        return self.publish("estimate", payload, (fused.t0_ns, fused.t1_ns))

    def publish_event(self, event: FusionEvent, window: tuple[int, int] | None = None) -> bool:
        return self.publish("event", event.to_dict(), window)

    def latest(self, kind: str = "estimate") -> dict | None:
        """The last message sent on ``kind``'s topic as ``{"topic", "header", "payload"}`` (None if none)."""
        with self._lock:
            item = self._latest.get(kind)
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
            self._error = exc
            self.tracker.record_error("publisher", exc, fatal=True)

    def _loop(self) -> None:
        interval = int(self.options.status_interval_s * NS_PER_S)
        next_status = now_ns()
        while True:
            wait = max(0.0, (next_status - now_ns()) / NS_PER_S)
            try:
                kind, payload, window = self._queue.get(timeout=wait)
            except queue.Empty:
                kind = None
            if kind is _STOP:
                return
            if kind == "status" and payload is None:
                self._send("status", self.tracker.snapshot(), None)
            elif kind is not None:
                self._send(kind, payload, window)
            if now_ns() >= next_status:
                self._send("status", self.tracker.snapshot(), None)
                next_status = max(next_status + interval, now_ns() + interval // 2)

    def _header(self, kind: str, window, publish_ns: int) -> dict:
        return {
            "schema": SCHEMA_NAMES[kind], "schema_version": SCHEMA_VERSION, "topic": TOPICS[kind],
            "stream_id": self.stream_id, "seq": self._seq[kind],
            "window": None if window is None else {"t0_ns": int(window[0]), "t1_ns": int(window[1])},
            "publish_ns": publish_ns, "clock": self.anchor.to_dict(),
        }

    def _send(self, kind: str, payload: dict, window) -> None:
        zmq = self._zmq
        publish_ns = now_ns()
        header = self._header(kind, window, publish_ns)
        if kind == "estimate":
            payload = {**payload, "latency_ms": round((publish_ns - int(window[1])) / 1e6, 3)}
        frames = [TOPICS[kind].encode(), dumps(header), dumps(payload)]
        self._seq[kind] += 1
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.tracker.record_send_dropped()
        with self._lock:
            self._latest[kind] = {"topic": TOPICS[kind], "header": header, "payload": payload}
        self.tracker.record_sent(kind, header["seq"], payload, publish_ns)
