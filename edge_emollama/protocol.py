"""The wire protocol, version 1 (docs/protocol.md): topics, header, frames, schema validation, socket policy.

What a subscriber or a control client can rely on, in one place; the runtime's publisher and control
socket and the client (edge_emollama/client.py) all use it.

- Messages are three frames ``[topic, header, payload]``; header and payload are strict JSON
  (``allow_nan=False``). Topics are dotted and versioned, and none is a prefix of another (:data:`TOPICS`).
- The header carries the schema name and version, a per-topic ``seq``, the run's ``stream_id``, the capture
  window in monotonic ns, ``publish_ns`` and the run's UTC clock anchor (:func:`header`).
- ``edge_emollama/schema/estimate.schema.json`` (JSON Schema 2020-12) describes every message and the control
  replies; :func:`message_errors` validates one.
- Sockets bind loopback by default (:func:`bind_socket` warns otherwise) and set ZMTP heartbeats.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError, InputError
from .lazy import require

__all__ = ["TOPICS", "ALL_V1", "SCHEMA_VERSION", "SCHEMA_PATH", "dumps", "header", "encode_message",
           "decode_message", "load_schema", "schema_errors", "message_errors", "set_heartbeats", "bind_socket",
           "check_loopback"]

log = logging.getLogger(__name__)

TOPICS = {
    "estimate": "emollama.v1.estimate",
    "status": "emollama.v1.status",
    "event": "emollama.v1.event",
    "reason": "emollama.v1.reason",
}
ALL_V1 = "emollama.v1."            # subscribe to this (trailing dot) for every topic of version 1
SCHEMA_NAMES = {kind: f"emollama.{kind}" for kind in TOPICS}
SCHEMA_VERSION = "1.1.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "estimate.schema.json"
KIND_OF_TOPIC = {topic: kind for kind, topic in TOPICS.items()}


def dumps(obj) -> bytes:
    """Strict, compact JSON (NaN/Infinity refused) as UTF-8."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


def header(kind: str, stream_id: str, seq: int, window, publish_ns: int, clock: dict) -> dict:
    """The header of a ``kind`` message; ``window`` is ``(t0_ns, t1_ns)`` or None, ``clock`` the run's anchor."""
    return {
        "schema": SCHEMA_NAMES[kind], "schema_version": SCHEMA_VERSION, "topic": TOPICS[kind],
        "stream_id": stream_id, "seq": seq,
        "window": None if window is None else {"t0_ns": int(window[0]), "t1_ns": int(window[1])},
        "publish_ns": publish_ns, "clock": clock,
    }


def encode_message(kind: str, head: dict, payload: dict) -> list:
    return [TOPICS[kind].encode(), dumps(head), dumps(payload)]


def decode_message(frames: list) -> tuple:
    """``[topic, header, payload]`` frames -> ``(topic, header, payload)``; InputError when not of that form."""
    if len(frames) != 3:
        raise InputError(f"expected 3 frames [topic, header, payload], got {len(frames)}")
    try:
        topic = bytes(frames[0]).decode("utf-8")
        head, payload = json.loads(bytes(frames[1])), json.loads(bytes(frames[2]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"a frame is not UTF-8 JSON: {exc}") from exc
    return topic, head, payload


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


def schema_errors(definition: str, instance) -> list:
    """Why ``instance`` does not follow ``#/$defs/<definition>`` of the schema (empty when it does)."""
    names = load_schema()["$defs"]
    if definition not in names:
        raise ConfigError(f"no definition '{definition}' in the wire schema: use one of {sorted(names)}")
    errors = sorted(_validator(definition).iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(message)'}: {e.message}" for e in errors]


def message_errors(topic: str, head, payload) -> list:
    """Why ``[topic, header, payload]`` does not follow the schema (empty when it does)."""
    kind = KIND_OF_TOPIC.get(topic)
    if kind is None:
        return [f"unknown topic {topic!r}: expected one of {sorted(KIND_OF_TOPIC)}"]
    out = schema_errors(f"{kind}_message", {"topic": topic, "header": head, "payload": payload})
    if kind == "estimate" and not out:
        out += [f"payload/{key}: sums to {sum(payload[key])!r}, not 1" for key in ("probabilities", "smoothed")
                if abs(sum(payload[key]) - 1.0) > 1e-6]
    return out


def set_heartbeats(socket, heartbeat) -> None:
    """ZMTP heartbeats on a socket (before bind/connect): a silent TCP peer is dropped after the timeout.
    ``heartbeat``: a config.HeartbeatConfig (ivl_ms, timeout_ms, ttl_ms)."""
    zmq = require("zmq")
    socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat.ivl_ms))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat.timeout_ms))
    socket.setsockopt(zmq.HEARTBEAT_TTL, int(heartbeat.ttl_ms))


def bind_socket(context, kind: int, endpoint: str, options: dict, heartbeat, what: str, hint: str):
    """A bound socket with LINGER 0, ``options`` and ZMTP heartbeats; (socket, actual endpoint).

    ConfigError naming ``what`` and ``hint`` when the endpoint cannot be bound."""
    zmq = require("zmq")
    check_loopback(endpoint)
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(option, value)
    set_heartbeats(sock, heartbeat)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ConfigError(f"cannot bind {what} to {endpoint}: {exc} ({hint})") from exc
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


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
