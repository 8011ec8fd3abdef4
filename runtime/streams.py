"""The estimate streams of a run: one per tracked person of every source, and a source's scene stream.

The publish stage keeps a :class:`Stream` per ``(source, face_id)`` (runtime/items.py's ``stamp.stream``):
its own fusion (smoothing, hysteresis, presence events), the windows it missed and its rate. The
:class:`StreamBook` says when a track starts (its first estimate: ``track_started``) and ends (a later
window of its source no longer lists it among the live tracks: ``track_ended``), and lists the live streams
for the status. A source's scene stream (``face_id`` None, while nobody is tracked) is dropped without an
event when a person of that source is estimated. Everything here is bounded by the live tracks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import FusionConfig
from .clock import NS_PER_S
from .fusion import Fusion

__all__ = ["Stream", "StreamBook"]

RATE_WINDOWS = 16    # estimates a stream's rate is measured over


@dataclass
class Stream:
    source: str
    face_id: int | None
    fusion: Fusion
    since_ns: int
    last_index: int | None = None
    last_t1_ns: int = 0
    estimates: int = 0
    missed: int = 0
    box: list | None = None
    dominant: str | None = None
    published_ns: deque = field(default_factory=lambda: deque(maxlen=RATE_WINDOWS))

    def rate_hz(self) -> float:
        times = self.published_ns
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return round((len(times) - 1) * NS_PER_S / (times[-1] - times[0]), 3)

    def to_status(self) -> dict:
        return {"source": self.source, "face_id": self.face_id, "box": self.box, "dominant": self.dominant,
                "rate_hz": self.rate_hz(), "estimates": self.estimates, "missed_windows": self.missed,
                "since_ns": self.since_ns, "last_estimate_ns": self.last_t1_ns}


class StreamBook:
    """``update(item, probabilities, publish_ns)`` -> (the stream's fused estimate, track events before it)."""

    def __init__(self, options: FusionConfig, labels: tuple):
        self.options, self.labels = options, labels
        self.streams: dict[tuple, Stream] = {}

    def update(self, item, probabilities, publish_ns: int) -> tuple:
        """The item's fused estimate and the track events it brings: ``[(stream key, event payload)]``
        (tracks of its source that ended, then this one's start)."""
        stamp = item.stamp
        events = self._ended(stamp.source, set(stamp.live_tracks), stamp.t1_ns)
        stream = self.streams.get(stamp.stream)
        if stream is None:
            stream = self._start(stamp, events)
        elif stream.last_index is not None and item.index > stream.last_index + 1:
            stream.missed += item.index - stream.last_index - 1
        fused = stream.fusion.update(probabilities, item.t0_ns, item.t1_ns, item.presence.flags())
        stream.last_index, stream.last_t1_ns, stream.box = item.index, item.t1_ns, stamp.box
        stream.estimates += 1
        stream.dominant = fused.dominant
        stream.published_ns.append(publish_ns)
        return fused, events

    def _start(self, stamp, events: list) -> Stream:
        if stamp.face_id is not None:
            self.streams.pop((stamp.source, None), None)   # someone is tracked: the scene stream ends
            events.append((stamp.stream, {"kind": "track_started", "t_ns": int(stamp.t1_ns),
                                          "box": [int(v) for v in stamp.box or (0, 0, 0, 0)]}))
        stream = Stream(stamp.source, stamp.face_id, Fusion(self.options, self.labels), since_ns=int(stamp.t1_ns))
        self.streams[stamp.stream] = stream
        return stream

    def _ended(self, source: str, live: set, t_ns: int) -> list:
        """The ``track_ended`` events of ``source``'s tracks that are no longer live."""
        gone = [key for key, s in self.streams.items() if s.source == source and s.face_id is not None
                and s.face_id not in live]
        events = []
        for key in gone:
            stream = self.streams.pop(key)
            events.append((key, {"kind": "track_ended", "t_ns": int(t_ns), "last_seen_ns": int(stream.last_t1_ns),
                                 "estimates": stream.estimates}))
        return events

    def status(self) -> list:
        """The live streams, for the status's ``tracks``."""
        return [s.to_status() for s in self.streams.values()]
