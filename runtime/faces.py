"""Face detection (OpenCV Haar cascade, the largest face) with a per-frame cache, and square face crops.

The cascade ships inside opencv-python(-headless) 4.x (``cv2.data.haarcascades``); OpenCV 5 ships none.
Detection runs on a grey, histogram-equalised copy scaled down to ``detect_width`` pixels; boxes are
returned in full-frame pixels. Windows overlap, so :class:`FaceCache` keeps each frame's result (keyed by
its capture time) and every window covering that frame reuses it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FaceConfig
from ..errors import ConfigError, MissingDependencyError
from ..lazy import require

__all__ = ["FaceBox", "FaceDetector", "FaceCache", "crop_square"]


@dataclass(frozen=True)
class FaceBox:
    """A face in full-frame pixels: top-left ``(x, y)``, width ``w``, height ``h``."""
    x: int
    y: int
    w: int
    h: int


class FaceDetector:
    """The largest frontal face of an RGB frame, or None. Thread-safe (one lock around the cascade)."""

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

    def detect(self, image: np.ndarray) -> FaceBox | None:
        """The largest face in an RGB uint8 ``[H, W, 3]`` image (None when there is none)."""
        cv2, opt = self._cv2, self.options
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        ratio = min(1.0, opt.detect_width / grey.shape[1])
        if ratio < 1.0:
            grey = cv2.resize(grey, (opt.detect_width, max(1, int(round(grey.shape[0] * ratio)))),
                              interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        smallest = max(16, int(opt.min_size_frac * min(grey.shape)))
        with self._lock:
            found = self._cascade.detectMultiScale(grey, scaleFactor=opt.scale_factor,
                                                   minNeighbors=opt.min_neighbors, minSize=(smallest, smallest))
        if len(found) == 0:
            return None
        x, y, w, h = max((tuple(int(v) for v in box) for box in found), key=lambda b: b[2] * b[3])
        return FaceBox(*(int(round(v / ratio)) for v in (x, y, w, h)))


class FaceCache:
    """Per-frame detection results keyed by capture time; computed once, reused by overlapping windows."""

    def __init__(self, detector: FaceDetector, size: int | None = None):
        self.detector = detector
        self.size = size or detector.options.cache_size
        self._items: OrderedDict[int, FaceBox | None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def has(self, t_ns: int) -> bool:
        with self._lock:
            return t_ns in self._items

    def get(self, t_ns: int, image: np.ndarray) -> FaceBox | None:
        """The largest face of the frame captured at ``t_ns`` (detected on first request)."""
        with self._lock:
            if t_ns in self._items:
                self.hits += 1
                self._items.move_to_end(t_ns)
                return self._items[t_ns]
        box = self.detector.detect(image)
        with self._lock:
            self.misses += 1
            self._items[t_ns] = box
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return box


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
