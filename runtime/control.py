"""The control socket: small JSON requests (ping, status, latest, schema, explain) on a ROUTER socket.

A ROUTER serves REQ clients (``[identity, b"", request]``) and DEALER clients (``[identity, request]``) alike,
many at once, and a client that vanishes mid-request cannot wedge it (a reply to a gone peer is dropped).
Every request gets exactly one JSON reply (``control_reply`` in the schema):

    {"ok": true,  "verb": "...", "id": <echoed>, "result": ...}
    {"ok": false, "verb": "..." | null, "id": <echoed>, "error": {"code": "...", "message": "..."}}

Error codes: ``bad_json`` (not UTF-8 JSON), ``bad_request`` (not an object, a field of the wrong type, more
than one frame), ``unknown_verb``, ``unavailable`` (explain without a reasoning worker, or the worker cannot
take the request now), ``internal`` (the explain callback failed unexpectedly; the message says how).
A bad request never stops the loop; a socket failure does: it is logged with its traceback, kept in
:attr:`ControlServer.error` and reported through ``on_failure`` (the status then says so).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from ..config import ControlConfig
from ..errors import EdgeEmollamaError
from ..lazy import require
from ..protocol import SCHEMA_VERSION, TOPICS, bind_socket, dumps, load_schema
from .clock import ClockAnchor, now_ns, run_anchor

__all__ = ["ControlServer", "handle_request", "VERBS"]

log = logging.getLogger(__name__)
VERBS = ("ping", "status", "latest", "schema", "explain")


class _RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _reply(verb, rid, result=None, error: _RequestError | None = None) -> dict:
    if error is None:
        return {"ok": True, "verb": verb, "id": rid, "result": result}
    return {"ok": False, "verb": verb, "id": rid, "error": {"code": error.code, "message": str(error)}}


def _parse(body: bytes) -> dict:
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _RequestError("bad_json", f"the request is not UTF-8 JSON ({exc}); send e.g. {{\"verb\": \"ping\"}}")
    if not isinstance(request, dict):
        raise _RequestError("bad_request", f"the request must be a JSON object, got {type(request).__name__}")
    return request


def _request_id(request: dict):
    rid = request.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _RequestError("bad_request", "'id' must be a string, an integer or null")
    return rid


def handle_request(body: bytes, *, status: Callable[[], dict], latest: Callable[[str], dict | None],
                   explain: Callable[[dict], dict] | None = None, info: dict | None = None) -> dict:
    """One request (the frame's bytes) -> its reply object. Never raises for a bad request."""
    verb = rid = None
    try:
        request = _parse(body)
        rid = _request_id(request)
        verb = request.get("verb")
        if not isinstance(verb, str):
            verb = None
            raise _RequestError("bad_request", f"'verb' must be a string, one of {list(VERBS)}")
        if verb not in VERBS:
            raise _RequestError("unknown_verb", f"unknown verb '{verb}': use one of {list(VERBS)}")
        return _reply(verb, rid, _dispatch(verb, request, status, latest, explain, info or {}))
    except _RequestError as error:
        return _reply(verb, rid, error=error)


def _dispatch(verb: str, request: dict, status, latest, explain, info: dict):
    if verb == "ping":
        anchor = info.get("anchor") or run_anchor()
        return {"pong": True, "monotonic_ns": now_ns(), "clock": anchor.to_dict(),
                "stream_id": info.get("stream_id"), "schema_version": SCHEMA_VERSION}
    if verb == "status":
        return status()
    if verb == "latest":
        topic = request.get("topic", "estimate")
        if not isinstance(topic, str) or topic not in TOPICS:
            raise _RequestError("bad_request", f"'topic' must be one of {sorted(TOPICS)}, got {topic!r}")
        return latest(topic)
    if verb == "schema":
        return {"schema_version": SCHEMA_VERSION, "topics": dict(TOPICS), "schema": load_schema()}
    return _explain(request, explain)


def _explain(request: dict, explain):
    if explain is None:
        raise _RequestError("unavailable", "explain needs the reasoning worker, which this run does not have "
                                           "(start the runtime with reasoning enabled)")
    if "subtitle" in request and not isinstance(request["subtitle"], str):
        raise _RequestError("bad_request", "'subtitle' must be a string")
    args = {k: v for k, v in request.items() if k not in ("verb", "id")}
    try:
        result = explain(args)
        dumps(result)
    except EdgeEmollamaError as exc:  # the worker cannot do it now (e.g. nothing scored yet); it says why
        raise _RequestError("unavailable", str(exc))
    except Exception as exc:  # reported to the client as 'internal'; the loop keeps serving others
        raise _RequestError("internal", f"explain failed: {type(exc).__name__}: {exc}")
    return result


class ControlServer:
    """A ROUTER socket served by its own thread. ``start()`` binds (ConfigError if it cannot)."""

    def __init__(self, options: ControlConfig = ControlConfig(), *, status: Callable[[], dict],
                 latest: Callable[[str], dict | None], explain: Callable[[dict], dict] | None = None,
                 stream_id: str | None = None, anchor: ClockAnchor | None = None, context=None,
                 on_failure: Callable[[str, BaseException], None] | None = None):
        self.options = options
        self._on_failure = on_failure
        self._zmq = require("zmq")
        self._context = context or self._zmq.Context.instance()
        self._handlers = dict(status=status, latest=latest, explain=explain,
                              info={"stream_id": stream_id, "anchor": anchor})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket = None
        self.error: BaseException | None = None
        self.served = 0
        self.replies_dropped = 0
        self.endpoint: str | None = None

    @classmethod
    def for_publisher(cls, publisher, options: ControlConfig = ControlConfig(),
                      explain: Callable[[dict], dict] | None = None) -> "ControlServer":
        """A server answering status/latest from a :class:`~edge_emollama.runtime.publish.Publisher`, whose
        status reports the server's failure."""
        return cls(options, status=publisher.tracker.snapshot, latest=publisher.latest, explain=explain,
                   stream_id=publisher.stream_id, anchor=publisher.anchor, context=publisher._context,
                   on_failure=publisher.tracker.record_fault)

    def set_explain(self, explain: Callable[[dict], dict] | None) -> None:
        """Install (or remove) the explain callback; it must return quickly (start the work, return an id)."""
        self._handlers["explain"] = explain

    def start(self) -> "ControlServer":
        zmq, o = self._zmq, self.options
        self._socket, self.endpoint = bind_socket(
            self._context, zmq.ROUTER, o.endpoint, {zmq.SNDHWM: o.sndhwm, zmq.MAXMSGSIZE: o.max_request_bytes},
            o.heartbeat, "the control socket", "choose another endpoint with --control")
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

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop is dead: say so everywhere, estimates go on
            log.error("the control socket's thread failed; control requests are no longer answered", exc_info=True)
            self.error = exc
            if self._on_failure is not None:
                self._on_failure("control", exc)

    def _loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(self.options.poll_ms)):
                continue
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
            reply = self._answer(frames)
            if reply is not None:
                try:
                    self._socket.send_multipart(reply, zmq.NOBLOCK)
                except zmq.Again:  # the client does not read its replies; counted, the others are served
                    self.replies_dropped += 1
            self.served += 1

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        """Split the routing envelope from the body and answer (None when there is no peer identity)."""
        if len(frames) < 2:
            return None
        if b"" in frames[1:]:
            split = frames.index(b"", 1) + 1
        else:
            split = 1
        envelope, body = frames[:split], frames[split:]
        if len(body) != 1:
            reply = _reply(None, None, error=_RequestError(
                "bad_request", f"send the request as one frame, got {len(body)}"))
        else:
            reply = handle_request(body[0], **self._handlers)
        return envelope + [dumps(reply)]
