"""Stable ids for the faces of one source: every detected face continues a track or starts a new one.

Frames are matched in capture order. A face continues the track whose box overlaps it most (IoU at least
``match_iou``); failing that, the track whose last position it is closest to, when it moved at most
``match_shift`` of the track's box size (the mean landmark motion when both have MTCNN's 5 landmarks, else
the box centre's) -- a face turning or crossing another keeps its id. Each track takes at most one face
per frame and each face one track (best pairs first). A face no track takes starts a new track with the
next id (1, 2, ...); a track not seen for ``end_after_s`` ends. There is no face recognition: a person who
leaves for longer than that and comes back gets a new id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import TrackConfig
from ..errors import InputError
from .clock import NS_PER_S

__all__ = ["Track", "TrackedFace", "Tracker", "iou"]


@dataclass(frozen=True)
class TrackedFace:
    """A detected face and the track (person) it belongs to."""
    face_id: int
    face: object                # runtime.faces.Face


@dataclass
class Track:
    face_id: int
    face: object                # its face (runtime.faces.Face) in the last frame it was seen in
    first_ns: int
    last_ns: int
    frames: int = 1


def iou(a, b) -> float:
    """Intersection over union of two boxes (runtime.faces.FaceBox: x, y, w, h, area)."""
    w = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    h = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    inter = max(0, w) * max(0, h)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def shift(track, face) -> float:
    """How far ``face`` is from ``track``'s last face, as a fraction of that face's box size."""
    size = max(1.0, float(np.sqrt(track.box.area)))
    if track.landmarks is not None and face.landmarks is not None:
        return float(np.linalg.norm(face.landmarks - track.landmarks, axis=1).mean()) / size
    ca = np.array([track.box.x + track.box.w / 2, track.box.y + track.box.h / 2])
    cb = np.array([face.box.x + face.box.w / 2, face.box.y + face.box.h / 2])
    return float(np.linalg.norm(ca - cb)) / size


class Tracker:
    """``update(t_ns, faces)`` -> the faces with their track ids, frame by frame in capture order."""

    def __init__(self, options: TrackConfig = TrackConfig()):
        self.options = options.validate()
        self.tracks: dict[int, Track] = {}
        self.next_id = 1
        self.last_ns: int | None = None

    def update(self, t_ns: int, faces) -> tuple:
        """The faces of the frame captured at ``t_ns`` as :class:`TrackedFace` (the order given). A frame
        older than the last one is matched against the tracks without changing them (ids only)."""
        if self.last_ns is not None and t_ns < self.last_ns:
            return tuple(TrackedFace(i, f) for i, f in self._match(faces) if i is not None)
        self.last_ns = t_ns
        self._end_before(t_ns - int(self.options.end_after_s * NS_PER_S))
        out = []
        for face_id, face in self._match(faces):
            if face_id is None:
                face_id, self.next_id = self.next_id, self.next_id + 1
                self.tracks[face_id] = Track(face_id, face, t_ns, t_ns)
            else:
                track = self.tracks[face_id]
                track.face, track.last_ns, track.frames = face, t_ns, track.frames + 1
            out.append(TrackedFace(face_id, face))
        return tuple(out)

    def live_ids(self, t_ns: int) -> tuple:
        """The ids of the tracks that have not ended by ``t_ns``."""
        horizon = t_ns - int(self.options.end_after_s * NS_PER_S)
        return tuple(sorted(i for i, t in self.tracks.items() if t.last_ns >= horizon))

    def _end_before(self, horizon_ns: int) -> None:
        for face_id in [i for i, t in self.tracks.items() if t.last_ns < horizon_ns]:
            del self.tracks[face_id]

    def _match(self, faces) -> list:
        """[(track id or None, face)] in the order of ``faces``: the best pairs first, greedily."""
        for face in faces:
            if not hasattr(face, "box"):
                raise InputError(f"the tracker takes detected faces, got {type(face).__name__}")
        pairs = []
        for k, face in enumerate(faces):
            for face_id, track in self.tracks.items():
                overlap = iou(track.face.box, face.box)
                if overlap >= self.options.match_iou:
                    pairs.append((0, -overlap, k, face_id))
                else:
                    moved = shift(track.face, face)
                    if moved <= self.options.match_shift:
                        pairs.append((1, moved, k, face_id))
        taken, used, ids = set(), set(), [None] * len(faces)
        for _, _, k, face_id in sorted(pairs):
            if k not in taken and face_id not in used:
                taken.add(k)
                used.add(face_id)
                ids[k] = face_id
        return list(zip(ids, faces))
