"""Face detection with a per-frame cache, and square face crops.

Two detectors, chosen by ``runtime.faces.detector`` (:func:`make_detector`):

- ``mtcnn`` (:class:`MtcnnDetector`): MTCNN (Zhang et al. 2016), the detector family OpenFace 2.x uses, run
  with numpy and ONNX Runtime on the P-, R- and O-Net the export wrote (facenet-pytorch's weights,
  export/face_detector.py). Boxes, a face probability and 5 landmarks (left eye, right eye, nose, left and
  right mouth corner, as seen in the image), from which runtime/align.py makes OpenFace-style aligned faces.
- ``haar`` (:class:`HaarDetector`): OpenCV's Haar cascade (ships inside opencv-python(-headless) 4.x,
  ``cv2.data.haarcascades``; OpenCV 5 ships none). Boxes only (``landmarks`` is None).

Both run on a copy scaled down to ``detect_width`` pixels and return faces in full-frame pixels, largest
first. Windows overlap, so :class:`FaceCache` keeps each frame's faces with their track ids (keyed by its
capture time) and every window covering that frame reuses them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FaceConfig
from ..errors import ArtifactError, ConfigError, InputError, MissingDependencyError
from ..lazy import require
from ..manifest import Artifacts
from .tracks import Tracker

__all__ = ["FaceBox", "Face", "HaarDetector", "MtcnnDetector", "FaceCache", "make_detector",
           "crop_square"]


@dataclass(frozen=True)
class FaceBox:
    """A face in full-frame pixels: top-left ``(x, y)``, width ``w``, height ``h``."""
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face. ``landmarks``: float32 ``[5, 2]`` full-frame ``(x, y)`` pixel positions (OpenCV's
    convention: a pixel's centre is its integer index) of the left eye, right eye, nose tip, left and right
    mouth corner as seen in the image; None from the Haar detector. ``score``: MTCNN's O-Net face
    probability; 1.0 from the Haar detector (a cascade gives no probability). MTCNN boxes are O-Net's
    regressed boxes (not made square) and may reach past the frame's edge."""
    box: FaceBox
    landmarks: np.ndarray | None
    score: float


def check_image(image: np.ndarray) -> None:
    """InputError unless ``image`` is an RGB uint8 ``[H, W, 3]`` array."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and min(image.shape[:2]) > 0):
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"face detection got {what}: it needs an RGB uint8 [height, width, 3] frame")


def detection_image(image: np.ndarray, width: int) -> tuple:
    """(``image`` scaled down to ``width`` pixels wide (never up), its x scale, its y scale)."""
    cv2 = require("cv2")
    height, full_width = image.shape[:2]
    if width >= full_width:
        return image, 1.0, 1.0
    new_height = max(1, int(round(height * width / full_width)))
    small = cv2.resize(image, (width, new_height), interpolation=cv2.INTER_AREA)
    return small, width / full_width, new_height / height


def largest_first(faces: list) -> list:
    return sorted(faces, key=lambda f: f.box.area, reverse=True)


# --- Haar --------------------------------------------------------------------------------------------------
class HaarDetector:
    """Frontal faces by OpenCV's Haar cascade: boxes, no landmarks. Thread-safe (one lock around the cascade)."""

    def __init__(self, options: FaceConfig = FaceConfig()):
        self.options = options
        self._cv2 = require("cv2")
        self._cascade = self._cv2.CascadeClassifier(self._cascade_path())
        if self._cascade.empty():
            raise ConfigError(f"OpenCV could not load the face cascade {self._cascade_path()}: "
                              "pass an existing Haar/LBP cascade XML file")
        self._lock = threading.Lock()

    def _cascade_path(self) -> str:
        name = self.options.cascade
        if Path(name).is_file():
            return name
        folder = getattr(getattr(self._cv2, "data", None), "haarcascades", None)
        if folder is None:
            raise MissingDependencyError(
                f"OpenCV {self._cv2.__version__} ships no Haar cascades (OpenCV 5 dropped them); install "
                'pip install "opencv-python-headless>=4.9,<5", or pass a cascade XML path')
        path = Path(folder) / name
        if not path.is_file():
            raise ConfigError(f"face cascade {name} not found in {folder}: use a file name from there or a path")
        return str(path)

    def detect(self, image: np.ndarray) -> list:
        """Every face in an RGB uint8 ``[H, W, 3]`` image, largest first (``landmarks`` None, ``score`` 1.0)."""
        check_image(image)
        cv2, opt = self._cv2, self.options
        small, sx, sy = detection_image(image, opt.detect_width)
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        smallest = max(16, int(opt.min_size_frac * min(grey.shape)))
        with self._lock:
            found = self._cascade.detectMultiScale(grey, scaleFactor=opt.scale_factor,
                                                   minNeighbors=opt.min_neighbors, minSize=(smallest, smallest))
        boxes = [FaceBox(int(round(x / sx)), int(round(y / sy)), int(round(w / sx)), int(round(h / sy)))
                 for x, y, w, h in (tuple(int(v) for v in box) for box in found)]
        return largest_first([Face(box, None, 1.0) for box in boxes])

    def largest(self, image: np.ndarray) -> Face | None:
        faces = self.detect(image)
        return faces[0] if faces else None


# --- MTCNN -------------------------------------------------------------------------------------------------
NETS = ("pnet", "rnet", "onet")
INPUT = "image"   # the networks' names, as export/face_detector.py writes them
OUTPUTS = {"pnet": ("box_offsets", "face_prob"), "rnet": ("box_offsets", "face_prob"),
           "onet": ("box_offsets", "landmarks", "face_prob")}
CELL, STRIDE = 12, 2            # P-Net: one 12 px window per output cell, 2 px apart
CROP = {"rnet": 24, "onet": 48}
NMS_IOU = {"pnet scale": 0.5, "pnet": 0.7, "rnet": 0.7, "onet": 0.7}   # MTCNN's own thresholds
ORT_THREADS = 1                 # small nets: 2 or 4 threads measured no faster than 1 (docs/faces.md)


def _open_net(ort, artifacts: Artifacts, net: str):
    """An ONNX Runtime CPU session for one of the exported nets, its names checked."""
    try:
        path = artifacts.path(format="face-detector", branch=net)
    except ArtifactError as exc:
        raise ArtifactError(f"runtime.faces.detector: mtcnn needs the face detector the export writes "
                            f"(onnx/face_{net}.onnx), and {artifacts.root} has none: re-export with "
                            'facenet-pytorch installed (pip install --no-deps "facenet-pytorch==2.6.0"), '
                            "or set runtime.faces.detector: haar") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({exc}); re-export the folder") from exc
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT], list(OUTPUTS[net])):
        raise ArtifactError(f"{path} has inputs/outputs {names}, not {([INPUT], list(OUTPUTS[net]))}: it was "
                            "written by another version; re-export the folder")
    return session


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[N, 3, H, W]`` as the nets were trained: ``(x - 127.5) / 128``."""
    x = (pixels.astype(np.float32) - 127.5) * (1.0 / 128.0)
    return np.ascontiguousarray(x.reshape(-1, *x.shape[-3:]).transpose(0, 3, 1, 2))


def pyramid_scales(height: int, width: int, min_face: float, factor: float) -> list:
    """MTCNN's image pyramid: scale 12 / min_face, then times ``factor`` while the shorter side stays >= 12."""
    scale, scales = CELL / min_face, []
    while min(height, width) * scale >= CELL:
        scales.append(scale)
        scale *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, overlap: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first. ``boxes``: ``[N, 4]`` x1 y1 x2 y2;
    overlap "union" (IoU) or "min" (intersection over the smaller box: O-Net's last step)."""
    order, keep = np.argsort(scores)[::-1], []
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]))
        h = np.maximum(0.0, np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]))
        inter = w * h
        base = np.minimum(area[best], area[rest]) if overlap == "min" else area[best] + area[rest] - inter
        order = rest[inter <= threshold * np.maximum(base, 1e-12)]
    return np.array(keep, np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by the nets' offsets (fractions of the box's width and height, per edge)."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
    return boxes + offsets * size


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box made square (side: its longer side) about its centre."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def crops(image: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``[N, side, side, 3]``: each (integer) box cut from ``image`` (black outside it) and resized."""
    cv2 = require("cv2")
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), side, side, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(np.int64)):
        patch = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if sx0 < sx1 and sy0 < sy1:
            patch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        shrink = patch.shape[0] > side
        out[k] = cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out


def whole_pixels(boxes: np.ndarray) -> np.ndarray:
    """Boxes rounded to whole pixels (at least 1 px wide and tall): what R- and O-Net are shown."""
    out = np.round(boxes)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out


class MtcnnDetector:
    """MTCNN's three stages on the frame scaled to ``options.detect_width``, with the exported P-, R- and O-Net.

    1. P-Net over an image pyramid (first scale 12 / smallest face, then times ``mtcnn_factor``; smallest
       face ``min_size_frac`` of the shorter side, at least 12 px): windows with a face probability of at
       least ``mtcnn_thresholds[0]``, NMS per scale (IoU 0.5) and over all scales (0.7), box regression,
       square boxes.
    2. R-Net on 24x24 crops (black outside the frame): probability > ``mtcnn_thresholds[1]``, NMS 0.7,
       regression, square boxes.
    3. O-Net on 48x48 crops: probability > ``mtcnn_thresholds[2]``, the 5 landmarks, regression, NMS 0.7
       over the smaller box ("Min").
    Resizing is OpenCV's INTER_AREA (facenet-pytorch uses torch's area interpolation; the first MTCNN code
    used OpenCV too), so candidate scores can differ from facenet-pytorch's in the last digits. Sessions
    run on the CPU (small nets, dynamic shapes); ONNX Runtime sessions are thread-safe.
    """

    def __init__(self, artifacts: Artifacts, options: FaceConfig = FaceConfig()):
        ort = require("onnxruntime")
        self.options = options
        self.thresholds = _thresholds(options)
        self.sessions = {net: _open_net(ort, artifacts, net) for net in NETS}

    def detect(self, image: np.ndarray) -> list:
        """Every face in an RGB uint8 ``[H, W, 3]`` image, largest first, with its 5 landmarks."""
        check_image(image)
        small, sx, sy = detection_image(image, self.options.detect_width)
        boxes = self._propose(small)
        if len(boxes):
            boxes = self._refine(small, boxes)
        if not len(boxes):
            return []
        boxes, scores, points = self._output(small, boxes)
        return largest_first([_in_frame(b, s, p, sx, sy) for b, s, p in zip(boxes, scores, points)
                              if b[2] > b[0] and b[3] > b[1]])

    def largest(self, image: np.ndarray) -> Face | None:
        faces = self.detect(image)
        return faces[0] if faces else None

    def _propose(self, small: np.ndarray) -> np.ndarray:
        """Stage 1: candidate boxes ``[N, 4]`` (x1 y1 x2 y2, pixel edges of the detection image)."""
        cv2 = require("cv2")
        height, width = small.shape[:2]
        min_face = max(float(CELL), self.options.min_size_frac * min(height, width))
        found = []
        for scale in pyramid_scales(height, width, min_face, self.options.mtcnn_factor):
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            resized = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
            offsets, prob = self.sessions["pnet"].run(list(OUTPUTS["pnet"]), {INPUT: _normalise(resized)})
            cells = _cells(offsets[0], prob[0, 1], size[0] / width, size[1] / height, self.thresholds[0])
            found.append(cells[nms(cells[:, :4], cells[:, 4], NMS_IOU["pnet scale"])])
        cells = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        cells = cells[nms(cells[:, :4], cells[:, 4], NMS_IOU["pnet"])]
        return square(regress(cells[:, :4], cells[:, 5:9]))

    def _refine(self, small: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: the candidates R-Net keeps, regressed and square."""
        boxes = whole_pixels(boxes)
        offsets, prob = self.sessions["rnet"].run(list(OUTPUTS["rnet"]),
                                                  {INPUT: _normalise(crops(small, boxes, CROP["rnet"]))})
        passed = prob[:, 1] > self.thresholds[1]
        boxes, offsets, scores = boxes[passed], offsets[passed], prob[passed, 1]
        keep = nms(boxes, scores, NMS_IOU["rnet"])
        return square(regress(boxes[keep], offsets[keep]))

    def _output(self, small: np.ndarray, boxes: np.ndarray) -> tuple:
        """Stage 3: (boxes ``[N, 4]``, scores ``[N]``, landmarks ``[N, 5, 2]``) in the detection image.
        Landmarks are in pixel-index units (a pixel's centre at its index), as MTCNN was trained: the crop's
        first pixel plus the net's fraction of the crop's size."""
        boxes = whole_pixels(boxes)
        offsets, marks, prob = self.sessions["onet"].run(list(OUTPUTS["onet"]),
                                                         {INPUT: _normalise(crops(small, boxes, CROP["onet"]))})
        passed = prob[:, 1] > self.thresholds[2]
        boxes, offsets, marks, scores = boxes[passed], offsets[passed], marks[passed], prob[passed, 1]
        size = boxes[:, 2:4] - boxes[:, 0:2]
        points = boxes[:, None, 0:2] + size[:, None, :] * np.stack([marks[:, :5], marks[:, 5:]], axis=2)
        boxes = regress(boxes, offsets)
        keep = nms(boxes, scores, NMS_IOU["onet"], overlap="min")
        return boxes[keep], scores[keep], points[keep]


def _thresholds(options: FaceConfig) -> tuple:
    """The three stage thresholds, checked, and the other MTCNN settings checked."""
    values = tuple(options.mtcnn_thresholds)
    if len(values) != 3 or not all(0.0 < float(v) < 1.0 for v in values):
        raise ConfigError(f"runtime.faces.mtcnn_thresholds = {list(values)}: give three probabilities in (0, 1) "
                          "for P-, R- and O-Net, e.g. [0.6, 0.7, 0.7]")
    if not 0.0 < options.mtcnn_factor < 1.0:
        raise ConfigError(f"runtime.faces.mtcnn_factor = {options.mtcnn_factor}: the pyramid step must be in "
                          "(0, 1), e.g. 0.709")
    if not 0.0 < options.min_size_frac <= 1.0 or options.detect_width < CELL:
        raise ConfigError(f"runtime.faces.min_size_frac = {options.min_size_frac} / detect_width = "
                          f"{options.detect_width}: need 0 < min_size_frac <= 1 and detect_width >= {CELL}")
    return tuple(float(v) for v in values)


def _cells(offsets: np.ndarray, prob: np.ndarray, scale_x: float, scale_y: float, threshold: float) -> np.ndarray:
    """P-Net's windows with ``prob >= threshold``: ``[K, 9]`` = box (4, detection-image pixel edges), score,
    offsets (4)."""
    rows, cols = np.nonzero(prob >= threshold)
    x1, y1 = STRIDE * cols / scale_x, STRIDE * rows / scale_y
    x2, y2 = (STRIDE * cols + CELL) / scale_x, (STRIDE * rows + CELL) / scale_y
    return np.column_stack([x1, y1, x2, y2, prob[rows, cols], offsets[:, rows, cols].T]).astype(np.float64)


def _in_frame(box: np.ndarray, score: float, points: np.ndarray, sx: float, sy: float) -> Face:
    """A face of the detection image in full-frame pixels."""
    x0, y0, x1, y1 = box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy
    frame_box = FaceBox(int(round(x0)), int(round(y0)), max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0))))
    landmarks = ((points + 0.5) / np.array([sx, sy]) - 0.5).astype(np.float32)   # pixel index -> frame index
    landmarks.setflags(write=False)
    return Face(frame_box, landmarks, float(score))


def make_detector(artifacts: Artifacts | None, options: FaceConfig = FaceConfig()):
    """The detector ``options.detector`` names: MtcnnDetector (the export's face detector) or HaarDetector."""
    if options.detector == "haar":
        return HaarDetector(options)
    if options.detector == "mtcnn":
        if artifacts is None:
            raise ConfigError("runtime.faces.detector: mtcnn needs an exported folder (its face detector); "
                              "pass the artifacts, or set runtime.faces.detector: haar")
        return MtcnnDetector(artifacts, options)
    raise ConfigError(f"runtime.faces.detector = {options.detector!r}: use mtcnn or haar")


class FaceCache:
    """Per-frame faces keyed by capture time: detected once (the ``max_faces`` largest), given track ids by
    ``tracker`` (runtime/tracks.py) in the order frames are first asked for, and reused by every window that
    covers the frame. ``get`` returns a tuple of ``TrackedFace`` (empty without a face)."""

    def __init__(self, detector, tracker: Tracker | None = None, max_faces: int = 4, size: int | None = None):
        self.detector = detector            # HaarDetector | MtcnnDetector (anything with detect(image))
        self.tracker = tracker or Tracker()
        self.max_faces = max_faces
        self.size = size or detector.options.cache_size
        self._items: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def has(self, t_ns: int) -> bool:
        with self._lock:
            return t_ns in self._items

    def get(self, t_ns: int, image: np.ndarray) -> tuple:
        """The tracked faces of the frame captured at ``t_ns`` (detected on first request), largest first."""
        with self._lock:
            if t_ns in self._items:
                self.hits += 1
                self._items.move_to_end(t_ns)
                return self._items[t_ns]
        faces = self.detector.detect(image)[:self.max_faces]
        with self._lock:
            if t_ns in self._items:   # another thread detected it meanwhile: its ids stand
                return self._items[t_ns]
            self.misses += 1
            tracked = self.tracker.update(t_ns, faces)
            self._items[t_ns] = tracked
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return tracked

    def live_ids(self, t_ns: int) -> tuple:
        with self._lock:
            return self.tracker.live_ids(t_ns)


def crop_square(image: np.ndarray, box: FaceBox, size: int, margin: float = 0.25) -> np.ndarray:
    """A square RGB uint8 ``[size, size, 3]`` crop centred on ``box``, its side ``max(w, h) * (1 + margin)``;
    parts outside the frame are black."""
    cv2 = require("cv2")
    side = max(2, int(round(max(box.w, box.h) * (1.0 + margin))))
    x0 = int(round(box.x + box.w / 2 - side / 2))
    y0 = int(round(box.y + box.h / 2 - side / 2))
    height, width = image.shape[:2]
    crop = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)
    if sx0 < sx1 and sy0 < sy1:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)
