"""The wire protocol, version 1 (docs/protocol.md): topics, header, frames, schema validation, socket policy.

What a subscriber or a control client can rely on, in one place; the runtime's publisher and control
socket and the client (edge_emollama/client.py) all use it.

- Messages are three frames ``[topic, header, payload]``; header and payload are strict JSON
  (``allow_nan=False``). Topics are dotted and versioned, and none is a prefix of another (:data:`TOPICS`).
- The header carries the schema name and version, a per-topic ``seq``, the run's ``stream_id``, the capture
  window in monotonic ns, ``publish_ns`` and the run's UTC clock anchor (:func:`header`).
- ``edge_emollama/schema/estimate.schema.json`` (JSON Schema 2020-12) describes every message and the control
  replies; :func:`message_errors` validates one.
- Sockets bind loopback by default and set ZMTP heartbeats; beyond loopback only with CURVE (the keys and the
  allow-list: edge_emollama/security.py) or ``insecure`` (:func:`bind_socket`, :func:`check_loopback`).
"""
from __future__ import annotations

import ipaddress
import json
import logging
from functools import lru_cache
from pathlib import Path

from .config import SecurityConfig
from .errors import ConfigError, InputError
from .lazy import require
from .security import ALLOW_CLIENTS, Security, security_of, serve_curve

__all__ = ["TOPICS", "ALL_V1", "SCHEMA_VERSION", "SCHEMA_PATH", "dumps", "header", "encode_message",
           "decode_message", "load_schema", "schema_errors", "message_errors", "set_heartbeats", "bind_socket",
           "check_loopback", "is_loopback"]

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


def bind_socket(context, kind: int, endpoint: str, options: dict, heartbeat, what: str, hint: str, *,
                security: "Security | SecurityConfig | None" = None, allow: str = ALLOW_CLIENTS):
    """A bound socket with LINGER 0, ``options`` and ZMTP heartbeats; (socket, actual endpoint).

    ``security`` (``runtime.security`` or a loaded :class:`~edge_emollama.security.Security`; None: no CURVE,
    loopback only): with CURVE keys the socket is a CURVE server accepting only the ``allow`` list's keys;
    without, a bind beyond loopback is a ConfigError unless ``insecure`` (:func:`check_loopback`).
    ConfigError naming ``what`` and ``hint`` when the endpoint cannot be bound."""
    zmq = require("zmq")
    policy = security_of(security)
    check_loopback(endpoint, policy, what)
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(option, value)
    set_heartbeats(sock, heartbeat)
    if policy.keys is not None:
        serve_curve(sock, context, policy.keys, allow)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise ConfigError(f"cannot bind {what} to {endpoint}: {exc} ({hint})") from exc
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` stays on this host: inproc, ipc, or TCP on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # an interface name or a host name: reachable from elsewhere


def check_loopback(endpoint: str, security: "Security | SecurityConfig | None" = None,
                   what: str = "a socket") -> None:
    """The bind policy: beyond loopback only with CURVE, or with ``insecure`` (then a warning).

    ConfigError naming the endpoint and both fixes otherwise; ``security`` None means no CURVE, not insecure."""
    policy = security_of(security)
    if is_loopback(endpoint) or policy.keys is not None:
        return
    if not policy.insecure:
        raise ConfigError(f"refusing to bind {what} to {endpoint} without encryption: it is reachable from other "
                          "hosts. Use --curve DIR (keys from: edge-emollama keys DIR --client NAME; "
                          "runtime.security.curve) to encrypt and allow-list clients, or --insecure "
                          "(runtime.security.insecure) on a trusted network, or bind tcp://127.0.0.1:PORT")
    log.warning("binding %s to %s: reachable from other hosts, unencrypted and unauthenticated (--insecure); "
                "use --curve DIR unless the network is trusted", what, endpoint)
