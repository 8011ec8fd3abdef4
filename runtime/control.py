"""The control socket: small JSON requests (ping, status, latest, schema, explain) on a ROUTER socket.

A ROUTER serves REQ clients (``[identity, b"", request]``) and DEALER clients (``[identity, request]``) alike,
many at once, and a client that vanishes mid-request cannot wedge it (a reply to a gone peer is dropped).
Every request gets exactly one JSON reply (``control_reply`` in the schema), or is counted as dropped:

    {"ok": true,  "verb": "...", "id": <echoed>, "result": ...}
    {"ok": false, "verb": "..." | null, "id": <echoed>, "error": {"code": "...", "message": "...", ...}}

Error codes: ``bad_json`` (not UTF-8 strict JSON), ``bad_request`` (not an object, a field of the wrong type,
more than one body frame, nesting deeper than :data:`MAX_DEPTH`, a lone UTF-16 surrogate, a number that is
not finite or an integer beyond 64 bits), ``too_large`` (more than ``max_request_bytes`` or
:data:`MAX_FRAMES` frames: the rest of the message is discarded unread), ``unknown_verb``, ``unavailable``
(explain without a reasoning worker, or the worker cannot take the request now), ``rate_limited`` and
``too_long`` (explain: see runtime/reasoning.py), ``internal`` (a bug while answering: logged with its
traceback). No request stops the loop. A socket failure does: it is logged with its traceback, kept in
:attr:`ControlServer.error`, reported through ``on_failure`` (the status then says so), and the loop restarts
after a short backoff (:attr:`ControlServer.restarts`).
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Callable

from ..config import ControlConfig
from ..errors import EdgeEmollamaError
from ..lazy import require
from ..protocol import SCHEMA_VERSION, TOPICS, bind_socket, dumps, kind_of, load_schema
from .clock import ClockAnchor, now_ns, run_anchor

__all__ = ["ControlServer", "RequestRefused", "handle_request", "encode_reply", "VERBS", "MAX_DEPTH",
           "MAX_FRAMES"]

log = logging.getLogger(__name__)
VERBS = ("ping", "status", "latest", "schema", "explain")
MAX_DEPTH = 32            # JSON nesting a request may have (objects and arrays)
MAX_FRAMES = 16           # frames of one message: routing envelope (proxies add hops), delimiter, body
MAX_INT_DIGITS = 20       # longer integer literals are refused before Python converts them
INT64 = 2 ** 63
RESTART_BACKOFF_S = (0.1, 5.0)   # first and longest wait before the loop restarts after a failure
_SURROGATE = re.compile("[\ud800-\udfff]")
_INTERNAL = b'{"ok":false,"verb":null,"id":null,"error":{"code":"internal","message":' \
            b'"the control server could not encode its reply (a bug, logged)"}}'

ExplainCallback = Callable[[dict, bytes], dict]   # (arguments, client identity) -> result


class RequestRefused(EdgeEmollamaError):
    """Raised by a verb's callback to refuse one request with a specific code (``rate_limited``, ``too_long``,
    ``bad_request``, ``unavailable``); ``details`` (numbers) go into the reply's ``error`` object."""

    CODES = ("bad_request", "unavailable", "rate_limited", "too_long")

    def __init__(self, code: str, message: str, **details: float):
        if code not in self.CODES:
            raise ValueError(f"RequestRefused code must be one of {self.CODES}, got {code!r}")
        super().__init__(message)
        self.code, self.details = code, details


class _RequestError(Exception):
    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.details = code, details or {}


def _reply(verb, rid, result=None, error: _RequestError | None = None) -> dict:
    if error is None:
        return {"ok": True, "verb": verb, "id": rid, "result": result}
    return {"ok": False, "verb": verb, "id": rid,
            "error": {"code": error.code, "message": str(error), **error.details}}


def encode_reply(reply: dict) -> bytes:
    """The reply as strict JSON; a reply that cannot be encoded (a bug) becomes a fixed ``internal`` one."""
    try:
        return dumps(reply)
    except (ValueError, TypeError, RecursionError):
        log.error("a control reply could not be encoded; sent 'internal' instead", exc_info=True)
        return _INTERNAL


# -- parsing: strict JSON, bounded depth, valid Unicode, finite numbers ------------------------------------
def _strict_constant(name: str):
    raise _RequestError("bad_json", f"the request holds {name}, which strict JSON does not allow; send numbers")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _RequestError("bad_request", f"an integer of {len(text)} digits: integers must fit 64 bits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _RequestError("bad_request", f"a number beyond the float range ({len(text)} characters): "
                                           "numbers must be finite")
    return value


def _too_deep() -> _RequestError:
    return _RequestError("bad_request", f"the request is nested deeper than {MAX_DEPTH} levels; "
                                        "send a flat object such as {\"verb\": \"ping\"}")


def _decode(body: bytes):
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_strict_constant, parse_int=_bounded_int,
                          parse_float=_finite_float)
    except RecursionError:          # far deeper than MAX_DEPTH: the decoder ran out of stack
        raise _too_deep() from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _RequestError("bad_json", f"the request is not UTF-8 JSON ({exc}); send e.g. {{\"verb\": \"ping\"}}")


def _check_tree(value) -> None:
    """bad_request for nesting beyond MAX_DEPTH or a lone surrogate in any key or string (never echoed)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _RequestError("bad_request", "a string holds a lone UTF-16 surrogate (U+D800 to U+DFFF), "
                                                   "which is not Unicode text; send valid UTF-8")
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep()
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _parse(body: bytes) -> dict:
    request = _decode(body)
    _check_tree(request)
    if not isinstance(request, dict):
        raise _RequestError("bad_request", f"the request must be a JSON object, got {type(request).__name__}")
    return request


def _request_id(request: dict):
    rid = request.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _RequestError("bad_request", "'id' must be a string, an integer or null")
    if isinstance(rid, int) and not -INT64 <= rid < INT64:
        raise _RequestError("bad_request", "an integer 'id' must fit 64 bits")
    return rid


def _verb(request: dict) -> str:
    verb = request.get("verb")
    if not isinstance(verb, str):
        raise _RequestError("bad_request", f"'verb' must be a string, one of {list(VERBS)}")
    return verb


# -- one request -------------------------------------------------------------------------------------------
def handle_request(body: bytes, *, status: Callable[[], dict], latest: Callable[[str], dict | None],
                   explain: ExplainCallback | None = None, info: dict | None = None,
                   client: bytes = b"") -> dict:
    """One request (the frame's bytes) from ``client`` (its routing identity) -> its reply object, which
    always encodes with :func:`encode_reply`. Never raises: a bug is logged and answered ``internal``."""
    verb = rid = None
    try:
        request = _parse(body)
        rid = _request_id(request)
        verb = _verb(request)
        if verb not in VERBS:
            unknown, verb = verb, (verb if len(verb) <= 64 else None)
            raise _RequestError("unknown_verb", f"unknown verb {unknown[:64]!r}: use one of {list(VERBS)}")
        result = _dispatch(verb, request, status, latest, explain, info or {}, client)
        dumps(result)   # a result that cannot be sent is the server's fault, answered below
        return _reply(verb, rid, result)
    except _RequestError as error:
        return _reply(verb, rid, error=error)
    except Exception as exc:   # a bug in a handler: its traceback goes to the log, the loop goes on
        log.error("the control verb %s failed (request id %r); replied 'internal'", verb, rid, exc_info=True)
        return _reply(verb, rid, error=_RequestError("internal", f"{verb or 'the request'} failed: "
                                                                 f"{type(exc).__name__}: {exc}"))


def _dispatch(verb: str, request: dict, status, latest, explain, info: dict, client: bytes):
    if verb == "ping":
        anchor = info.get("anchor") or run_anchor()
        return {"pong": True, "monotonic_ns": now_ns(), "clock": anchor.to_dict(),
                "stream_id": info.get("stream_id"), "schema_version": SCHEMA_VERSION}
    if verb == "status":
        return status()
    if verb == "latest":
        topic = request.get("topic", "estimate")
        if not isinstance(topic, str) or (topic not in TOPICS and kind_of(topic) is None):
            shown = f"{topic[:32]!r}" if isinstance(topic, str) else type(topic).__name__
            raise _RequestError("bad_request", f"'topic' must be one of {sorted(TOPICS)} or a full topic such as "
                                               f"emollama.v2.estimate.SOURCE.face-1., got {shown}")
        return latest(topic)
    if verb == "schema":
        return {"schema_version": SCHEMA_VERSION, "topics": dict(TOPICS), "schema": load_schema()}
    return _explain(request, explain, client)


def _explain(request: dict, explain: ExplainCallback | None, client: bytes):
    if explain is None:
        raise _RequestError("unavailable", "explain needs the reasoning worker, which this run does not have "
                                           "(start the runtime with reasoning enabled)")
    if "subtitle" in request and not isinstance(request["subtitle"], str):
        raise _RequestError("bad_request", "'subtitle' must be a string")
    if "source" in request and not isinstance(request["source"], str):
        raise _RequestError("bad_request", "'source' must be a source's name (a string)")
    face_id = request.get("face_id")
    if face_id is not None and (not isinstance(face_id, int) or isinstance(face_id, bool) or face_id < 1):
        raise _RequestError("bad_request", "'face_id' must be a track id (an integer >= 1) or null for the scene")
    args = {k: v for k, v in request.items() if k not in ("verb", "id")}
    try:
        return explain(args, client)
    except RequestRefused as exc:   # the worker refuses this one request with its own code
        raise _RequestError(exc.code, str(exc), exc.details)
    except EdgeEmollamaError as exc:  # the worker cannot do it now (e.g. nothing scored yet); it says why
        raise _RequestError("unavailable", str(exc))


# -- the server --------------------------------------------------------------------------------------------
@dataclass
class _Incoming:
    """One received message: the routing envelope (up to and with the empty delimiter), the body frames,
    and why it was cut (None: read whole)."""
    envelope: list
    body: list
    cut: str | None = None


def _split(frames: list) -> tuple[list, list]:
    if b"" in frames[1:]:
        split = frames.index(b"", 1) + 1
    else:
        split = 1
    return frames[:split], frames[split:]


class ControlServer:
    """A ROUTER socket served by its own thread. ``start()`` binds (ConfigError if it cannot).

    Counters: ``served`` (replies handed to ZeroMQ), ``dropped`` (replies not sent: the client does not
    read its replies), ``internal`` (replies with the code ``internal``),
    ``too_large`` (messages cut at the bound), ``restarts`` (times the loop restarted after a failure)."""

    def __init__(self, options: ControlConfig = ControlConfig(), *, status: Callable[[], dict],
                 latest: Callable[[str], dict | None], explain: ExplainCallback | None = None,
                 stream_id: str | None = None, anchor: ClockAnchor | None = None, context=None,
                 on_failure: Callable[[str, BaseException], None] | None = None, security=None):
        self.options = options
        self.security = security
        self._on_failure = on_failure
        self._zmq = require("zmq")
        self._context = context or self._zmq.Context.instance()
        self._handlers = dict(status=status, latest=latest, explain=explain,
                              info={"stream_id": stream_id, "anchor": anchor})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket = None
        self.error: BaseException | None = None
        self.served = self.dropped = self.internal = self.too_large = self.restarts = 0
        self.endpoint: str | None = None

    @classmethod
    def for_publisher(cls, publisher, options: ControlConfig = ControlConfig(),
                      explain: ExplainCallback | None = None) -> "ControlServer":
        """A server answering status/latest from a :class:`~edge_emollama.runtime.publish.Publisher`, whose
        status reports the server's failure."""
        return cls(options, status=publisher.tracker.snapshot, latest=publisher.latest, explain=explain,
                   stream_id=publisher.stream_id, anchor=publisher.anchor, context=publisher._context,
                   on_failure=publisher.tracker.record_fault, security=publisher.security)

    def set_explain(self, explain: ExplainCallback | None) -> None:
        """Install (or remove) the explain callback ``explain(args, client_identity)``; it must return quickly
        (start the work, return an id) and may raise :class:`RequestRefused`."""
        self._handlers["explain"] = explain

    def counters(self) -> dict:
        """The server's counters, for the status."""
        return {"served": self.served, "dropped": self.dropped, "internal": self.internal,
                "too_large": self.too_large, "restarts": self.restarts}

    def start(self) -> "ControlServer":
        """Bind and start the loop; a second call does nothing."""
        if self._thread is not None:
            return self
        zmq, o = self._zmq, self.options
        self._socket, self.endpoint = bind_socket(
            self._context, zmq.ROUTER, o.endpoint, {zmq.SNDHWM: o.sndhwm, zmq.MAXMSGSIZE: o.max_request_bytes},
            o.heartbeat, "the control socket", "choose another endpoint with --control", security=self.security)
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    # -- the thread: the loop, restarted after a failure ------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            served = self.served
            try:
                self._loop()
                return
            except self._zmq.ContextTerminated:   # the process is shutting down: nothing to restart
                return
            except Exception as exc:
                failures = 1 if self.served > served else failures + 1
                self._report(exc)
                first, longest = RESTART_BACKOFF_S
                if self._stop.wait(min(longest, first * 2 ** min(failures - 1, 16))):
                    return
                self.restarts += 1
                log.warning("the control socket's loop restarted (restart %d)", self.restarts)
            except BaseException as exc:   # not an error to recover from: report it and end the thread
                self._report(exc)
                return

    def _report(self, exc: BaseException) -> None:
        log.error("the control socket's loop failed; control requests are not answered until it restarts",
                  exc_info=exc)
        self.error = exc
        if self._on_failure is not None:
            self._on_failure("control", exc)

    def _loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        self._discard_rest()   # after a failure mid-message, the next frame must start a message
        while not self._stop.is_set():
            if not dict(poller.poll(self.options.poll_ms)):
                continue
            try:
                incoming = self._receive()
            except zmq.Again:   # nothing to read after all
                continue
            reply = self._answer(incoming)
            try:
                self._socket.send_multipart(reply, zmq.NOBLOCK)
                self.served += 1
            except zmq.Again:  # the client does not read its replies; counted, the others are served
                self.dropped += 1

    def _receive(self) -> _Incoming:
        """One message, frame by frame: at most MAX_FRAMES frames and max_request_bytes after the identity;
        the rest of a longer message is discarded without being kept."""
        zmq, sock, limit = self._zmq, self._socket, self.options.max_request_bytes
        frames, size, cut = [], 0, None
        while True:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
            size += len(frame) if frames else 0   # the first frame is the identity the ROUTER prepends
            if len(frames) >= MAX_FRAMES:
                cut = f"more than {MAX_FRAMES} frames"
            elif size > limit:
                cut = f"more than {limit} bytes (max_request_bytes)"
            else:
                frames.append(frame.bytes)
            if cut is not None or not sock.getsockopt(zmq.RCVMORE):
                break
        if cut is not None:
            self._discard_rest()
        envelope, body = _split(frames)
        return _Incoming(envelope, body, cut)

    def _discard_rest(self) -> None:
        zmq, sock = self._zmq, self._socket
        while sock.getsockopt(zmq.RCVMORE):
            try:
                sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return

    def _answer(self, incoming: _Incoming) -> list[bytes]:
        """The reply's frames: the envelope and one JSON frame."""
        if incoming.cut is not None:
            self.too_large += 1
            reply = _reply(None, None, error=_RequestError(
                "too_large", f"the request has {incoming.cut}; send one JSON object of at most "
                             f"{self.options.max_request_bytes} bytes in one frame"))
        elif len(incoming.body) != 1:
            reply = _reply(None, None, error=_RequestError(
                "bad_request", f"send the request as one frame, got {len(incoming.body)}"))
        else:
            # the identity the ROUTER gave the connected peer (frames after it are the client's to choose)
            reply = handle_request(incoming.body[0], client=incoming.envelope[0], **self._handlers)
        if not reply["ok"] and reply["error"]["code"] == "internal":
            self.internal += 1
        return incoming.envelope + [encode_reply(reply)]
