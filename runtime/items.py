"""What crosses a stage link: one typed item per link, and the one codec that carries them.

    capture --WindowItem--> encode --RowsItem--> llm --ScoresItem--> publish      (EndOfInput closes a link)

Every item carries a :class:`WindowStamp`: the window's index and capture span, what was present, the
timings every stage added and how many windows were lost upstream. The codec turns an item into multipart
frames ``[meta JSON, array bytes...]`` (numpy arrays travel as raw buffers, without copying) and back; the
item's class name travels in the meta, so a stage in another process rebuilds the same type.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..errors import InputError
from ..protocol import DEFAULT_SOURCE
from ..spec import ALIGNED_FACE_SIZE

__all__ = ["Presence", "WindowStamp", "WindowItem", "RowsItem", "ScoresItem", "EndOfInput", "encode", "decode"]


@dataclass(frozen=True)
class Presence:
    """What the window held: video at all, a face in enough of its frames, audio above the threshold."""
    video: bool
    face: bool
    face_fraction: float
    audio: bool
    audio_active: bool          # an audio source delivered samples for the window
    audio_rms: float
    audio_coverage: float       # fraction of the window's samples that were captured

    def to_wire(self) -> dict:
        """The ``presence`` object of an estimate payload."""
        return {"video": {"present": self.video},
                "face": {"present": self.face, "fraction": round(self.face_fraction, 4)},
                "audio": {"present": self.audio, "active": self.audio_active, "rms": round(self.audio_rms, 6),
                          "coverage": round(self.audio_coverage, 4)}}

    def flags(self) -> dict:
        """{modality: present} for fusion's presence events and the status."""
        return {"video": self.video, "face": self.face, "audio": self.audio}


@dataclass
class WindowStamp:
    index: int
    t0_ns: int                  # capture window [t0, t1) on the monotonic clock
    t1_ns: int
    presence: Presence
    timings_ms: dict = field(default_factory=dict)   # every stage adds its own
    dropped: int = 0            # windows lost upstream so far (scheduler skips, link replacements)
    sent_ns: int = 0            # when the item was handed to its link
    spans: dict = field(default_factory=dict)        # branch -> {t0_ns, t1_ns, frames | coverage}: what it saw
    subtitle: str | None = None                      # the text the prompt used (set by the LLM stage)
    source: str = DEFAULT_SOURCE                     # the source's name
    face_id: int | None = None                       # the tracked person (None: the scene, nobody tracked)
    box: list | None = None                          # the person's last box in the window [x, y, w, h]
    live_tracks: list = field(default_factory=list)  # the source's live track ids when the window was cut

    @property
    def stream(self) -> tuple:
        """(source, face_id): whose estimate stream the item belongs to."""
        return self.source, self.face_id

    def timed(self, sent_ns: int, dropped_here: int = 0, **timings_ms: float) -> "WindowStamp":
        """The stamp for the next link: these timings added, ``dropped_here`` more windows lost (the stage's
        inbox replacements so far), handed over at ``sent_ns``."""
        return dataclasses.replace(self, timings_ms={**self.timings_ms, **{k: float(v) for k, v in timings_ms.items()}},
                                   dropped=self.dropped + dropped_here, sent_ns=sent_ns)


class _Stamped:
    """``index``, ``t0_ns``, ``t1_ns`` and ``presence`` of the item's stamp, read directly."""
    stamp: WindowStamp

    @property
    def index(self) -> int:
        return self.stamp.index

    @property
    def t0_ns(self) -> int:
        return self.stamp.t0_ns

    @property
    def t1_ns(self) -> int:
        return self.stamp.t1_ns

    @property
    def presence(self) -> Presence:
        return self.stamp.presence


@dataclass
class WindowItem(_Stamped):
    """capture -> encode: the raw inputs of one window (RGB uint8 images, float32 PCM) and their capture times."""
    stamp: WindowStamp
    frame: np.ndarray | None                 # EVA frame, RGB uint8 [H, W, 3]; None without video
    frame_t_ns: int | None
    frame_times_ns: np.ndarray               # int64 [N]: every frame of the window
    face_boxes: np.ndarray                   # int32 [N, 4] x, y, w, h used for each crop; -1 without a face
    face_detected: np.ndarray                # bool [N]: a face was detected in that very frame
    face_crops: np.ndarray                   # uint8 [N, S, S, 3] (MAE) when a face is present, else [0, S, S, 3]
    videomae_frames: np.ndarray | None       # uint8 [F, S, S, 3] when a face is present
    videomae_times_ns: np.ndarray | None     # int64 [F]
    audio: np.ndarray | None                 # float32 [round(W * rate)]; None without an audio source


@dataclass
class RowsItem(_Stamped):
    """encode -> llm: the media block [media_rows, hidden] float32 in the documented order."""
    stamp: WindowStamp
    rows: np.ndarray


@dataclass
class ScoresItem(_Stamped):
    """llm -> publish: the window's label distribution (prompt order)."""
    stamp: WindowStamp
    probabilities: np.ndarray


@dataclass(frozen=True)
class EndOfInput:
    """The last item on a link: the input ended (or the run stops); downstream stages finish."""


_TYPES = {cls.__name__: cls for cls in (WindowItem, RowsItem, ScoresItem, EndOfInput)}


def encode(item) -> list:
    """An item -> frames; arrays travel as raw buffers, everything else as strict JSON."""
    meta, buffers, arrays = {"type": type(item).__name__}, [], []
    for f in fields(item):
        value = getattr(item, f.name)
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            arrays.append([f.name, array.dtype.str, list(array.shape)])
            buffers.append(memoryview(array).cast("B") if array.size else b"")
        elif isinstance(value, WindowStamp):
            meta[f.name] = asdict(value)
        else:
            meta[f.name] = value
    meta["arrays"] = arrays
    return [json.dumps(meta, allow_nan=False, default=_json_default).encode()] + buffers


def decode(frames: list):
    """Frames -> the item they encode; InputError when they are not an item of this protocol."""
    try:
        meta = json.loads(bytes(frames[0]))
        cls = _TYPES[meta.pop("type")]
        for (name, dtype, shape), frame in zip(meta.pop("arrays"), frames[1:], strict=True):
            meta[name] = np.frombuffer(frame, dtype=np.dtype(dtype)).reshape(shape)
        if "stamp" in meta:
            stamp = meta["stamp"]
            meta["stamp"] = WindowStamp(**{**stamp, "presence": Presence(**stamp["presence"])})
        return cls(**meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"malformed message on a stage link: {type(exc).__name__}: {exc}") from exc


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def synthetic_window(spec, rng: np.random.Generator, *, index: int = 0, t1_ns: int = 0, window_s: float = 2.0,
                     crops: np.ndarray | None = None, frame_times_ns: np.ndarray | None = None) -> WindowItem:
    """A window of random pixels and noise at the preset's shapes, face and voice present: the warm-up's input
    and the bench's (``crops``/``frame_times_ns`` given: consecutive windows share frames, as live ones do)."""
    size = ALIGNED_FACE_SIZE   # the window builder's crops are OpenFace-aligned faces
    if crops is None:
        crops = rng.integers(0, 255, (spec.videomae.frames, size, size, 3), dtype=np.uint8)
    if frame_times_ns is None:
        frame_times_ns = t1_ns - ((len(crops) - np.arange(len(crops))) * window_s * 1e9 / len(crops)).astype(np.int64)
    picks = np.linspace(0, len(crops) - 1, spec.videomae.frames).round().astype(int)
    presence = Presence(video=True, face=True, face_fraction=1.0, audio=True, audio_active=True, audio_rms=0.1,
                        audio_coverage=1.0)
    return WindowItem(
        stamp=WindowStamp(index, t1_ns - int(window_s * 1e9), t1_ns, presence, sent_ns=t1_ns),
        frame=rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), frame_t_ns=int(frame_times_ns[len(crops) // 2]),
        frame_times_ns=np.asarray(frame_times_ns, np.int64), face_boxes=np.tile([[100, 80, 200, 200]], (len(crops), 1)),
        face_detected=np.ones(len(crops), bool), face_crops=crops, videomae_frames=crops[picks],
        videomae_times_ns=np.asarray(frame_times_ns, np.int64)[picks],
        audio=(0.1 * rng.standard_normal(int(window_s * spec.hubert.sample_rate))).astype(np.float32))
