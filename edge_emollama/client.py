"""Clients of a running runtime: subscribe and validate (``listen``), ask the control socket (``request``),
and ask for the ``[reason]`` text of the latest window (``explain``). ``edge-emollama listen`` and
``edge-emollama explain`` are these functions.

``listen`` prints one line per estimate (and per event; status lines with ``show_status``), reports schema
violations, ``seq`` gaps (messages lost, e.g. at the publisher's high-water mark) and publisher restarts (a new
``stream_id``) on stderr.

``keys`` (a :class:`~edge_emollama.security.ClientKeys`, from ``load_client_keys(DIR, NAME)``): connect with
CURVE to a runtime started with ``--curve``; None: plain ZMTP (a CURVE runtime then sends nothing).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .config import HeartbeatConfig
from .errors import InputError
from .lazy import require
from .protocol import ALL_V1, TOPICS, decode_message, dumps, message_errors, set_heartbeats
from .security import ClientKeys, connect_curve

__all__ = ["ListenResult", "listen", "format_message", "request", "explain"]


@dataclass
class ListenResult:
    messages: int = 0
    estimates: int = 0
    invalid: int = 0
    gaps: int = 0         # missing seq numbers, summed
    restarts: int = 0     # stream_id changes
    timed_out: bool = False


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
    kind = topic.rsplit(".", 1)[-1]
    window = header.get("window") or {}
    when = _utc_time(header, window.get("t1_ns", header["publish_ns"]))
    if kind == "estimate":
        labels, raw = payload["labels"], payload["probabilities"]
        top = max(range(len(raw)), key=raw.__getitem__)
        dom, pres = payload["dominant"], payload["presence"]
        return (f"{when} #{header['seq']:<5d} {dom['label']:<8s} {dom['probability']:.2f}  "
                f"(window: {labels[top]} {raw[top]:.2f})  face={_yes(pres['face']['present'])} "
                f"audio={_yes(pres['audio']['present'])}  latency={payload['latency_ms']:.0f} ms")
    if kind == "event":
        if payload["kind"] == "dominant_changed":
            detail = f"{payload['previous'] or '-'} -> {payload['current']} ({payload['probability']:.2f})"
        elif payload["kind"] == "presence_changed":
            detail = f"{payload['modality']} {'appeared' if payload['present'] else 'gone'}"
        else:
            detail = f"{payload['stage']}: {payload['message']}"
        return f"{when} event {payload['kind']}: {detail}"
    if kind == "status":
        lat = payload["latency_ms"]
        return (f"{when} status {payload['state']}  {payload['rates_hz']['estimates']:.1f}/s  "
                f"latency={'-' if lat is None else format(lat['mean'], '.0f') + ' ms'}"
                + (f"  ({'; '.join(payload['reasons'])})" if payload["reasons"] else ""))
    return f"{when} reason {payload['request_id']}{' (final)' if payload['final'] else ''}: {payload['text']}"


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
           topics: tuple = (ALL_V1,), show_status: bool = False, out: TextIO | None = None,
           err: TextIO | None = None, context=None, keys: ClientKeys | None = None) -> ListenResult:
    """Subscribe to ``endpoint``; stop after ``count`` estimates or ``timeout`` seconds (None: no limit)."""
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
        while count is None or result.estimates < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                result.timed_out = True
                break
            if not sock.poll(250 if left is None else max(1, int(min(left, 0.25) * 1000)), zmq.POLLIN):
                continue
            _one(sock.recv_multipart(), result, seqs, show_status, out, err)
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


def _one(frames: list[bytes], result: ListenResult, seqs: _Sequence, show_status: bool, out, err) -> None:
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
    if topic.endswith(".estimate"):
        result.estimates += 1
    if show_status or not topic.endswith(".status"):
        print(format_message(topic, header, payload), file=out, flush=True)


def request(endpoint: str, payload: dict | bytes, timeout_s: float = 2.0, context=None,
            keys: ClientKeys | None = None) -> dict:
    """Send one request with a fresh REQ socket and return the reply (InputError on timeout)."""
    zmq = require("zmq")
    sock = _socket(zmq.REQ, context, keys)
    try:
        sock.connect(endpoint)
        sock.send(payload if isinstance(payload, bytes) else dumps(payload))
        if not sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
            raise InputError(f"no reply from the control socket {endpoint} within {timeout_s:g} s: is the runtime "
                             "running, is this its --control endpoint, and do --curve/--client match how it runs "
                             "(a CURVE runtime answers only allow-listed keys)?")
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def explain(control: str, publish: str, subtitle: str | None = None, timeout_s: float = 30.0,
            settle_s: float = 0.3, keys: ClientKeys | None = None) -> str:
    """The ``[reason]`` text of the latest window, all within ``timeout_s``.

    Subscribes to the reason topic first (PUB/SUB drops what is sent before a subscription takes), asks the
    control socket, then waits for the text with the request's id."""
    zmq = require("zmq")
    deadline = time.monotonic() + timeout_s
    sub = _socket(zmq.SUB, None, keys)
    sub.setsockopt_string(zmq.SUBSCRIBE, TOPICS["reason"])
    sub.connect(publish)
    try:
        time.sleep(min(settle_s, timeout_s / 4))
        ask = {"verb": "explain", **({"subtitle": subtitle} if subtitle else {})}
        reply = request(control, ask, timeout_s=max(0.001, deadline - time.monotonic()), keys=keys)
        result = reply.get("result") or {}
        if not reply.get("ok") or not result.get("request_id"):
            raise InputError(f"explain refused: {(reply.get('error') or {}).get('message') or result.get('message')}")
        while (left := deadline - time.monotonic()) > 0:
            if sub.poll(max(1, int(min(left, 0.2) * 1000))):
                _, _, payload = decode_message(sub.recv_multipart())
                if payload.get("request_id") == result["request_id"] and payload.get("final"):
                    return payload["text"]
        raise InputError(f"no explanation arrived within {timeout_s:g} s (request {result['request_id']}): "
                         "raise --timeout, or lower runtime.reasoning.max_tokens")
    finally:
        sub.close(0)
