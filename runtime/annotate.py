"""The annotated video (``run --annotate out.mp4``) and the live preview (``run --preview``).

Three parts, one job each:

- :func:`draw` (pure): one RGB frame plus a list of :class:`Overlay` -> an annotated copy. Each tracked face
  gets a rectangle in its own colour (chosen from its face id, so a person keeps one colour), a caption
  ``#<id> <dominant> <p%>`` above it and a bar chart of the label probabilities beside it; the whole-scene
  estimate (no box) is a panel in the top-left corner captioned ``scene``. A stale estimate is drawn grey.
- :class:`_SourceTrack`: one source's frames, buffered until an estimate about them arrives, and that
  source's latest estimate per face. A frame at capture time ``t`` is released once an estimate of its
  source with window end ``t1_ns >= t`` has arrived, or when the buffer is over its bound (``max_buffer_s``
  of capture time, or a frame count) -- then with whatever estimates are known. It never grows unbounded.
- :class:`Annotator`: the API of the capture thread (:meth:`Annotator.add_frame`) and of the publisher
  (a sink: ``annotator(topic, header, payload)``); it draws the released frames and hands them to
  :class:`_Outputs`: one video file per source (:class:`_VideoFile`) and/or a window (:class:`_Preview`).

Threads: ``add_frame`` runs on the capture thread, the sink on the publisher's sender thread. ``_lock``
guards the buffers and estimates; drawing and writing happen outside it, under ``_write_lock``, which a
thread takes *before* it lets go of ``_lock``, so released frames are written in the order they were
released and the capture thread is not held up by another thread's writing unless it has frames to write.

Files: ``PATH`` for the first source seen, ``PATH-<source>`` (before the suffix) for the others. Each is
written as ``<stem>.partial<suffix>`` and renamed on :meth:`Annotator.close` (OpenCV chooses the container
from the suffix, so the ``.partial`` goes before it). docs/annotate.md describes the video.
"""
from __future__ import annotations

import colorsys
import logging
import math
import os
import re
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..lazy import require
from .clock import NS_PER_S

__all__ = ["Overlay", "draw", "colour_of", "Annotator", "ESTIMATE_PREFIX", "FOURCCS", "STALE_COLOUR"]

log = logging.getLogger(__name__)
ESTIMATE_PREFIX = "emollama.v2.estimate."
FOURCCS = {".mp4": "mp4v", ".avi": "MJPG"}
STALE_COLOUR = (150, 150, 150)
SCENE_COLOUR = (255, 255, 255)
TEXT_COLOUR = (190, 190, 190)     # the bar chart's labels; the dominant one in white
TRACK_COLOUR = (75, 75, 75)       # a bar's full length (probability 1)
MAX_BUFFER_BYTES = 512 * 2**20   # per source: 10 s of 1280x720 at 25 fps would be ~690 MB
GOLDEN = 0.618033988749895
FONT = 0   # cv2.FONT_HERSHEY_SIMPLEX, without importing cv2 at module import
PREVIEW_FIX = ("run on a machine with a display and pip install opencv-python (not -headless), "
               "or use --annotate out.mp4")


# --- drawing ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overlay:
    """What to draw for one person: ``box`` (x, y, w, h) in frame pixels, None for the whole scene;
    ``probabilities`` one per label (empty: no estimate yet); ``stale``: the estimate is old, drawn grey."""
    face_id: int | None
    box: tuple[int, int, int, int] | None
    dominant: str = ""
    probabilities: tuple[float, ...] = ()
    stale: bool = False


@dataclass(frozen=True)
class _Style:
    """Sizes for one frame size; everything scales with the frame's shorter side (240 px -> unit 1)."""
    font: float
    text: int    # text stroke
    line: int    # box outline
    row: int     # one bar row
    glyph: int   # text height
    bar: int     # bar length at probability 1
    pad: int

    @classmethod
    def of(cls, height: int, width: int) -> "_Style":
        unit = max(min(height, width) / 240.0, 0.5)
        font = 0.35 + 0.15 * (unit - 1)
        text = 1 if font < 0.7 else 2
        glyph = require("cv2").getTextSize("Ag", FONT, font, text)[0][1]
        pad = max(2, round(2 * unit))
        return cls(font, text, max(2, round(1.5 * unit)), glyph + pad, glyph, round(32 * unit), pad)


def colour_of(face_id: int | None) -> tuple[int, int, int]:
    """The RGB colour of a face id (golden-ratio hue steps: neighbouring ids differ); white for the scene."""
    if face_id is None:
        return SCENE_COLOUR
    r, g, b = colorsys.hsv_to_rgb((int(face_id) * GOLDEN) % 1.0, 0.8, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def draw(image: np.ndarray, people: Sequence[Overlay], labels: Sequence[str]) -> np.ndarray:
    """An annotated copy of the RGB uint8 ``[H, W, 3]`` frame ``image``; never raises for boxes off the frame.
    Bar panels are drawn first, boxes and captions over them: a crowded frame never hides a box."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"draw() needs an RGB uint8 [H, W, 3] frame, got {image.dtype} {image.shape}")
    canvas = np.array(image, order="C")
    style = _Style.of(*canvas.shape[:2])
    visible = [(person, STALE_COLOUR if person.stale else colour_of(person.face_id)) for person in people
               if _on_frame(person.box, canvas.shape)]
    charted = [(person, colour) for person, colour in visible if person.probabilities]
    boxes = [person.box for person, _ in visible if person.box is not None]
    origins = _layout_panels(canvas.shape, [person for person, _ in charted], boxes, labels, style)
    for (person, colour), origin in zip(charted, origins):
        _draw_bars(canvas, person, labels, origin, colour, style)
    for person, colour in visible:
        _draw_marks(canvas, person, labels, colour, style)
    return canvas


def _on_frame(box, shape) -> bool:
    """False for a box wholly off the frame (nothing to point at); the scene (None) is always on it."""
    if box is None:
        return True
    x, y, w, h = box
    return x + w >= 0 and y + h >= 0 and x < shape[1] and y < shape[0]


def _caption_text(person: Overlay, labels: Sequence[str]) -> str:
    name = "scene" if person.face_id is None else f"#{person.face_id}"
    if not person.probabilities:
        return f"{name} ..."
    p = (person.probabilities[list(labels).index(person.dominant)] if person.dominant in labels
         else max(person.probabilities))
    return f"{name} {person.dominant} {round(100 * p)}%"


def _draw_marks(canvas, person: Overlay, labels, colour, style: _Style) -> None:
    """The box outline (if any) and the caption: above the box, or top-left for the scene."""
    text = _caption_text(person, labels)
    if person.box is None:
        _draw_caption(canvas, text, (style.pad, style.pad), colour, style, above=False)
        return
    height, width = canvas.shape[:2]
    x, y, w, h = person.box
    m = style.line + 1   # corners clamped just outside the frame: an off-frame edge stays invisible
    corner0 = (_clamp(x, -m, width + m), _clamp(y, -m, height + m))
    corner1 = (_clamp(x + w, -m, width + m), _clamp(y + h, -m, height + m))
    require("cv2").rectangle(canvas, corner0, corner1, colour, style.line)
    _draw_caption(canvas, text, (x, y), colour, style, above=True)


def _caption_size(text: str, style: _Style) -> tuple[int, int, int]:
    """(width, height) of a caption's filled label and its text height."""
    (tw, th), base = require("cv2").getTextSize(text, FONT, style.font, style.text)
    return tw + 2 * style.pad, th + base + style.pad, th


def _draw_caption(canvas, text: str, corner: tuple[int, int], colour, style: _Style, above: bool) -> None:
    """A filled label with ``text``, its bottom-left at ``corner`` (above) or its top-left there; kept on the
    frame."""
    cv2 = require("cv2")
    height, width = canvas.shape[:2]
    box_w, box_h, th = _caption_size(text, style)
    left = _fit(corner[0], box_w, width)
    top = _fit(corner[1] - box_h if above else corner[1], box_h, height)
    cv2.rectangle(canvas, (left, top), (left + box_w, top + box_h), colour, -1)
    ink = (0, 0, 0) if _luma(colour) > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (left + style.pad, top + th + style.pad // 2), FONT, style.font, ink, style.text,
                cv2.LINE_AA)


def _panel_size(labels, style: _Style) -> tuple[int, int]:
    cv2 = require("cv2")
    label_w = max((cv2.getTextSize(label, FONT, style.font, style.text)[0][0] for label in labels), default=0)
    return 3 * style.pad + label_w + style.bar, 2 * style.pad + len(labels) * style.row


def _layout_panels(shape, people: Sequence[Overlay], boxes: list, labels, style: _Style) -> list[tuple[int, int]]:
    """Each person's bar panel, from right of / left of / under / above its box (each moved onto the frame;
    the scene's: under its caption): the one that covers the least of the panels placed before and of the
    ``boxes``, counted in tenths of a panel (so a slight overlap does not make a panel jump between frames;
    the first of equals)."""
    panel_w, panel_h = _panel_size(labels, style)
    tenth = panel_w * panel_h // 10 + 1
    placed: list[tuple[int, int, int, int]] = []
    for person in people:
        options = [(_fit(x, panel_w, shape[1]), _fit(y, panel_h, shape[0]), panel_w, panel_h)
                   for x, y in _panel_options(person, labels, (panel_w, panel_h), style)]
        placed.append(min(options, key=lambda o: sum(_shared(o, other) for other in placed + boxes) // tenth))
    return [(x, y) for x, y, _, _ in placed]


def _panel_options(person: Overlay, labels, size: tuple[int, int], style: _Style) -> list[tuple[int, int]]:
    caption_h = _caption_size(_caption_text(person, labels), style)[1]
    if person.box is None:
        return [(style.pad, style.pad + caption_h)]
    (panel_w, panel_h), (x, y, w, h), pad = size, person.box, style.pad
    return [(x + w + pad, y), (x - pad - panel_w, y), (x, y + h + pad), (x, y - caption_h - pad - panel_h)]


def _shared(a: tuple, b: tuple) -> int:
    """The area two (x, y, w, h) rectangles share."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height)


def _draw_bars(canvas, person: Overlay, labels, origin: tuple[int, int], colour, style: _Style) -> None:
    cv2 = require("cv2")
    panel_w, panel_h = _panel_size(labels, style)
    x, y = origin
    _shade(canvas, x, y, x + panel_w, y + panel_h)
    bar_x = x + panel_w - style.pad - style.bar
    for i, (label, p) in enumerate(zip(labels, person.probabilities)):
        top = y + style.pad + i * style.row
        ink = (255, 255, 255) if label == person.dominant else TEXT_COLOUR
        cv2.putText(canvas, label, (x + style.pad, top + style.glyph), FONT, style.font, ink, style.text,
                    cv2.LINE_AA)
        bar_top, bar_bottom = top + 1, top + style.row - 2
        cv2.rectangle(canvas, (bar_x, bar_top), (bar_x + style.bar, bar_bottom), TRACK_COLOUR, -1)
        length = round(_clamp(float(p), 0.0, 1.0) * style.bar)
        if length:
            cv2.rectangle(canvas, (bar_x, bar_top), (bar_x + length, bar_bottom), colour, -1)


def _shade(canvas, x0: int, y0: int, x1: int, y1: int) -> None:
    """Darken a rectangle (clipped to the frame) to 40 %: a backdrop for the bars."""
    region = canvas[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
    region[...] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)


def _clamp(value, low, high):
    return max(low, min(value, high))


def _fit(start: int, size: int, limit: int) -> int:
    """The start of a ``size``-long span moved to lie within [0, limit) (at 0 when it cannot fit)."""
    return max(0, min(start, limit - size))


def _luma(colour) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


# --- buffering until the estimate arrives -------------------------------------------------------------------
@dataclass(frozen=True)
class _Estimate:
    t1_ns: int
    dominant: str
    probabilities: tuple[float, ...]


class _SourceTrack:
    """One source's frames waiting for an estimate about them, and its latest estimate per face id (None: the
    scene). Frames are released (as ``(image, overlays)``) in capture order."""

    def __init__(self, max_span_ns: int, max_frames: int, hold_ns: int):
        self.max_span_ns, self.max_frames, self.hold_ns = max_span_ns, max_frames, hold_ns
        self._frames: deque[tuple[int, np.ndarray, dict]] = deque()
        self._latest: dict[int | None, _Estimate] = {}
        self._covered_ns: int | None = None   # the newest window end of any estimate

    def __len__(self) -> int:
        return len(self._frames)

    def add_frame(self, t_ns: int, image: np.ndarray, boxes: dict) -> list:
        self._frames.append((t_ns, image, boxes))
        return self._take()

    def add_estimate(self, face_id: int | None, estimate: _Estimate) -> list:
        known = self._latest.get(face_id)
        if known is None or estimate.t1_ns >= known.t1_ns:
            self._latest[face_id] = estimate
        self._covered_ns = estimate.t1_ns if self._covered_ns is None else max(self._covered_ns, estimate.t1_ns)
        return self._take()

    def drain(self) -> list:
        return self._take(everything=True)

    def _take(self, everything: bool = False) -> list:
        released = []
        while self._frames and (everything or self._due()):
            t_ns, image, boxes = self._frames.popleft()
            released.append((image, self._overlays(t_ns, boxes)))
        return released

    def _due(self) -> bool:
        first_ns, first_image, _ = self._frames[0]
        return ((self._covered_ns is not None and first_ns <= self._covered_ns)
                or len(self._frames) > self.max_frames or self._frames[-1][0] - first_ns > self.max_span_ns
                or len(self._frames) * first_image.nbytes > MAX_BUFFER_BYTES)

    def _overlays(self, t_ns: int, boxes: dict) -> list[Overlay]:
        people = [self._overlay(face_id, box, t_ns) for face_id, box in sorted(boxes.items())]
        if not boxes and None in self._latest:
            people.append(self._overlay(None, None, t_ns))
        return people

    def _overlay(self, face_id, box, t_ns: int) -> Overlay:
        estimate = self._latest.get(face_id)
        if estimate is None:
            return Overlay(face_id, box)
        return Overlay(face_id, box, estimate.dominant, estimate.probabilities,
                       stale=t_ns - estimate.t1_ns > self.hold_ns)


# --- where the frames go ------------------------------------------------------------------------------------
class _VideoFile:
    """One source's video: opened at the first frame (its size; later frames are resized to it), written as
    ``<stem>.partial<suffix>`` and renamed to ``path`` on close."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.partial = _partial_of(path)
        _check_free(path, self.partial)
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, rgb: np.ndarray) -> None:
        cv2 = require("cv2")
        if self._writer is None:
            self._open(cv2, (rgb.shape[1], rgb.shape[0]))
        if (rgb.shape[1], rgb.shape[0]) != self._size:
            rgb = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def _open(self, cv2, size: tuple[int, int]) -> None:
        fourcc = cv2.VideoWriter_fourcc(*FOURCCS[self.path.suffix.lower()])
        writer = cv2.VideoWriter(str(self.partial), fourcc, self.fps, size)
        if not writer.isOpened():
            raise InputError(f"OpenCV cannot write the annotated video {self.partial} (for {self.path}): check "
                             "that its folder exists and is writable (and that this OpenCV has FFmpeg)")
        self._writer, self._size = writer, size

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            self.partial.replace(self.path)


class _Preview:
    """One HighGUI window per source, ``edge-emollama <source>``; checks at construction that it can show."""

    def __init__(self):
        self._cv2 = cv2 = require("cv2")
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise ConfigError(f"--preview needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set: "
                              f"{PREVIEW_FIX}")
        probe = "edge-emollama probe"
        try:
            cv2.namedWindow(probe)
            cv2.destroyWindow(probe)
        except cv2.error as exc:
            reason = str(exc).strip().splitlines()[-1][:200]
            raise ConfigError(f"--preview cannot open a window (this OpenCV has no GUI: {reason}): "
                              f"{PREVIEW_FIX}") from exc
        self._titles: set[str] = set()

    def show(self, source: str, rgb: np.ndarray) -> None:
        title = f"edge-emollama {source}"
        self._titles.add(title)
        self._cv2.imshow(title, self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2BGR))
        self._cv2.waitKey(1)

    def close(self) -> None:
        for title in self._titles:
            try:
                self._cv2.destroyWindow(title)
            except self._cv2.error:
                pass   # the user closed it already
        self._titles.clear()


def _video_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FOURCCS:
        raise ConfigError(f"the annotated video {path}: '{path.suffix}' is not a supported suffix; use one of "
                          f"{', '.join(FOURCCS)} (e.g. --annotate out.mp4)")
    if not path.parent.is_dir():
        raise InputError(f"the folder of the annotated video {path} does not exist: create it or choose another")
    return path


def _partial_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _check_free(*paths: Path) -> None:
    for existing in paths:
        if existing.exists():
            raise InputError(f"the annotated video {existing} already exists: choose another --annotate FILE "
                             "(or move that file away)")


def _sibling(path: Path, source: str, taken: set[Path]) -> Path:
    """``out-<source>.mp4`` (the source name made file-safe), numbered when that name is taken already."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._") or "source"
    candidate, number = path.with_name(f"{path.stem}-{safe}{path.suffix}"), 2
    while candidate in taken:
        candidate, number = path.with_name(f"{path.stem}-{safe}-{number}{path.suffix}"), number + 1
    return candidate


class _Outputs:
    """Where annotated frames go: one :class:`_VideoFile` per source (``path`` for the first source seen,
    ``<stem>-<source><suffix>`` for the others) and/or the preview; counts the frames written per source."""

    def __init__(self, path: Path | None, fps: float, preview: _Preview | None):
        if path is not None:
            _check_free(path, _partial_of(path))   # early; a sibling's file is checked at its first frame
        self.path, self.fps, self.preview = path, fps, preview
        self.files: dict[str, _VideoFile] = {}
        self.written: dict[str, int] = {}

    def add_source(self, source: str, fps: float | None = None) -> None:
        """A source's first frame: its file is named (InputError when that file exists), at the source's
        ``fps`` when known (else the annotator's)."""
        if source in self.written:
            return
        if self.path is not None:
            taken = {file.path for file in self.files.values()}
            path = _sibling(self.path, source, taken) if self.files else self.path
            self.files[source] = _VideoFile(path, fps or self.fps)
        self.written[source] = 0

    def write(self, source: str, annotated: np.ndarray) -> None:
        if source in self.files:
            self.files[source].write(annotated)
        if self.preview is not None:
            self.preview.show(source, annotated)
        self.written[source] += 1

    def close(self) -> None:
        for source, file in self.files.items():
            file.close()
            log.info("annotated %d frames of %s to %s", self.written[source], source, file.path)
        if self.preview is not None:
            self.preview.close()


# --- the API ------------------------------------------------------------------------------------------------
class Annotator:
    """Frames in (capture thread), estimates in (publisher sink), annotated frames out to ``path`` (one file
    per source: see the module docstring) and/or a preview window. Call :meth:`close` at the end."""

    def __init__(self, labels: Sequence[str], *, path: str | Path | None = None, preview: bool = False,
                 fps: float = 25.0, max_buffer_s: float = 10.0, hold_s: float = 1.0):
        if path is None and not preview:
            raise ConfigError("an Annotator needs a video path (--annotate FILE) or preview=True (--preview)")
        if fps <= 0 or max_buffer_s <= 0 or hold_s < 0:
            raise ConfigError(f"annotation needs fps > 0, max_buffer_s > 0, hold_s >= 0 (got {fps}, "
                              f"{max_buffer_s}, {hold_s})")
        self.labels = tuple(labels)
        video = _video_path(path) if path is not None else None
        self._outputs = _Outputs(video, float(fps), _Preview() if preview else None)
        self._limits = (round(max_buffer_s * NS_PER_S), math.ceil(max_buffer_s * fps) + 1, round(hold_s * NS_PER_S))
        self._tracks: dict[str, _SourceTrack] = {}
        self._lock = threading.Lock()         # the tracks, the outputs' sources and _closed
        self._write_lock = threading.Lock()   # drawing and writing; taken before _lock is let go
        self._closed = False

    @property
    def written(self) -> dict[str, int]:
        """Frames written (or shown) per source."""
        with self._lock:
            return dict(self._outputs.written)

    @property
    def buffered(self) -> dict[str, int]:
        """Frames waiting for their estimate, per source."""
        with self._lock:
            return {source: len(track) for source, track in self._tracks.items()}

    @property
    def paths(self) -> dict[str, Path]:
        """The video file of each source seen so far (empty without a path)."""
        with self._lock:
            return {source: file.path for source, file in self._outputs.files.items()}

    def add_frame(self, source: str, t_ns: int, image: np.ndarray, boxes: dict[int, tuple],
                  fps: float | None = None) -> None:
        """One captured frame (RGB uint8, not modified afterwards by the caller) and the boxes
        (face_id -> (x, y, w, h)) of the faces tracked in it; in capture order per source. ``fps``: the
        source's frame rate (the video file's rate; the annotator's when None)."""
        boxes = {int(face_id): _int_box(box) for face_id, box in boxes.items()}
        with self._lock:
            if self._closed:
                return
            self._outputs.add_source(source, fps)
            released = self._track(source).add_frame(int(t_ns), image, boxes)
            if not released:
                return
            self._write_lock.acquire()
        self._write_and_unlock([(source, released)])

    def __call__(self, topic: str, head: dict, payload: dict) -> None:
        """The publisher sink: estimates (``emollama.v2.estimate.*``) release the frames they are about."""
        if not topic.startswith(ESTIMATE_PREFIX):
            return
        source, face_id, estimate = self._estimate_of(head, payload)
        with self._lock:
            if self._closed:
                return
            released = self._track(source).add_estimate(face_id, estimate)
            if not released:
                return
            self._write_lock.acquire()
        self._write_and_unlock([(source, released)])

    def close(self) -> None:
        """Write every buffered frame, finish the files (rename the ``.partial``), close the preview.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            batches = [(source, track.drain()) for source, track in self._tracks.items()]
            self._write_lock.acquire()
        try:
            self._write(batches)
        finally:
            self._outputs.close()
            self._write_lock.release()

    def _track(self, source: str) -> _SourceTrack:
        if source not in self._tracks:
            self._tracks[source] = _SourceTrack(*self._limits)
        return self._tracks[source]

    def _estimate_of(self, head: dict, payload: dict) -> tuple[str, int | None, _Estimate]:
        if list(payload["labels"]) != list(self.labels):
            raise InputError(f"the estimate's labels {payload['labels']} are not the annotator's {list(self.labels)}")
        face_id, dominant = _field("face_id", head, payload), payload["dominant"]
        estimate = _Estimate(int(head["window"]["t1_ns"]),
                             str(dominant["label"] if isinstance(dominant, dict) else dominant),
                             tuple(float(p) for p in payload["smoothed"]))
        return str(_field("source", head, payload)), None if face_id is None else int(face_id), estimate

    def _write_and_unlock(self, batches: list) -> None:
        try:
            self._write(batches)
        finally:
            self._write_lock.release()

    def _write(self, batches: list) -> None:
        """Draw and write/show the released frames (``_write_lock`` held)."""
        for source, released in batches:
            for image, people in released:
                self._outputs.write(source, draw(image, people, self.labels))


def _field(name: str, head: dict, payload: dict):
    """``name`` from the header (where protocol v2 puts ``source`` and ``face_id``), else from the payload."""
    return head[name] if name in head else payload[name]


def _int_box(box) -> tuple[int, int, int, int]:
    if len(box) != 4:
        raise InputError(f"a face box is (x, y, w, h), got {box!r}")
    return tuple(int(round(float(v))) for v in box)
