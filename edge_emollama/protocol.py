"""The wire protocol, version 2 (docs/protocol.md): topics, header, frames, schema validation, socket policy.

What a subscriber or a control client can rely on, in one place; the runtime's publisher and control
socket and the client (edge_emollama/client.py) all use it.

- Messages are three frames ``[topic, header, payload]``; header and payload are strict JSON
  (``allow_nan=False``). Topics are dotted, versioned and end with a dot, so a prefix subscription never
  matches more than meant: ``emollama.v2.estimate.`` every estimate, ``emollama.v2.estimate.<source>.`` one
  source's, ``emollama.v2.estimate.<source>.face-<id>.`` one person's (``scene`` instead of ``face-<id>``:
  the source's estimate while nobody is tracked). Events follow the same pattern; status and reason are
  one topic each (:func:`topic_of`, :func:`kind_of`).
- The header carries the schema name and version, a per-topic ``seq``, the run's ``stream_id``, the capture
  window in monotonic ns, ``publish_ns``, the run's UTC clock anchor and, for estimates and events, the
  ``source`` and ``face_id`` they are about (:func:`header`).
- ``edge_emollama/schema/estimate.schema.json`` (JSON Schema 2020-12) describes every message and the control
  replies; :func:`message_errors` validates one.
- Sockets bind loopback by default and set ZMTP heartbeats; beyond loopback only with CURVE (the keys and the
  allow-list: edge_emollama/security.py) or ``insecure`` (:func:`bind_socket`, :func:`check_loopback`).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

from .config import SecurityConfig
from .errors import ConfigError, InputError
from .lazy import require
from .security import ALLOW_CLIENTS, Security, security_of, serve_curve

__all__ = ["TOPICS", "ALL", "DEFAULT_SOURCE", "SCHEMA_VERSION", "SCHEMA_PATH", "topic_of", "kind_of",
           "check_source_name", "dumps", "header", "encode_message",
           "decode_message", "load_schema", "schema_errors", "message_errors", "set_heartbeats", "bind_socket",
           "check_loopback", "is_loopback"]

log = logging.getLogger(__name__)

ALL = "emollama.v2."               # subscribe to this for every topic of version 2
TOPICS = {kind: f"{ALL}{kind}." for kind in ("estimate", "status", "event", "reason")}   # each kind's prefix
PER_PERSON = ("estimate", "event")  # kinds whose topic names the source and the person
SCENE = "scene"                     # the topic part of a source's estimate while nobody is tracked
DEFAULT_SOURCE = "default"          # the source name of messages that were given none
SCHEMA_NAMES = {kind: f"emollama.{kind}" for kind in TOPICS}
SCHEMA_VERSION = "2.0.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "estimate.schema.json"
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_source_name(name: str) -> str:
    """``name`` when it can be a topic part (letters, digits, ``_``, ``-``); ConfigError otherwise."""
    if not isinstance(name, str) or not SOURCE_NAME.match(name):
        raise ConfigError(f"source name {name!r}: use 1-64 letters, digits, '_' or '-' (it becomes part of the "
                          "topic), e.g. --video lobby=clip.mp4")
    return name


def topic_of(kind: str, source: str | None = None, face_id: int | None = None) -> str:
    """The topic of a ``kind`` message; estimates and events name their source and person."""
    if kind not in PER_PERSON:
        return TOPICS[kind]
    person = SCENE if face_id is None else f"face-{int(face_id)}"
    return f"{TOPICS[kind]}{check_source_name(source)}.{person}."


def kind_of(topic: str) -> str | None:
    """The kind of a topic of this version (None for anything else)."""
    for kind, prefix in TOPICS.items():
        if topic == prefix or (kind in PER_PERSON and topic.startswith(prefix) and _person_topic(topic[len(prefix):])):
            return kind
    return None


def _person_topic(rest: str) -> bool:
    parts = rest.split(".")
    return (len(parts) == 3 and parts[2] == "" and bool(SOURCE_NAME.match(parts[0]))
            and (parts[1] == SCENE or re.fullmatch(r"face-[0-9]+", parts[1]) is not None))


def dumps(obj) -> bytes:
    """Strict, compact JSON (NaN/Infinity refused) as UTF-8."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


def header(kind: str, stream_id: str, seq: int, window, publish_ns: int, clock: dict,
           source: str | None = None, face_id: int | None = None) -> dict:
    """The header of a ``kind`` message; ``window`` is ``(t0_ns, t1_ns)`` or None, ``clock`` the run's anchor;
    estimates and events carry their ``source`` and ``face_id`` (None: the scene, nobody tracked)."""
    head = {
        "schema": SCHEMA_NAMES[kind], "schema_version": SCHEMA_VERSION, "topic": topic_of(kind, source, face_id),
        "stream_id": stream_id, "seq": seq,
        "window": None if window is None else {"t0_ns": int(window[0]), "t1_ns": int(window[1])},
        "publish_ns": publish_ns, "clock": clock,
    }
    if kind in PER_PERSON:
        head.update(source=source, face_id=None if face_id is None else int(face_id))
    return head


def encode_message(head: dict, payload: dict) -> list:
    """The three frames of a message whose header :func:`header` made (the topic is the header's)."""
    return [head["topic"].encode(), dumps(head), dumps(payload)]


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
    kind = kind_of(topic)
    if kind is None:
        return [f"unknown topic {topic!r}: expected a topic under {sorted(TOPICS.values())}"]
    out = schema_errors(f"{kind}_message", {"topic": topic, "header": head, "payload": payload})
    if not out and isinstance(head, dict) and head.get("topic") != topic:
        out.append(f"header/topic: {head.get('topic')!r} differs from the message's topic {topic!r}")
    if not out and kind in PER_PERSON and topic != topic_of(kind, head["source"], head["face_id"]):
        out.append(f"topic {topic!r} does not name the header's source and face_id")
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
