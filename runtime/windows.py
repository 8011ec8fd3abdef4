"""Sliding windows on the capture timeline: what every encoder needs for one prediction.

A window is ``[t0, t1)`` on the monotonic capture clock, ``t1 - t0 = W``; window ``k`` ends at
``start + W + k * H``. Audio and video of a window are cut from the same range, so they are aligned by
construction. For each window (:class:`~edge_emollama.runtime.items.WindowItem`):

- the EVA frame: the frame nearest the middle of the window (rule ``middle``, the default; ``first`` as the
  original code; ``last`` for the least latency);
- the faces of every frame (detected once per frame, tracked with stable ids and cached across overlapping
  windows, runtime/faces.py and runtime/tracks.py); one item per person tracked in at least
  ``min_face_fraction`` of the frames (the largest first, at most ``runtime.max_faces``), or one item for the
  scene (``face_id`` None) when nobody is. The people of a window share its EVA frame and audio;
- per person, one crop per frame for MAE (OpenFace-aligned, or a square box crop; black where that person's
  face was not detected, or the nearest detection with ``absent: zeros``) and VideoMAE's 16 crops (8 segments
  of 2 consecutive frames);
- ``round(W * rate)`` samples of mono audio at HuBERT's rate for HuBERT (zeros where nothing was captured);
- presence: per person, a face when at least ``min_face_fraction`` of the frames hold that person's face;
  audio when an audio source is active and the window's RMS reaches ``audio_rms_threshold``. Audio is not
  separated by speaker: every person of a window hears the same audio.

W, H and the frame rule are the manifest's (what the export recorded); ``runtime.windows`` may override
them (:meth:`WindowPlan.from_manifest` logs it). The crop size, frame count and sample rate are the model's.

Defaults, W = 2.0 s and H = 0.5 s: HuBERT and VideoMAE need context -- prosody lives in syllables and
phrases (about 0.2-2 s), a facial expression's onset-apex takes about 0.5-2 s, and 16 VideoMAE frames over
2 s sample about 8 fps, while the training clips (MER2023) last several seconds. Every second of W adds
0.5 s to the mean age of the evidence and makes HuBERT/VideoMAE dearer, so 2 s is the shortest window that
still holds a phrase and an expression. H = 0.5 s gives 2 estimates per second (a fresh answer at least
every half second, smoothed by fusion) and leaves 0.5 s of compute per window: the reference path takes about
0.15 s per window on a desktop GPU; a slower device falls behind and the scheduler then skips to the newest
window instead of queueing. Each frame lies in W/H = 4 windows; its face box is computed once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..config import ABSENT_RULES, FACE_CROPS, VIDEOMAE_SAMPLINGS, WindowConfig
from ..errors import ConfigError, InputError
from ..manifest import Manifest
from ..protocol import DEFAULT_SOURCE
from ..spec import (ALIGNED_FACE_SCALE, ALIGNED_FACE_SIZE, FEATURE_BRANCHES, FRAME_RULES, VIDEOMAE_SEGMENT_FRAMES,
                    VIDEOMAE_SEGMENTS, ModelSpec)
from .align import align_face
from .clock import NS_PER_S, now_ns
from .faces import FaceCache, crop_square
from .items import Presence, WindowItem, WindowStamp
from .sources import AudioRing, Frame, FrameRing, Source

__all__ = ["WindowPlan", "WindowBuilder", "WindowScheduler", "uniform_indices", "segment_indices"]

log = logging.getLogger(__name__)
_POLL_S = 0.05


@dataclass(frozen=True)
class WindowPlan:
    """What a window is: its span, hop and EVA frame rule; how far back each feature branch sees (context); how
    faces are cropped, VideoMAE's frames sampled and absent input treated; the model's input sizes; tuning."""
    window_s: float
    hop_s: float
    frame_rule: str
    face_size: int                      # MAE / VideoMAE encoder side (mae.image_size)
    videomae_frames: int                # videomae.frames
    sample_rate: int                    # hubert.sample_rate
    context_s: dict = field(default_factory=dict)   # mae / videomae / hubert -> seconds (missing: the window)
    face_crop: str = "openface"         # openface (aligned 112 px, scale 0.7, masked) | box (square box crop)
    videomae_sampling: str = "segments"  # segments (8 x 2 consecutive frames) | uniform
    absent: str = "encode"              # encode (black faces, silence encoded) | zeros (zero features)
    tuning: WindowConfig = field(default_factory=WindowConfig)

    @classmethod
    def for_spec(cls, spec: ModelSpec, window_s: float = 2.0, hop_s: float = 0.5, frame_rule: str = "middle",
                 context_s: dict | None = None, face_crop: str = "openface", videomae_sampling: str = "segments",
                 absent: str = "encode", **tuning) -> "WindowPlan":
        return cls(window_s, hop_s, frame_rule, spec.mae.image_size, spec.videomae.frames, spec.hubert.sample_rate,
                   dict(context_s or {}), face_crop, videomae_sampling, absent, WindowConfig(**tuning)).validate()

    @classmethod
    def from_manifest(cls, manifest: Manifest, config: WindowConfig = WindowConfig()) -> "WindowPlan":
        """The manifest's window; a value set in ``runtime.windows`` overrides it, and that is logged."""
        exported = manifest.window
        chosen = {}
        for key, recorded in (("window_s", exported.window_s), ("hop_s", exported.hop_s),
                              ("frame_rule", exported.eva_frame_rule)):
            value = getattr(config, key)
            if value is not None and value != recorded:
                log.warning("runtime.windows.%s = %s overrides the exported %s (manifest): the model sees other "
                            "windows than the export was configured and validated for", key, value, recorded)
            chosen[key] = recorded if value is None else value
        spec, extraction = manifest.spec, manifest.extraction
        return cls(face_size=spec.mae.image_size, videomae_frames=spec.videomae.frames,
                   sample_rate=spec.hubert.sample_rate, context_s=dict(extraction.context_s),
                   face_crop=extraction.face_crop, videomae_sampling=extraction.videomae_sampling,
                   absent=extraction.absent, tuning=config, **chosen).validate()

    def validate(self) -> "WindowPlan":
        if not (self.window_s > 0 and self.hop_s > 0):
            raise ConfigError(f"window_s={self.window_s}, hop_s={self.hop_s}: both must be > 0")
        if self.hop_s > self.window_s:
            raise ConfigError(f"hop_s={self.hop_s} > window_s={self.window_s} would leave gaps: use hop_s <= window_s")
        for name, value, allowed in (("frame_rule", self.frame_rule, FRAME_RULES),
                                     ("face_crop", self.face_crop, FACE_CROPS),
                                     ("videomae_sampling", self.videomae_sampling, VIDEOMAE_SAMPLINGS),
                                     ("absent", self.absent, ABSENT_RULES)):
            if value not in allowed:
                raise ConfigError(f"{name}='{value}': use one of {allowed}")
        if any(not v > 0 for v in self.context_s.values()) or set(self.context_s) - set(FEATURE_BRANCHES):
            raise ConfigError(f"context {self.context_s}: seconds > 0 for {', '.join(FEATURE_BRANCHES)}")
        self.tuning.validate()
        return self

    def context_ns(self, branch: str) -> int:
        """How far back ``branch`` sees from the window's end (the window itself when not set)."""
        return int(round(self.context_s.get(branch, self.window_s) * NS_PER_S))

    @property
    def span_ns(self) -> int:
        """The longest span anything of a window looks back: what the rings must keep."""
        return max([self.window_ns] + [self.context_ns(b) for b in FEATURE_BRANCHES])

    @property
    def crop_size(self) -> int:
        """Side of a window's face crops: OpenFace's aligned 112 px, or the encoder's side for box crops."""
        return ALIGNED_FACE_SIZE if self.face_crop == "openface" else self.face_size

    @property
    def window_ns(self) -> int:
        return int(round(self.window_s * NS_PER_S))

    @property
    def hop_ns(self) -> int:
        return int(round(self.hop_s * NS_PER_S))


def uniform_indices(n: int, count: int) -> np.ndarray:
    """``count`` indices spread uniformly over ``n`` items (segment centres; repeats when n < count)."""
    if n <= 0:
        raise InputError("cannot sample frames from an empty window")
    return np.minimum(((np.arange(count) + 0.5) * n / count).astype(np.int64), n - 1)


def segment_indices(n: int, segments: int = VIDEOMAE_SEGMENTS, length: int = VIDEOMAE_SEGMENT_FRAMES) -> np.ndarray:
    """VideoMAE's extraction sampling: ``segments`` segments of ``length`` consecutive frames, each starting in
    the middle of its segment; with too few frames every segment starts at frame 0 (repeats at the end)."""
    if n <= 0:
        raise InputError("cannot sample frames from an empty window")
    if n > segments + length - 1:
        tick = (n - length + 1) / segments
        starts = [int(tick / 2 + tick * k) for k in range(segments)]
    else:
        starts = [0] * segments
    return np.array([min(start + i, n - 1) for start in starts for i in range(length)], np.int64)


def _face_of(tracked: tuple, face_id: int | None):
    """The face of track ``face_id`` among a frame's tracked faces (None: not in that frame, or the scene)."""
    return next((t.face for t in tracked if t.face_id == face_id), None) if face_id is not None else None


def _hold_nearest(boxes: list) -> list:
    """Each missing entry replaced by the nearest present one (the earlier on a tie)."""
    have = [i for i, b in enumerate(boxes) if b is not None]
    if not have:
        return list(boxes)
    return [b if b is not None else boxes[min(have, key=lambda j: (abs(j - i), j))] for i, b in enumerate(boxes)]


class WindowBuilder:
    """Assembles a :class:`WindowItem` for any ``[t0, t1)`` from a frame ring and/or an audio ring.

    The EVA frame comes from ``[t0, t1)``; MAE's frames, VideoMAE's frames and HuBERT's audio from their
    context ``[t1 - context, t1)``. Face crops follow ``plan.face_crop``; a frame without a detected face is
    black (``absent: encode``, as OpenFace wrote it) or borrows the nearest detection (``absent: zeros``)."""

    def __init__(self, frames: FrameRing | None, audio: AudioRing | None, plan: WindowPlan,
                 faces: FaceCache | None = None):
        if frames is None and audio is None:
            raise ConfigError("a window needs a video source, an audio source or both")
        self.plan = plan.validate()
        if audio is not None and audio.sample_rate != plan.sample_rate:
            raise ConfigError(f"audio ring at {audio.sample_rate} Hz but windows want {plan.sample_rate} Hz: "
                              "capture at the model's rate")
        if faces is None and frames is not None:
            raise ConfigError("a window with video needs a face cache (runtime.faces)")
        self.frames, self.audio, self.faces = frames, audio, faces

    def build(self, index: int, t0_ns: int, t1_ns: int, source: str = DEFAULT_SOURCE) -> list[WindowItem]:
        """The window's items: one per person tracked in at least ``min_face_fraction`` of its frames (the
        largest first, at most the face cache's ``max_faces``), or one for the scene (``face_id`` None) when
        nobody is. They share the EVA frame and the audio; each has its own crops and presence."""
        started, plan = time.perf_counter(), self.plan
        frames = self._frames_between(t1_ns - plan.context_ns("mae"), t1_ns)
        tracked = [self.faces.get(f.t_ns, f.image) for f in frames]
        shared_ms = {"faces_ms": (time.perf_counter() - started) * 1e3}
        spans: dict[str, dict] = {}
        chosen = self._pick_frame(self._frames_between(t0_ns, t1_ns), (t0_ns + t1_ns) // 2)
        if chosen is not None:
            spans["eva"] = {"t0_ns": chosen.t_ns, "t1_ns": chosen.t_ns, "frames": 1}
        audio, coverage, rms = self._audio(t1_ns - plan.context_ns("hubert"), t1_ns, spans)
        active = self.audio is not None and coverage > 0
        heard = dict(audio=active and rms >= plan.tuning.audio_rms_threshold, audio_active=active, audio_rms=rms,
                     audio_coverage=coverage)
        if plan.absent == "zeros" and not heard["audio"]:
            audio = None                           # HuBERT gives its zero row for silence
        people = self._people(tracked, len(frames))
        live = sorted(set(self.faces.live_ids(t1_ns) if self.faces is not None else ()) | set(people))
        items = []
        for face_id in people or [None]:
            timings, person_spans = dict(shared_ms), dict(spans)
            vision, fraction, present, box = self._vision(frames, [_face_of(t, face_id) for t in tracked], t1_ns,
                                                          timings, person_spans, face_id)
            presence = Presence(video=bool(frames) or chosen is not None, face=present, face_fraction=fraction,
                                **heard)
            timings["window_ms"] = (time.perf_counter() - started) * 1e3
            stamp = WindowStamp(index, t0_ns, t1_ns, presence, timings, spans=person_spans, source=source,
                                face_id=face_id, box=box, live_tracks=live)
            items.append(WindowItem(stamp=stamp, audio=audio, frame=chosen.image if chosen else None,
                                    frame_t_ns=chosen.t_ns if chosen else None, **vision))
        return items

    def _frames_between(self, t0_ns: int, t1_ns: int) -> list:
        return self.frames.between(t0_ns, t1_ns) if self.frames is not None else []

    def _people(self, tracked: list, frames: int) -> list:
        """The ids seen in enough of the frames, the largest (mean box area) first, at most ``max_faces``."""
        seen: dict[int, list] = {}
        for faces in tracked:
            for person in faces:
                seen.setdefault(person.face_id, []).append(person.face.box.area)
        needed = max(1, self.plan.tuning.min_face_fraction * frames)
        people = [i for i, areas in seen.items() if len(areas) >= needed]
        people.sort(key=lambda i: -float(np.mean(seen[i])))
        return people[:self.faces.max_faces] if self.faces is not None else []

    def _vision(self, frames: list, faces: list, t1_ns: int, timings: dict, spans: dict, face_id) -> tuple:
        """One person's MAE and VideoMAE inputs: (item fields, fraction of frames with the face, whether that
        makes the face present, its last box)."""
        plan = self.plan
        detected = np.array([f is not None for f in faces], bool)
        fraction = float(detected.mean()) if detected.size else 0.0
        present = bool(detected.any()) and fraction >= plan.tuning.min_face_fraction
        encode = plan.absent == "encode" and bool(frames) or present
        started = time.perf_counter()
        used = faces if plan.absent == "encode" else _hold_nearest(faces)
        size = plan.crop_size
        crops = (np.stack([self._crop(fr.image, fa) for fr, fa in zip(frames, used)]) if encode
                 else np.zeros((0, size, size, 3), np.uint8))
        timings["crops_ms"] = (time.perf_counter() - started) * 1e3
        times = np.array([f.t_ns for f in frames], np.int64)
        video = self._videomae(frames, times, crops, t1_ns, encode, face_id)
        if frames:
            spans["mae"] = {"t0_ns": int(times[0]), "t1_ns": int(times[-1]), "frames": int(times.size)}
        if video["videomae_times_ns"] is not None:
            v = video["videomae_times_ns"]
            spans["videomae"] = {"t0_ns": int(v.min()), "t1_ns": int(v.max()), "frames": int(v.size)}
        boxes = [f.box if f is not None else None for f in used]
        last = next((f.box for f in reversed(faces) if f is not None), None)
        return dict(frame_times_ns=times, face_detected=detected, face_crops=crops,
                    face_boxes=np.array([[b.x, b.y, b.w, b.h] if b else [-1] * 4 for b in boxes],
                                        np.int32).reshape(-1, 4), **video), fraction, present, \
            None if last is None else [last.x, last.y, last.w, last.h]

    def _crop(self, image: np.ndarray, face) -> np.ndarray:
        """One frame's face crop: aligned (OpenFace), a square box crop, or black without a face."""
        size = self.plan.crop_size
        if face is None:
            return np.zeros((size, size, 3), np.uint8)
        if self.plan.face_crop == "openface" and face.landmarks is not None:
            return align_face(image, face.landmarks, ALIGNED_FACE_SIZE, ALIGNED_FACE_SCALE)
        return crop_square(image, face.box, size, self.plan.tuning.face_margin)

    def _videomae(self, frames: list, times: np.ndarray, crops: np.ndarray, t1_ns: int, encode: bool,
                  face_id: int | None) -> dict:
        """VideoMAE's frames from its own context (a subset of MAE's when shorter, the crops reused)."""
        plan = self.plan
        if not encode or not frames:
            return {"videomae_frames": None, "videomae_times_ns": None}
        keep = np.nonzero(times >= t1_ns - plan.context_ns("videomae"))[0]
        if keep.size == 0 or plan.context_ns("videomae") > plan.context_ns("mae"):
            extra = self._frames_between(t1_ns - plan.context_ns("videomae"), t1_ns)
            faces = [_face_of(self.faces.get(f.t_ns, f.image), face_id) for f in extra]
            faces = faces if plan.absent == "encode" else _hold_nearest(faces)
            crops = np.stack([self._crop(fr.image, fa) for fr, fa in zip(extra, faces)])
            times, keep = np.array([f.t_ns for f in extra], np.int64), np.arange(len(extra))
        pick = (segment_indices(keep.size) if plan.videomae_sampling == "segments"
                else uniform_indices(keep.size, plan.videomae_frames))
        return {"videomae_frames": crops[keep[pick]], "videomae_times_ns": times[keep[pick]]}

    def _pick_frame(self, frames: list[Frame], middle_ns: int) -> Frame | None:
        if not frames:
            return None
        if self.plan.frame_rule == "first":
            return frames[0]
        if self.plan.frame_rule == "last":
            return frames[-1]
        return min(frames, key=lambda f: abs(f.t_ns - middle_ns))

    def _audio(self, t0_ns: int, t1_ns: int, spans: dict) -> tuple[np.ndarray | None, float, float]:
        if self.audio is None:
            return None, 0.0, 0.0
        samples, coverage = self.audio.read(t0_ns, t1_ns)
        rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
        spans["hubert"] = {"t0_ns": int(t0_ns), "t1_ns": int(t1_ns), "coverage": round(float(coverage), 4)}
        return samples, coverage, rms


class WindowScheduler:
    """Cuts windows every hop as capture proceeds; the newest ready window wins when live and behind.

    ``video`` supplies ``.frames`` and ``audio`` supplies ``.audio`` (the same VideoFileSource may be both;
    either may be None). The sources must be started. A file's windows follow its own timeline from its
    earliest track; a live source that is late or lost leaves its part of the window absent (``presence``
    says so) while the windows go on. ``next_window(timeout_s)`` returns the next window,
    or None on timeout or at the end (then ``ended`` is true); a failed source's error is raised from it.
    """

    def __init__(self, video: Source | None, audio: Source | None, plan: WindowPlan,
                 faces: FaceCache | None = None, history_s: float = 0.0, name: str = DEFAULT_SOURCE):
        """``history_s``: audio and frames the rings keep behind a window's end besides its own span (speech
        recognition reads the last seconds of audio after the window was cut). ``name``: the source's name,
        stamped on its items."""
        self.plan = plan.validate()
        self.name = name
        self._pending: deque = deque()   # the other people's items of the window last cut
        self._keep_ns = max(plan.span_ns, int(round(history_s * NS_PER_S)))
        self._frames = video.frames if video is not None else None
        self._audio = audio.audio if audio is not None else None
        self._sources = [s for s in dict.fromkeys(x for x in (video, audio) if x is not None)]
        self._feeds = [(s, r) for s, r in ((video, self._frames), (audio, self._audio)) if r is not None]
        if not self._feeds:
            raise InputError("no capture: the video source has no frames and the audio source no audio "
                             "(give a camera, a microphone or a file with at least one track)")
        self.builder = WindowBuilder(self._frames, self._audio, plan, faces)
        span_s = self._keep_ns / NS_PER_S + plan.hop_s
        if self._audio is not None and self._audio.capacity < span_s * plan.sample_rate:
            raise ConfigError(f"the audio buffer of {audio.name} holds {self._audio.capacity / plan.sample_rate:.1f}"
                              f" s, less than the longest context + H = {span_s} s: raise its ring_seconds")
        live = all(s.realtime for s in self._sources)
        self.drop_stale = live if plan.tuning.drop_stale is None else plan.tuning.drop_stale
        self._cond = threading.Condition()
        for _, ring in self._feeds:
            ring.add_listener(self._wake)
        self.start_ns: int | None = None
        self._start_deadline: int | None = None
        self.next_index = 0
        self.dropped = 0
        self.ended = False

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __iter__(self):
        while True:
            window = self.next_window(timeout_s=None)
            if window is None:
                return
            yield window

    # --- timeline -----------------------------------------------------------------------------------------
    def _t1(self, index: int) -> int:
        return self.start_ns + self.plan.window_ns + index * self.plan.hop_ns

    @staticmethod
    def _first(ring) -> int | None:
        return ring.first_t_ns() if isinstance(ring, FrameRing) else ring.start_ns()

    @staticmethod
    def _end(ring) -> int | None:
        """Capture time up to which the ring is complete (exclusive for audio, the newest frame for video)."""
        return ring.last_t_ns() if isinstance(ring, FrameRing) else ring.end_ns()

    def _try_start(self, deadline_ns: int) -> None:
        """Fix the timeline's start. A file's tracks start where its container says (the earliest track's
        start: a track that starts later is absent until then, nothing waits for it); a live feed's start is
        its first capture, waited for up to ``start_timeout_s``; with both, the later of the two."""
        live = [(s, r) for s, r in self._feeds if r.known_start_ns is None]
        filed = [r.known_start_ns for _, r in self._feeds if r.known_start_ns is not None]
        firsts = [(s, r, self._first(r)) for s, r in live]
        waiting = [s for s, r, t in firsts if t is None and not (s.finished or r.complete)]
        if waiting and now_ns() < deadline_ns:
            return
        if waiting:
            raise InputError(f"{waiting[0].kind} {waiting[0].name} delivered nothing within "
                             f"{self.plan.tuning.start_timeout_s} s of the start: check the device or its cable")
        known = [t for _, _, t in firsts if t is not None] + ([min(filed)] if filed else [])
        if not known:
            self.ended = True
        else:
            self.start_ns = max(known)

    def _feed_done(self, source: Source, ring, t1_ns: int) -> bool:
        """Nothing more of ``[.., t1)`` will come from this feed: it reached t1, its writer is done, or it is a
        file's track that starts at or after t1 (absent from this window)."""
        end = self._end(ring)
        if end is not None and end >= t1_ns or ring.complete or source.finished:
            return True
        return ring.known_start_ns is not None and ring.known_start_ns >= t1_ns

    def _ready(self, t1_ns: int) -> bool:
        slack = int(self.plan.tuning.max_wait_s * NS_PER_S)
        for source, ring in self._feeds:
            if self._feed_done(source, ring, t1_ns):
                continue
            if source.realtime and now_ns() >= t1_ns + slack:
                continue   # live: a late or lost feed is absent from the window, the windows go on
            return False
        return True

    def _past_end(self, t1_ns: int) -> bool:
        """Every feed is done and the window reaches beyond every ring's data."""
        if not all(ring.complete or source.finished for source, ring in self._feeds):
            return False
        ends = [e for e in (self._end(r) for _, r in self._feeds) if e is not None]
        return not ends or t1_ns > max(ends)

    def _check(self) -> None:
        for source in self._sources:
            source.check()
        for source, ring in self._feeds:
            if ring.block_when_full and self._stuck(ring):
                raise ConfigError(f"the {source.kind} buffer of {source.name} is full but holds less than a window's "
                                  f"span of {self.plan.span_ns / NS_PER_S:g} s: raise its ring_seconds above the "
                                  "longest context + H")

    def _stuck(self, ring) -> bool:
        if self.start_ns is None or not isinstance(ring, FrameRing) or len(ring) < ring.capacity:
            return False
        t0 = self._t1(self.next_index) - self.plan.span_ns
        first, last = ring.first_t_ns(), ring.last_t_ns()
        return first is not None and last is not None and first >= t0 and last < self._t1(self.next_index)

    # --- the loop -------------------------------------------------------------------------------------------
    def next_window(self, timeout_s: float | None = None) -> WindowItem | None:
        """The next item once its window's data is in (None on timeout, or at the end with ``ended`` set):
        the items of one window (one per person, runtime/windows.py's WindowBuilder.build) come one by one.

        While it waits, it detects faces on frames already captured, so that a window finds most of its
        face boxes cached. One consumer only.
        """
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout_s is None else now_ns() + int(timeout_s * NS_PER_S)
        if self._start_deadline is None:
            self._start_deadline = now_ns() + int(self.plan.tuning.start_timeout_s * NS_PER_S)
        while True:
            busy = self._faces_pending()  # frames to detect: check readiness without waiting, then detect one
            step = now_ns() + (0 if busy else int(_POLL_S * NS_PER_S))
            span = self._next_span(step if deadline is None else min(step, deadline))
            if span is not None:
                break
            if self.ended or (deadline is not None and now_ns() >= deadline):
                return None
            if busy:
                self._prefetch_faces()
        index, t0, t1 = span
        items = self.builder.build(index, t0, t1, self.name)  # outside the lock: capture never waits on it
        for _, ring in self._feeds:
            ring.discard_before(self._t1(index + 1) - self._keep_ns)
        self._pending.extend(items[1:])
        return items[0]

    def tracked_frames(self, t0_ns: int, t1_ns: int) -> list:
        """[(frame, its tracked faces)] captured in ``[t0, t1)`` that the ring still holds (annotation)."""
        if self._frames is None or self.builder.faces is None:
            return []
        return [(f, self.builder.faces.get(f.t_ns, f.image)) for f in self._frames.between(t0_ns, t1_ns)]

    def _undetected(self) -> list[Frame]:
        if self._frames is None or self.builder.faces is None:
            return []
        cache = self.builder.faces
        return [f for f in self._frames.between(-2**62, 2**62) if not cache.has(f.t_ns)]

    def _faces_pending(self) -> bool:
        return bool(self._undetected())

    def _prefetch_faces(self, budget_s: float = 0.01) -> None:
        """Detect faces on captured frames not yet seen, oldest first, for about ``budget_s``."""
        stop = time.perf_counter() + budget_s
        for frame in self._undetected():
            self.builder.faces.get(frame.t_ns, frame.image)
            if time.perf_counter() >= stop:
                return

    def _next_span(self, deadline: int) -> tuple[int, int, int] | None:
        with self._cond:
            while not self.ended:
                self._check()
                if self.start_ns is None:
                    self._try_start(self._start_deadline)
                if self.start_ns is not None and not self.ended:
                    t1 = self._t1(self.next_index)
                    if self._past_end(t1):
                        self.ended = True
                        break
                    if self._ready(t1):
                        return self._take()
                left = (deadline - now_ns()) / NS_PER_S
                if left <= 0:
                    return None
                self._cond.wait(left)
        return None

    def _take(self) -> tuple[int, int, int]:
        """Claim the next window (skipping to the newest ready one when dropping stale windows)."""
        if self.drop_stale:
            while not self._past_end(self._t1(self.next_index + 1)) and self._ready(self._t1(self.next_index + 1)):
                self.next_index += 1
                self.dropped += 1
        index = self.next_index
        self.next_index += 1
        t1 = self._t1(index)
        return index, t1 - self.plan.window_ns, t1
