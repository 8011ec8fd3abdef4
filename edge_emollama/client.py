"""Clients of a running runtime: subscribe and validate (``listen``), ask the control socket (``request``),
and ask for the ``[reason]`` text of the latest window (``explain``). ``edge-emollama listen`` and
``edge-emollama explain`` are these functions.

For programs (docs/protocol.md is the contract):

- typed records, frozen dataclasses with the schema's fields: :class:`Estimate`, :class:`Event`,
  :class:`Status`, :class:`Reason` (all :class:`Record`: seq, stream_id, window, ``gap``, ``utc(t_ns)``), built
  and validated by :func:`from_message`;
- :class:`Subscriber` / :class:`AsyncSubscriber`: iterate records, ``latest()`` without blocking, ZMTP
  heartbeats, a bounded queue (RCVHWM), and counts of gaps, restarts, invalid messages and reconnections;
- :class:`Control` / :class:`AsyncControl`: ping, status, latest, schema, explain, each with a timeout
  (InputError when no reply comes; :class:`ControlError` with the reply's ``code`` when it refuses).

``listen`` prints one line per estimate (and per event; status lines with ``show_status``), reports schema
violations, ``seq`` gaps (messages lost, e.g. at the publisher's high-water mark) and publisher restarts (a new
``stream_id``) on stderr.

``keys`` (a :class:`~edge_emollama.security.ClientKeys`, from ``load_client_keys(DIR, NAME)``): connect with
CURVE to a runtime started with ``--curve``; None: plain ZMTP (a CURVE runtime then sends nothing).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TextIO

from .config import HeartbeatConfig
from .errors import InputError, did_you_mean
from .lazy import require
from .protocol import (ALL, SCHEMA_VERSION, TOPICS, kind_of, decode_message, dumps, message_errors,
                       schema_errors, set_heartbeats)
from .security import ClientKeys, connect_curve

__all__ = ["ListenResult", "listen", "format_message", "request", "explain", "Record", "Presence", "Estimate",
           "Event", "Status", "Reason", "from_message", "SubscriberCounts", "subscription_prefixes", "Subscriber",
           "AsyncSubscriber", "ControlError", "result_of", "Control", "AsyncControl"]


@dataclass
class ListenResult:
    messages: int = 0
    estimates: int = 0
    invalid: int = 0
    gaps: int = 0         # missing seq numbers, summed
    restarts: int = 0     # stream_id changes
    timed_out: bool = False
    stopped: bool = False  # the runtime said it stopped (its last status): listening ended there


def _utc_time(header: dict, t_ns: int) -> str:
    """HH:MM:SS.mmm (UTC) of a monotonic time, through the header's clock anchor."""
    anchor = header["clock"]
    utc = anchor["utc"]
    base = int(utc[11:13]) * 3600 + int(utc[14:16]) * 60 + float(utc[17:-1])
    seconds = (base + (t_ns - anchor["monotonic_ns"]) / 1e9) % 86400
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{seconds % 60:06.3f}Z"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_message(topic: str, header: dict, payload: dict) -> str:
    """One human-readable line for a (valid) message."""
    kind = kind_of(topic)
    window = header.get("window") or {}
    when = _utc_time(header, window.get("t1_ns", header["publish_ns"]))
    who = f"{header['source']}/{_person(header['face_id'])} " if "source" in header else ""
    if kind == "estimate":
        labels, raw = payload["labels"], payload["probabilities"]
        top = max(range(len(raw)), key=raw.__getitem__)
        dom, pres = payload["dominant"], payload["presence"]
        return (f"{when} {who}#{header['seq']:<5d} {dom['label']:<8s} {dom['probability']:.2f}  "
                f"(window: {labels[top]} {raw[top]:.2f})  face={_yes(pres['face']['present'])} "
                f"audio={_yes(pres['audio']['present'])}  latency={payload['latency_ms']:.0f} ms")
    if kind == "event":
        if payload["kind"] == "dominant_changed":
            detail = f"{payload['previous'] or '-'} -> {payload['current']} ({payload['probability']:.2f})"
        elif payload["kind"] == "presence_changed":
            detail = f"{payload['modality']} {'appeared' if payload['present'] else 'gone'}"
        elif payload["kind"] == "track_started":
            detail = f"at {payload['box']}"
        elif payload["kind"] == "track_ended":
            detail = f"after {payload['estimates']} estimates"
        else:
            detail = f"{payload['stage']}: {payload['message']}"
        return f"{when} {who}event {payload['kind']}: {detail}"
    if kind == "status":
        lat = payload["latency_ms"]
        return (f"{when} status {payload['state']}  {payload['rates_hz']['estimates']:.1f}/s  "
                f"latency={'-' if lat is None else format(lat['mean'], '.0f') + ' ms'}"
                + (f"  ({'; '.join(payload['reasons'])})" if payload["reasons"] else ""))
    return f"{when} reason {payload['request_id']}{' (final)' if payload['final'] else ''}: {payload['text']}"


def _person(face_id: int | None) -> str:
    return "scene" if face_id is None else f"face-{face_id}"


class _Sequence:
    """Per-topic seq gaps and stream restarts."""

    def __init__(self, result: ListenResult, err: TextIO):
        self.result, self.err = result, err
        self.stream: str | None = None
        self.last: dict[str, int] = {}

    def see(self, topic: str, header: dict) -> None:
        if self.stream is not None and header["stream_id"] != self.stream:
            self.result.restarts += 1
            self.last.clear()
            print(f"note: publisher restarted (stream {header['stream_id']})", file=self.err)
        self.stream = header["stream_id"]
        last = self.last.get(topic)
        if last is not None and header["seq"] != last + 1:
            missing = header["seq"] - last - 1
            self.result.gaps += max(missing, 0)
            print(f"note: {topic} seq {last} -> {header['seq']} ({missing} missing)", file=self.err)
        self.last[topic] = header["seq"]


def listen(endpoint: str = "tcp://127.0.0.1:5555", count: int | None = None, timeout: float | None = None, *,
           topics: tuple = (ALL,), show_status: bool = False, out: TextIO | None = None,
           err: TextIO | None = None, context=None, keys: ClientKeys | None = None,
           as_json: bool = False) -> ListenResult:
    """Subscribe to ``endpoint``; stop after ``count`` estimates, ``timeout`` seconds (None: no limit), or when
    the runtime's final status says it stopped (``result.stopped``: a listener never waits on a runtime that is
    gone for good).

    ``as_json``: print each valid message as one JSON object a line, ``{"topic", "header", "payload"}``."""
    zmq = require("zmq")
    out, err = out or sys.stdout, err or sys.stderr
    sock = _socket(zmq.SUB, context, keys)
    set_heartbeats(sock, HeartbeatConfig())
    for topic in topics:
        sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    result = ListenResult()
    seqs = _Sequence(result, err)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock.connect(endpoint)
        while (count is None or result.estimates < count) and not result.stopped:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                result.timed_out = True
                break
            if not sock.poll(250 if left is None else max(1, int(min(left, 0.25) * 1000)), zmq.POLLIN):
                continue
            _one(sock.recv_multipart(), result, seqs, show_status, out, err, as_json)
    finally:
        sock.close(0)
    return result


def _socket(kind: int, context=None, keys: ClientKeys | None = None):
    """A client socket with LINGER 0, a CURVE client when ``keys`` are given (before connect)."""
    zmq = require("zmq")
    sock = (context or zmq.Context.instance()).socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        connect_curve(sock, keys)
    return sock


def _one(frames: list[bytes], result: ListenResult, seqs: _Sequence, show_status: bool, out, err,
         as_json: bool = False) -> None:
    result.messages += 1
    try:
        topic, header, payload = decode_message(frames)
    except InputError as exc:
        result.invalid += 1
        print(f"INVALID message: {exc}", file=err)
        return
    problems = message_errors(topic, header, payload)
    if problems:
        result.invalid += 1
        print(f"INVALID {topic}: " + "; ".join(problems[:5]), file=err)
        return
    seqs.see(topic, header)
    kind = kind_of(topic)
    if kind == "estimate":
        result.estimates += 1
    if kind == "status" and payload["state"] == "stopped":
        result.stopped = True
        print(f"note: the runtime stopped (stream {header['stream_id']})", file=err)
    if show_status or kind != "status":
        line = (dumps({"topic": topic, "header": header, "payload": payload}).decode() if as_json
                else format_message(topic, header, payload))
        print(line, file=out, flush=True)


def request(endpoint: str, payload: dict | bytes, timeout_s: float = 2.0, context=None,
            keys: ClientKeys | None = None) -> dict:
    """Send one request with a fresh REQ socket and return the reply (InputError on timeout)."""
    zmq = require("zmq")
    sock = _socket(zmq.REQ, context, keys)
    try:
        sock.connect(endpoint)
        sock.send(payload if isinstance(payload, bytes) else dumps(payload))
        if not sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
            raise _no_reply(endpoint, timeout_s)
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def explain(control: str, publish: str, subtitle: str | None = None, timeout_s: float = 30.0,
            settle_s: float = 0.3, keys: ClientKeys | None = None, context=None, *,
            person: tuple | None = None) -> str:
    """The ``[reason]`` text of the latest window (``person``: ``(source, face_id)``, that person's newest
    window), all within ``timeout_s``.

    Subscribes to the reason topic first (PUB/SUB drops what is sent before a subscription takes), asks the
    control socket, then waits for the text with the request's id. A refusal is a ControlError (its ``code``)."""
    zmq = require("zmq")
    deadline = time.monotonic() + timeout_s
    sub = _socket(zmq.SUB, context, keys)
    sub.setsockopt_string(zmq.SUBSCRIBE, TOPICS["reason"])
    sub.connect(publish)
    try:
        time.sleep(min(settle_s, timeout_s / 4))
        ask = _explain_ask(subtitle, person)
        request_id = _explain_request_id(request(control, ask, timeout_s=_left(deadline), context=context,
                                                 keys=keys))
        while (left := deadline - time.monotonic()) > 0:
            if sub.poll(max(1, int(min(left, 0.2) * 1000))):
                text = _final_text(sub.recv_multipart(), request_id)
                if text is not None:
                    return text
        raise _no_explanation(timeout_s, request_id)
    finally:
        sub.close(0)


def _explain_ask(subtitle: str | None, person: tuple | None) -> dict:
    """The explain request: the subtitle when given, the person when named."""
    ask = {"verb": "explain", **({"subtitle": subtitle} if subtitle else {})}
    if person is not None:
        ask["source"], ask["face_id"] = person
    return ask


def _explain_request_id(reply: dict) -> str:
    """The queued request's id; ControlError when refused (its code) or busy (code ``busy``)."""
    result = result_of("explain", reply) or {}
    if not result.get("request_id"):
        raise ControlError("explain", result.get("status") or "unavailable",
                           result.get("message") or "another explain request is already waiting: retry shortly",
                           reply)
    return result["request_id"]


def _final_text(frames: list, request_id: str) -> str | None:
    _, _, payload = decode_message(frames)
    if payload.get("request_id") == request_id and payload.get("final"):
        return payload["text"]
    return None


def _no_explanation(timeout_s: float, request_id: str) -> InputError:
    return InputError(f"no explanation arrived within {timeout_s:g} s (request {request_id}): "
                      "raise --timeout, or lower runtime.reasoning.max_tokens")


# --- typed records -----------------------------------------------------------------------------------------
# One frozen dataclass per topic, with the schema's fields (edge_emollama/schema/estimate.schema.json) and the
# header's: ``seq``, ``stream_id``, ``publish_ns``, the window ``t0_ns``/``t1_ns`` (None for status and events
# not tied to a window), the clock anchor and ``gap`` (messages of this topic missing just before this one).
# A record built from a control reply's payload alone (``Control.status()``) has None for the header fields.

@dataclass(frozen=True, kw_only=True)
class Record:
    topic: str
    seq: int | None = None
    stream_id: str | None = None
    publish_ns: int | None = None
    t0_ns: int | None = None
    t1_ns: int | None = None
    clock_monotonic_ns: int | None = None
    clock_utc: str | None = None
    gap: int = 0
    source: str | None = None       # estimates and events: the source they are about
    face_id: int | None = None      # ... and the tracked person (None: the scene, or status/reason)

    @property
    def kind(self) -> str:
        return kind_of(self.topic)

    def utc(self, t_ns: int) -> datetime:
        """The UTC time of monotonic time ``t_ns`` of the publishing host, through the header's clock anchor."""
        if self.clock_utc is None or self.clock_monotonic_ns is None:
            raise InputError(f"this {self.kind} record has no clock anchor (it came without a header): "
                             "use a record received from the Subscriber or Control.latest()")
        anchor = datetime.strptime(self.clock_utc, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        return anchor + timedelta(microseconds=(t_ns - self.clock_monotonic_ns) // 1000)


@dataclass(frozen=True)
class Presence:
    """What the window contained (docs/protocol.md, ``presence``)."""
    video: bool
    face: bool
    audio: bool
    face_fraction: float
    audio_active: bool
    audio_rms: float
    audio_coverage: float

    @classmethod
    def from_payload(cls, presence: dict) -> "Presence":
        face, audio = presence["face"], presence["audio"]
        return cls(video=presence["video"]["present"], face=face["present"], audio=audio["present"],
                   face_fraction=face["fraction"], audio_active=audio["active"], audio_rms=audio["rms"],
                   audio_coverage=audio["coverage"])


@dataclass(frozen=True, kw_only=True)
class Estimate(Record):
    window_index: int
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    smoothed: tuple[float, ...]
    dominant_label: str
    dominant_probability: float
    dominant_since_ns: int
    smoothing: str
    presence: Presence
    timings_ms: Mapping[str, float]
    latency_ms: float
    box: tuple[int, int, int, int] | None = None   # the person's face box (x, y, w, h); None for the scene
    subtitle: str = ""
    spans: Mapping[str, Mapping] = field(default_factory=dict)

    def probability(self, label: str, smoothed: bool = True) -> float:
        """The (smoothed) probability of ``label``."""
        if label not in self.labels:
            raise InputError(f"unknown label {label!r}{did_you_mean(label, self.labels)}: use one of {self.labels}")
        return (self.smoothed if smoothed else self.probabilities)[self.labels.index(label)]


@dataclass(frozen=True, kw_only=True)
class Event(Record):
    """``kind``-specific fields are None where they do not apply: ``dominant_changed`` (previous, current,
    probability), ``presence_changed`` (modality, present), ``track_started`` (box), ``track_ended``
    (last_seen_ns, estimates), ``error`` (stage, message)."""
    event: str
    t_ns: int
    previous: str | None = None
    current: str | None = None
    probability: float | None = None
    modality: str | None = None
    present: bool | None = None
    box: tuple[int, int, int, int] | None = None
    last_seen_ns: int | None = None
    estimates: int | None = None
    stage: str | None = None
    message: str | None = None


@dataclass(frozen=True, kw_only=True)
class Status(Record):
    state: str
    reasons: tuple[str, ...]
    uptime_s: float
    rates_hz: Mapping[str, float]
    latency_ms: Mapping[str, float] | None
    presence: Mapping[str, bool] | None
    counters: Mapping[str, int]
    last_error: Mapping | None
    last_estimate_seq: int | None
    tracks: tuple[Mapping, ...] = ()   # the live streams: source, face_id, box, dominant, rate_hz, ...


@dataclass(frozen=True, kw_only=True)
class Reason(Record):
    request_id: str
    text: str
    final: bool
    label: str | None = None
    tokens: int | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)


def _header_fields(topic: str, head: dict | None, gap: int) -> dict:
    if head is None:
        return {"topic": topic, "gap": gap}
    window = head.get("window") or {}
    return {"topic": topic, "seq": head["seq"], "stream_id": head["stream_id"], "publish_ns": head["publish_ns"],
            "t0_ns": window.get("t0_ns"), "t1_ns": window.get("t1_ns"),
            "clock_monotonic_ns": head["clock"]["monotonic_ns"], "clock_utc": head["clock"]["utc"], "gap": gap,
            "source": head.get("source"), "face_id": head.get("face_id")}


def _estimate(common: dict, p: dict) -> Estimate:
    dom = p["dominant"]
    return Estimate(**common, window_index=p["window_index"], labels=tuple(p["labels"]),
                    probabilities=tuple(p["probabilities"]), smoothed=tuple(p["smoothed"]),
                    dominant_label=dom["label"], dominant_probability=dom["probability"],
                    dominant_since_ns=dom["since_ns"], smoothing=p["smoothing"],
                    presence=Presence.from_payload(p["presence"]), timings_ms=dict(p["timings_ms"]),
                    latency_ms=p["latency_ms"], box=None if p.get("box") is None else tuple(p["box"]),
                    subtitle=p.get("subtitle", ""), spans=dict(p.get("spans", {})))


def _event(common: dict, p: dict) -> Event:
    fields = {k: v for k, v in p.items() if k != "kind"}
    if fields.get("box") is not None:
        fields["box"] = tuple(fields["box"])
    return Event(**common, event=p["kind"], **fields)


def _status(common: dict, p: dict) -> Status:
    return Status(**common, **{**p, "reasons": tuple(p["reasons"]), "tracks": tuple(p.get("tracks", ()))})


def _reason(common: dict, p: dict) -> Reason:
    return Reason(**common, **p)


_BUILDERS = {"estimate": _estimate, "event": _event, "status": _status, "reason": _reason}


def from_message(topic: str, header: dict | None, payload: dict, *, validate: bool = True,
                 gap: int = 0) -> Record:
    """The typed record (Estimate, Event, Status or Reason) of one message.

    ``validate``: check it against the wire schema first (InputError listing what is wrong). ``header`` None:
    a payload without its header (the control verb ``status``), checked against the payload's definition."""
    kind = kind_of(topic)
    if kind is None:
        raise InputError(f"unknown topic {topic!r}: expected a topic under {sorted(TOPICS.values())}")
    if validate:
        problems = (message_errors(topic, header, payload) if header is not None
                    else schema_errors(kind, payload))
        if problems:
            raise InputError(f"{topic} does not follow the wire schema {SCHEMA_VERSION}: " + "; ".join(problems[:5]))
    return _BUILDERS[kind](_header_fields(topic, header, gap), payload)


# --- subscribing -------------------------------------------------------------------------------------------

@dataclass
class SubscriberCounts:
    received: int = 0       # valid records
    invalid: int = 0        # messages that were not [topic, header, payload] JSON or broke the schema
    gaps: int = 0           # missing seq numbers, summed over topics
    restarts: int = 0       # stream_id changes (the publisher restarted)
    connections: int = 0    # ZMTP handshakes that succeeded (the first connection and every reconnection)
    disconnects: int = 0
    handshake_failures: int = 0   # e.g. CURVE keys the runtime does not accept
    last_invalid: str = ""

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)


def subscription_prefixes(topics) -> tuple[str, ...]:
    """Kinds (``estimate``, ``event``, ``reason``, ``status``), full topic names or prefixes (``emollama.v2.``,
    ``emollama.v2.estimate.<source>.``, ``emollama.v2.estimate.<source>.face-<id>.``) -> the prefixes to
    subscribe to."""
    if isinstance(topics, str):
        topics = (topics,)
    out = []
    for topic in topics:
        if topic in TOPICS:
            out.append(TOPICS[topic])
        elif topic.startswith("emollama."):
            out.append(topic)
        else:
            raise InputError(f"cannot subscribe to {topic!r}{did_you_mean(topic, TOPICS)}: use a kind "
                             f"{sorted(TOPICS)}, a topic name or a prefix such as {ALL!r}")
    if not out:
        raise InputError(f"no topics to subscribe to: give at least one of {sorted(TOPICS)}")
    return tuple(out)


class _Stream:
    """What both subscribers share: frames -> record, seq gaps and restarts, the newest record per kind."""

    def __init__(self, validate: bool):
        self.validate = validate
        self.counts = SubscriberCounts()
        self.stream_id: str | None = None
        self.last_seq: dict[str, int] = {}
        self.newest: dict[str, Record] = {}

    def take(self, frames: list) -> Record | None:
        """The record of one message, or None (counted) when it is invalid."""
        # unvalidated, a malformed payload shows as KeyError/TypeError; validated, those would be bugs here
        malformed = InputError if self.validate else (InputError, KeyError, TypeError, ValueError)
        try:
            topic, head, payload = decode_message(frames)
            if self.validate:
                problems = message_errors(topic, head, payload)
                if problems:
                    raise InputError(f"{topic}: " + "; ".join(problems[:5]))
            gap = self._gap(topic, head) if isinstance(head, dict) and self._has_seq(head) else 0
            record = from_message(topic, head, payload, validate=False, gap=gap)
        except malformed as exc:
            self.counts.invalid += 1
            self.counts.last_invalid = f"{type(exc).__name__}: {exc}"[:500]
            return None
        self.counts.received += 1
        self.newest[record.kind] = record
        return record

    @staticmethod
    def _has_seq(head: dict) -> bool:
        return isinstance(head.get("seq"), int) and isinstance(head.get("stream_id"), str)

    def _gap(self, topic: str, head: dict) -> int:
        restarted = self.stream_id is not None and head["stream_id"] != self.stream_id
        if restarted:
            self.counts.restarts += 1
            self.last_seq.clear()
        first_stream = self.stream_id is None or (not restarted and self.counts.restarts == 0)
        self.stream_id = head["stream_id"]
        last = self.last_seq.get(topic)
        self.last_seq[topic] = head["seq"]
        if last is None:   # joining a running stream misses nothing; after a restart, seq 0.. were lost
            gap = 0 if first_stream else head["seq"]
        else:
            gap = max(0, head["seq"] - last - 1)
        self.counts.gaps += gap
        return gap

    def monitor_event(self, event: int) -> None:
        zmq = require("zmq")
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.counts.connections += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.counts.disconnects += 1
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self.counts.handshake_failures += 1


_MONITORED = ("EVENT_HANDSHAKE_SUCCEEDED", "EVENT_DISCONNECTED", "EVENT_HANDSHAKE_FAILED_AUTH",
              "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_NO_DETAIL")


class _SubscriberBase:
    """The SUB socket (heartbeats, RCVHWM, CURVE, a connection monitor) and the shared record logic."""

    def __init__(self, endpoint: str, topics, keys: ClientKeys | None, validate: bool, timeout_s: float | None,
                 rcvhwm: int, context, heartbeat: HeartbeatConfig):
        zmq = require("zmq")
        if rcvhwm < 1:
            raise InputError(f"rcvhwm={rcvhwm}: the subscriber's queue bound must be at least 1 message")
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.prefixes = subscription_prefixes(topics)
        self._stream = _Stream(validate)
        self._socket = self._open(zmq, context, keys, rcvhwm, heartbeat)
        self._reader = zmq.Socket.shadow(self._socket.underlying)   # sync, non-blocking reads of the same socket
        self._monitor = self._open_monitor(zmq, zmq.Context.shadow(context.underlying))
        self._reader.connect(endpoint)

    def _open(self, zmq, context, keys, rcvhwm: int, heartbeat: HeartbeatConfig):
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        set_heartbeats(sock, heartbeat)
        if keys is not None:
            connect_curve(sock, keys)
        for prefix in self.prefixes:
            sock.setsockopt_string(zmq.SUBSCRIBE, prefix)
        return sock

    def _open_monitor(self, zmq, context):
        address = f"inproc://edge-emollama-monitor-{id(self):x}-{time.monotonic_ns()}"
        events = 0
        for name in _MONITORED:
            events |= getattr(zmq, name)
        self._reader.monitor(address, events)
        monitor = context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        return monitor

    @property
    def counts(self) -> SubscriberCounts:
        return self._stream.counts

    gaps = property(lambda self: self._stream.counts.gaps)
    restarts = property(lambda self: self._stream.counts.restarts)
    invalid = property(lambda self: self._stream.counts.invalid)
    reconnects = property(lambda self: self._stream.counts.reconnects)

    @property
    def connected(self) -> bool:
        """Whether a ZMTP connection to the publisher is up (as of the last read)."""
        self._read_monitor()
        return self.counts.connections > self.counts.disconnects

    def latest(self, kind: str = "estimate") -> Record | None:
        """The newest record of ``kind`` received so far, without blocking (None if none yet).

        Reads what is already queued first (at most RCVHWM messages, in order: gaps are still counted), so a
        consumer polling at its own rate sees the newest; records read this way are not yielded again."""
        if kind not in TOPICS:
            raise InputError(f"unknown kind {kind!r}{did_you_mean(kind, TOPICS)}: use one of {sorted(TOPICS)}")
        zmq = require("zmq")
        for _ in range(self._reader.getsockopt(zmq.RCVHWM) * len(self.prefixes) + 1):
            if self._read_one() is _NOTHING:
                break
        return self._stream.newest.get(kind)

    def _read_one(self):
        """One queued message as a record, None for an invalid one, _NOTHING when none is queued."""
        zmq = require("zmq")
        self._read_monitor()
        try:
            frames = self._reader.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return _NOTHING
        return self._stream.take(frames)

    def _read_monitor(self) -> None:
        zmq = require("zmq")
        if self._monitor is None:
            return
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._stream.monitor_event(require("zmq.utils.monitor").parse_monitor_message(frames)["event"])

    def close(self) -> None:
        if self._monitor is not None:
            self._reader.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self._socket.close(0)


_NOTHING = object()
_SLICE_S = 0.1   # how often a waiting subscriber looks at its connection monitor


class Subscriber(_SubscriberBase):
    """Typed records from a running runtime's PUB socket.

    ``topics``: kinds, topic names or prefixes (:func:`subscription_prefixes`); ``validate``: check each message
    against the wire schema (invalid ones are counted in ``invalid`` and skipped); ``timeout_s``: iteration
    ends after that many seconds without a record (None: never; a subscription that includes ``status`` gets
    one about every second); ``rcvhwm``: at most this many messages wait in the socket (with the publisher's
    SNDHWM and the kernel's buffers): when the consumer is slower, what does not fit is lost and the next
    record that arrives carries the ``gap``::

        with Subscriber("tcp://127.0.0.1:5555", timeout_s=5) as sub:
            for record in sub:
                print(record.seq, record.gap, getattr(record, "dominant_label", record.kind))
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", topics=("estimate", "event"), *,
                 keys: ClientKeys | None = None, validate: bool = True, timeout_s: float | None = None,
                 rcvhwm: int = 64, context=None, heartbeat: HeartbeatConfig = HeartbeatConfig()):
        zmq = require("zmq")
        super().__init__(endpoint, topics, keys, validate, timeout_s, rcvhwm, context or zmq.Context.instance(),
                         heartbeat)

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record]:
        while (record := self.recv(self.timeout_s)) is not None:
            yield record

    def recv(self, timeout_s: float | None = None) -> Record | None:
        """The next valid record, or None when none arrives within ``timeout_s`` (None: wait for ever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self._read_one()
            if isinstance(record, Record):
                return record
            if record is None:
                continue   # an invalid message: counted, skipped
            left = _SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            self._reader.poll(max(1, int(min(left, _SLICE_S) * 1000)))


class AsyncSubscriber(_SubscriberBase):
    """:class:`Subscriber` for asyncio (``zmq.asyncio``): ``async with`` / ``async for`` / ``await recv()``;
    ``latest()`` and the counts are the same (and do not block)."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", topics=("estimate", "event"), *,
                 keys: ClientKeys | None = None, validate: bool = True, timeout_s: float | None = None,
                 rcvhwm: int = 64, context=None, heartbeat: HeartbeatConfig = HeartbeatConfig()):
        zmq_asyncio = require("zmq.asyncio")
        context = context or zmq_asyncio.Context.shadow(require("zmq").Context.instance().underlying)
        super().__init__(endpoint, topics, keys, validate, timeout_s, rcvhwm, context, heartbeat)

    async def __aenter__(self) -> "AsyncSubscriber":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __aiter__(self) -> "AsyncSubscriber":
        return self

    async def __anext__(self) -> Record:
        record = await self.recv(self.timeout_s)
        if record is None:
            raise StopAsyncIteration
        return record

    async def recv(self, timeout_s: float | None = None) -> Record | None:
        """The next valid record, or None when none arrives within ``timeout_s`` (None: wait for ever)."""
        zmq = require("zmq")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record = self._read_one()
            if isinstance(record, Record):
                return record
            if record is None:
                continue
            left = _SLICE_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            await self._socket.poll(max(1, int(min(left, _SLICE_S) * 1000)), zmq.POLLIN)


# --- the control socket ------------------------------------------------------------------------------------

class ControlError(InputError):
    """The control socket answered ``ok: false`` (or explain was ``busy``): ``code`` is the reply's
    (docs/protocol.md: bad_request, unknown_verb, unavailable, rate_limited, too_long, internal, ... or busy)."""

    def __init__(self, verb: str, code: str, message: str, reply: dict | None = None):
        super().__init__(f"the control socket refused {verb} ({code}): {message}")
        self.verb, self.code, self.reply = verb, code, reply or {}
        self.retry_after_s = (self.reply.get("error") or {}).get("retry_after_s")


def result_of(verb: str, reply: dict):
    """A control reply's ``result``; ControlError with its code when ``ok`` is false."""
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(verb, "bad_reply", f"not a control reply: {str(reply)[:200]}")
    if not reply["ok"]:
        error = reply.get("error") or {}
        raise ControlError(verb, error.get("code", "unknown"), error.get("message", ""), reply)
    return reply.get("result")


def _latest_record(kind: str, result: dict | None) -> Record | None:
    if result is None:
        return None
    return from_message(result["topic"], result["header"], result["payload"])


def _check_kind(kind: str, topics: bool = False) -> None:
    """``kind`` names a kind (or, with ``topics``, a full topic of this version); InputError otherwise."""
    if kind not in TOPICS and not (topics and kind_of(kind) is not None):
        also = " or a full topic such as emollama.v2.estimate.SOURCE.face-1." if topics else ""
        raise InputError(f"unknown kind {kind!r}{did_you_mean(kind, TOPICS)}: use one of {sorted(TOPICS)}{also}")


class Control:
    """Requests to a running runtime's control socket, each with ``timeout_s`` (InputError when no reply
    comes; ControlError, an InputError, carrying the reply's ``code`` when it refuses). Each request uses a
    fresh REQ socket, so a lost reply never wedges the next one. ``publish``: the PUB endpoint that
    ``explain`` listens to for the text."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5556", keys: ClientKeys | None = None,
                 timeout_s: float = 2.0, *, publish: str = "tcp://127.0.0.1:5555", context=None):
        self.endpoint, self.keys, self.timeout_s, self.publish, self.context = (endpoint, keys, timeout_s,
                                                                               publish, context)

    def ask(self, verb: str, timeout_s: float | None = None, **arguments):
        """The ``result`` of one request ``{"verb": verb, **arguments}``."""
        reply = request(self.endpoint, {"verb": verb, **arguments}, timeout_s or self.timeout_s, self.context,
                        self.keys)
        return result_of(verb, reply)

    def ping(self) -> dict:
        """``{"pong", "monotonic_ns", "clock", "stream_id", "schema_version"}`` of the server."""
        return self.ask("ping")

    def status(self) -> Status:
        """The status computed now (a Status without header fields)."""
        return from_message(TOPICS["status"], None, self.ask("status"))

    def latest(self, kind: str = "estimate") -> Record | None:
        """The last message the runtime sent of ``kind`` (about anyone), or on one full topic (one person's:
        ``emollama.v2.estimate.hall.face-1.``), as a record (None if none yet)."""
        _check_kind(kind, topics=True)
        return _latest_record(kind, self.ask("latest", topic=kind))

    def schema(self) -> dict:
        return self.ask("schema")

    def explain(self, subtitle: str | None = None, timeout_s: float = 30.0, *, person: tuple | None = None) -> str:
        """The ``[reason]`` text of the latest window, or of one person's (``person``: ``(source, face_id)``);
        client.explain: subscribes to the reason topic first."""
        return explain(self.endpoint, self.publish, subtitle, timeout_s, keys=self.keys, context=self.context,
                       person=person)


class AsyncControl(Control):
    """:class:`Control` for asyncio: the same methods, as coroutines."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5556", keys: ClientKeys | None = None,
                 timeout_s: float = 2.0, *, publish: str = "tcp://127.0.0.1:5555", context=None):
        zmq_asyncio = require("zmq.asyncio")
        context = context or zmq_asyncio.Context.shadow(require("zmq").Context.instance().underlying)
        super().__init__(endpoint, keys, timeout_s, publish=publish, context=context)

    async def ask(self, verb: str, timeout_s: float | None = None, **arguments):
        reply = await _request_async(self.endpoint, {"verb": verb, **arguments}, timeout_s or self.timeout_s,
                                     self.context, self.keys)
        return result_of(verb, reply)

    async def ping(self) -> dict:
        return await self.ask("ping")

    async def status(self) -> Status:
        return from_message(TOPICS["status"], None, await self.ask("status"))

    async def latest(self, kind: str = "estimate") -> Record | None:
        _check_kind(kind, topics=True)
        return _latest_record(kind, await self.ask("latest", topic=kind))

    async def schema(self) -> dict:
        return await self.ask("schema")

    async def explain(self, subtitle: str | None = None, timeout_s: float = 30.0, settle_s: float = 0.3, *,
                      person: tuple | None = None) -> str:
        zmq = require("zmq")
        deadline = time.monotonic() + timeout_s
        sub = _socket(zmq.SUB, self.context, self.keys)
        sub.setsockopt_string(zmq.SUBSCRIBE, TOPICS["reason"])
        sub.connect(self.publish)
        try:
            await asyncio.sleep(min(settle_s, timeout_s / 4))
            ask = _explain_ask(subtitle, person)
            reply = await _request_async(self.endpoint, ask, _left(deadline), self.context, self.keys)
            request_id = _explain_request_id(reply)
            while (left := deadline - time.monotonic()) > 0:
                if await sub.poll(max(1, int(min(left, 0.2) * 1000)), zmq.POLLIN):
                    text = _final_text(await sub.recv_multipart(), request_id)
                    if text is not None:
                        return text
            raise _no_explanation(timeout_s, request_id)
        finally:
            sub.close(0)


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _no_reply(endpoint: str, timeout_s: float) -> InputError:
    return InputError(f"no reply from the control socket {endpoint} within {timeout_s:g} s: is the runtime "
                      "running, is this its --control endpoint, and do --curve/--client match how it runs "
                      "(a CURVE runtime answers only allow-listed keys)?")


async def _request_async(endpoint: str, payload: dict | bytes, timeout_s: float, context,
                         keys: ClientKeys | None) -> dict:
    """:func:`request` for asyncio: a fresh REQ socket on an asyncio context."""
    zmq = require("zmq")
    sock = _socket(zmq.REQ, context, keys)
    try:
        sock.connect(endpoint)
        await sock.send(payload if isinstance(payload, bytes) else dumps(payload))
        if not await sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
            raise _no_reply(endpoint, timeout_s)
        return json.loads(await sock.recv())
    finally:
        sock.close(0)
