"""Where else the published messages go (``runtime.outputs``): a JSONL recording, an LSL outlet, a \\psi socket.

Each output is a sink of :class:`~edge_emollama.runtime.publish.Publisher`: ``sink(topic, header, payload)``
is called on the publisher's sender thread after every message it sent, and ``close()`` when it closes. A
sink that raises is disabled by the publisher (logged, counted in the status); the others go on.

- :class:`Recorder` (``--record FILE``): every message as one JSON line, flushed per line.
- :class:`LslOutlet` (``--lsl``): a Lab Streaming Layer stream of type "Emotion", one float32 channel per label.
- :class:`PsiPublisher` (``--psi ENDPOINT``): a second PUB socket in Microsoft \\psi's two-frame JSON format.

docs/outputs.md describes the formats and what was tested.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from ..config import HeartbeatConfig, OutputsConfig, SecurityConfig
from ..errors import InputError
from ..lazy import require
from ..protocol import bind_socket, dumps, kind_of
from .clock import NS_PER_S, ClockAnchor

__all__ = ["Recorder", "LslOutlet", "PsiPublisher", "make_sinks", "close_sinks", "read_recording", "anchor_of",
           "LSL_TYPE", "PARTIAL"]

log = logging.getLogger(__name__)
LSL_TYPE = "Emotion"
LSL_NAME = "edge-emollama"
PARTIAL = ".partial"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_OUTLETS = 64    # LSL outlets open at once (one per estimate stream)


# --- the clock anchor of a header ---------------------------------------------------------------------------
def anchor_of(clock: dict) -> ClockAnchor:
    """The header's ``clock`` (``{"monotonic_ns", "utc"}``) as a ClockAnchor, to turn its times into UTC."""
    utc = datetime.strptime(clock["utc"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return ClockAnchor(monotonic_ns=int(clock["monotonic_ns"]),
                       utc_ns=(utc - _EPOCH) // timedelta(microseconds=1) * 1000)


def message_time_ns(head: dict, payload: dict) -> int:
    """When a message happened, monotonic ns: its window's end, else an event's ``t_ns``, else its publish time."""
    if head.get("window"):
        return int(head["window"]["t1_ns"])
    if isinstance(payload.get("t_ns"), int):
        return payload["t_ns"]
    return int(head["publish_ns"])


# --- the JSONL recording ------------------------------------------------------------------------------------
class Recorder:
    """Every message as one JSON object a line, ``{"topic", "header", "payload"}``, flushed after each line.

    It writes to ``PATH.partial`` and renames that to ``PATH`` on ``close()``: a file named PATH is a finished
    recording; a ``.partial`` one belongs to a run that crashed (or whose recording failed) and holds every
    line but at most the last (a process crash loses only what was not yet flushed; a power cut may lose
    what the OS had not written). It grows with the session: about 2 KB per estimate, ~10 MB an hour at the
    default 0.5 s hop. An existing PATH or PATH.partial is never overwritten."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL)
        self.name = f"record {self.path}"
        self.lines = 0
        self._lock = threading.Lock()
        self._failed = False
        for existing in (self.path, self.partial):
            if existing.exists():
                raise InputError(f"the recording {existing} already exists: choose another --record FILE "
                                 "(or move that file away)")
        try:
            self._file = open(self.partial, "x", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write the recording in {self.path.parent or '.'}: {exc.strerror or exc} "
                             "(choose a writable, existing folder for --record FILE)") from exc

    def __call__(self, topic: str, head: dict, payload: dict) -> None:
        line = dumps({"topic": topic, "header": head, "payload": payload}).decode() + "\n"
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line)
                self._file.flush()
            except BaseException:
                self._failed = True   # close() then leaves the .partial: the recording is incomplete
                raise
            self.lines += 1

    def close(self) -> None:
        """Close and rename PATH.partial to PATH (a failed recording stays ``.partial``)."""
        with self._lock:
            if self._file is None:
                return
            handle, self._file = self._file, None
            handle.close()
            if self._failed:
                log.warning("the recording failed: %s is incomplete (%d lines)", self.partial, self.lines)
                return
            self.partial.replace(self.path)
            log.info("recorded %d messages to %s", self.lines, self.path)


def read_recording(path: str | Path) -> list[dict]:
    """The messages of a recording (finished or ``.partial``); a cut-off last line is skipped with a warning,
    a damaged line elsewhere is an InputError naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the recording {path}: {exc.strerror or exc} (record one with "
                         "edge-emollama run --record FILE)") from exc
    messages = []
    for number, line in enumerate(lines, 1):
        try:
            message = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                log.warning("%s: the last line is cut off (a crashed run?): skipped", path)
                break
            raise InputError(f"{path} line {number} is not JSON ({exc}): not a recording of --record") from exc
        if not isinstance(message, dict) or not {"topic", "header", "payload"} <= message.keys():
            raise InputError(f"{path} line {number} has no topic/header/payload: not a recording of --record")
        messages.append(message)
    return messages


# --- Lab Streaming Layer ------------------------------------------------------------------------------------
class LslOutlet:
    """One LSL outlet of type "Emotion" per estimate stream (each tracked person of each source, and a source's
    scene stream), opened at its first estimate: one float32 channel per label (desc/channels/channel/label,
    XDF style), nominal rate 1/hop, name ``edge-emollama <source> face-<id>``, ``source_id``
    ``<publisher stream id>/<source>/face-<id>``. Each estimate pushes its ``smoothed`` distribution stamped with
    the window's capture end ``t1_ns / 1e9``: LSL's ``local_clock()`` and the runtime's
    ``time.monotonic_ns()`` are both CLOCK_MONOTONIC on Linux, so no conversion is needed there. A person's
    outlet closes at ``track_ended``; at most :data:`MAX_OUTLETS` are open (the oldest closes first)."""

    def __init__(self, labels: Sequence[str], hop_s: float, stream_id: str | None = None, name: str = LSL_NAME):
        self._pylsl = require("pylsl")
        self.labels, self.hop_s, self.prefix = list(labels), float(hop_s), name
        self.name = "lsl"
        self.source_id = stream_id or str(uuid.uuid4())
        self._outlets: OrderedDict[tuple, object] = OrderedDict()
        self._closed = False
        self.pushed = 0

    def _info(self, source: str, person: str):
        pylsl = self._pylsl
        info = pylsl.StreamInfo(f"{self.prefix} {source} {person}", LSL_TYPE, len(self.labels), 1.0 / self.hop_s,
                                pylsl.cf_float32, f"{self.source_id}/{source}/{person}")
        desc = info.desc()
        desc.append_child_value("manufacturer", "edge-emollama")
        desc.append_child_value("source", source)
        desc.append_child_value("person", person)
        channels = desc.append_child("channels")
        for label in self.labels:
            channel = channels.append_child("channel")
            channel.append_child_value("label", label)
            channel.append_child_value("unit", "probability")
            channel.append_child_value("type", LSL_TYPE)
        return info

    def _outlet(self, head: dict):
        key = (head["source"], head["face_id"])
        if key not in self._outlets:
            person = "scene" if key[1] is None else f"face-{key[1]}"
            self._outlets[key] = self._pylsl.StreamOutlet(self._info(key[0], person))
            while len(self._outlets) > MAX_OUTLETS:
                self._outlets.popitem(last=False)   # pylsl destroys an outlet with the object
        return self._outlets[key]

    def __call__(self, topic: str, head: dict, payload: dict) -> None:
        kind = kind_of(topic)
        if self._closed or kind not in ("estimate", "event"):
            return
        if kind == "event":
            if payload["kind"] == "track_ended":
                self._outlets.pop((head["source"], head["face_id"]), None)
            return
        if payload["labels"] != self.labels:
            raise InputError(f"the estimate's labels {payload['labels']} are not the LSL outlet's {self.labels}")
        self._outlet(head).push_sample([float(p) for p in payload["smoothed"]], head["window"]["t1_ns"] / NS_PER_S)
        self.pushed += 1

    def close(self) -> None:
        self._closed = True
        self._outlets.clear()


# --- Microsoft \psi -----------------------------------------------------------------------------------------
class PsiPublisher:
    """A PUB socket in \\psi's two-frame format ``[topic, {"message": payload, "originatingTime": ISO}]`` (what
    \\psi's NetMQSource with its JSON format reads). ``originatingTime``: UTC (via the header's clock anchor) of
    the window's end for estimates, of the event for events, of the publish time for status and reasons.
    Binds loopback unless ``security`` allows more (protocol.bind_socket); sends never block."""

    def __init__(self, endpoint: str, *, security: SecurityConfig | None = None, context=None, sndhwm: int = 64,
                 heartbeat: HeartbeatConfig = HeartbeatConfig()):
        self._zmq = zmq = require("zmq")
        self.name = f"psi {endpoint}"
        self._socket, self.endpoint = bind_socket(
            context or zmq.Context.instance(), zmq.PUB, endpoint, {zmq.SNDHWM: sndhwm}, heartbeat, "the \\psi output",
            "choose another endpoint with --psi", security=security)
        self._anchor: tuple[dict, ClockAnchor] | None = None
        self.sent = self.dropped = 0

    def __call__(self, topic: str, head: dict, payload: dict) -> None:
        if self._socket is None:
            return
        t_ns = int(head["publish_ns"]) if kind_of(topic) == "status" else message_time_ns(head, payload)
        frames = [topic.encode(), dumps({"message": payload, "originatingTime": self._utc_iso(head["clock"], t_ns)})]
        try:
            self._socket.send_multipart(frames, flags=self._zmq.NOBLOCK)
            self.sent += 1
        except self._zmq.Again:
            self.dropped += 1

    def _utc_iso(self, clock: dict, t_ns: int) -> str:
        if self._anchor is None or self._anchor[0] != clock:   # one anchor per run: parsed once
            self._anchor = (clock, anchor_of(clock))
        return self._anchor[1].to_utc_iso(t_ns)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None


# --- from the configuration ---------------------------------------------------------------------------------
def make_sinks(outputs: OutputsConfig, labels: Sequence[str], hop_s: float, *, stream_id: str | None = None,
               security: SecurityConfig | None = None) -> list:
    """The sinks ``runtime.outputs`` asks for (record, lsl, psi, in that order); if one cannot be made, those
    already made are closed and its error is raised."""
    sinks: list = []
    try:
        if outputs.record:
            sinks.append(Recorder(outputs.record))
        if outputs.lsl:
            sinks.append(LslOutlet(labels, hop_s, stream_id))
        if outputs.psi:
            sinks.append(PsiPublisher(outputs.psi, security=security))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: Sequence) -> None:
    """Close each sink that has ``close()``; a failure is logged with its traceback and the others still close."""
    for sink in sinks:
        try:
            getattr(sink, "close", lambda: None)()
        except Exception:
            log.error("closing output %s failed", getattr(sink, "name", type(sink).__name__), exc_info=True)
