"""Faces aligned the way OpenFace 2.x FeatureExtraction (default flags) wrote the faces Emotion-LLaMA was
trained on: a similarity warp to 112 x 112 at scale 0.7, colour, the non-face region black.

What OpenFace does (FaceAnalysis::AlignFaceMask in Face_utils.cpp; /tmp/research/extraction.md section 9):
its 68 tracked landmarks' 24 rigid points are fitted (rotation and scale: Kabsch on RMS-normalised points,
no reflection) to the PDM mean shape times 0.7; the PDM's fitted translation goes to the image centre;
cv::warpAffine, INTER_LINEAR, black outside the frame; then everything outside the face is black: the
union of the 68-point triangulation's triangles over the warped landmarks, with the jaw tops (0, 16) and
the eyebrows (17-26) raised by 30 px first (OpenFace 2.x: ``30 / 0.7 * sim_scale``).

What this module does with MTCNN's 5 points (no 68-point tracker runs here):
- the warp: the least-squares similarity (Umeyama: rotation, uniform scale, translation, no reflection) from
  the 5 detected points to the same points of OpenFace's aligned frame, ``size // 2 + scale * mean_shape``:
  the eye centres (mean of points 36-41 and of 42-47), the nose tip (30), the mouth corners (48, 54). On a
  face shaped like the mean shape it is OpenFace's warp (tests/test_faces.py reproduces OpenFace's rigid
  fit); otherwise it is fitted on other points, so faces sit slightly differently (docs/faces.md);
- the mask: the outline of the **canonical** (mean) shape, not of the person's jaw and brows, which 5 points
  do not give. On pixel centres it equals the triangulation's union for the mean shape (jaw 0-16 and brows
  26-17 are its outer boundary; 9765 pixels at 112 / 0.7, checked against tris_68_full.txt). A face whose
  jaw is wider, narrower, opened or turned keeps or loses a little at the edge that OpenFace would not.
Left out: OpenFace's 68-point CLNF tracking and its failure rule (a failed frame is written all black: here
a frame without a detected face is the caller's to blacken), and the PDM's non-rigid fit of the translation.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import ConfigError, InputError
from ..lazy import require

__all__ = ["MEAN_SHAPE_68", "canonical_shape", "canonical_points5", "similarity_transform", "alignment_matrix",
           "face_mask", "align_face"]

# OpenFace's 68-point mean shape, (x, y) in the PDM's units (mm; the z column is dropped), from
# ttoenige/OpenFace @ 35927961078459d6f875dc2df39603f2c88267f6, lib/local/LandmarkDetector/model/pdms/
# In-the-wild_aligned_PDM_68.txt (md5 56d97aa13548b28d8060f0dfc9693a1b; the file lists 68 x, 68 y, 68 z).
# The x and y columns each average to 0: the PDM's origin, which OpenFace puts at the aligned image's centre.
MEAN_SHAPE_68 = np.array([
    (-73.393523, -29.801432), (-72.775014, -10.949766), (-70.533638, 7.929818), (-66.850058, 26.074280),   # 0-3
    (-59.790187, 42.564390), (-48.368973, 56.481080), (-34.121101, 67.246992), (-17.875411, 75.056892),   # 4-7
    (0.098749, 77.061286), (17.477031, 74.758448), (32.648966, 66.929021), (46.372358, 56.311389),   # 8-11
    (57.343480, 42.419126), (64.388482, 25.455880), (68.212038, 6.990805), (70.486405, -11.666193),   # 12-15
    (71.375822, -30.365191), (-61.119406, -49.361602), (-51.287588, -58.769795), (-37.804800, -61.996155),   # 16-19
    (-24.022754, -61.033399), (-11.635713, -56.686759), (12.056636, -57.391033), (25.106256, -61.902186),   # 20-23
    (38.338588, -62.777713), (51.191007, -59.302347), (60.053851, -50.190255), (0.653940, -42.193790),   # 24-27
    (0.804809, -30.993721), (0.992204, -19.944596), (1.226783, -8.414541), (-14.772472, 2.598255),   # 28-31
    (-7.180239, 4.751589), (0.555920, 6.562900), (8.272499, 4.661005), (15.214351, 2.643046),   # 32-35
    (-46.047290, -37.471411), (-37.674688, -42.730510), (-27.883856, -42.711517), (-19.648268, -36.754742),   # 36-39
    (-28.272965, -35.134493), (-38.082418, -34.919043), (19.265868, -37.032306), (27.894191, -43.342445),   # 40-43
    (37.437529, -43.110822), (45.170805, -38.086515), (38.196454, -35.532024), (28.764989, -35.484289),   # 44-47
    (-28.916267, 28.612716), (-17.533194, 22.172187), (-6.684590, 19.029051), (0.381001, 20.721118),   # 48-51
    (8.375443, 19.035460), (18.876618, 22.394109), (28.794412, 28.079924), (19.057574, 36.298248),   # 52-55
    (8.956375, 39.634575), (0.381549, 40.395647), (-7.428895, 39.836405), (-18.160634, 36.677899),   # 56-59
    (-24.377490, 28.677771), (-6.897633, 25.475976), (0.340663, 26.014269), (8.444722, 25.326198),   # 60-63
    (24.474473, 28.323008), (8.449166, 30.596216), (0.205322, 31.408738), (-7.198266, 30.844876),   # 64-67
], np.float64)
MEAN_SHAPE_68.setflags(write=False)

LEFT_EYE, RIGHT_EYE = tuple(range(36, 42)), tuple(range(42, 48))   # as seen in the image
NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = 30, 48, 54
OUTLINE = tuple(range(0, 17)) + tuple(range(26, 16, -1))           # jaw 0-16, then the brows back 26-17
RAISED = (0, 16) + tuple(range(17, 27))                             # moved up before masking
RAISE_PX_AT_07 = 30.0                                               # OpenFace 2.x: (30 / 0.7) * sim_scale


def canonical_shape(size: int = 112, scale: float = 0.7) -> np.ndarray:
    """``[68, 2]``: where OpenFace's aligned frame puts the mean shape (``size // 2 + scale * mean``; the C++
    centres with ``out_width / 2`` on integers)."""
    return size // 2 + scale * MEAN_SHAPE_68


def canonical_points5(size: int = 112, scale: float = 0.7) -> np.ndarray:
    """``[5, 2]``: MTCNN's 5 points in OpenFace's aligned frame: eye centres, nose tip, mouth corners."""
    shape = canonical_shape(size, scale)
    return np.stack([shape[list(LEFT_EYE)].mean(axis=0), shape[list(RIGHT_EYE)].mean(axis=0),
                     shape[NOSE_TIP], shape[MOUTH_LEFT], shape[MOUTH_RIGHT]])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The ``[2, 3]`` similarity (rotation, uniform scale, translation; no reflection) that maps ``src`` onto
    ``dst`` (``[N, 2]`` each) with the least squared error (Umeyama 1991)."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = float((src_c ** 2).sum(axis=1).mean())
    u, singular, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(singular) @ sign)) / variance
    return np.hstack([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]])


def _check_landmarks(landmarks5) -> np.ndarray:
    points = np.asarray(landmarks5, np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise InputError(f"align_face needs 5 (x, y) landmarks (eyes, nose, mouth corners), got shape "
                         f"{points.shape}{'' if np.isfinite(points).all() else ' with non-finite values'}")
    if np.ptp(points, axis=0).max() < 1e-3:
        raise InputError("align_face got 5 landmarks at one point: pass a detected face's landmarks")
    return points


def alignment_matrix(landmarks5: np.ndarray, size: int = 112, scale: float = 0.7) -> np.ndarray:
    """``[2, 3]``: frame pixels -> aligned-face pixels, from the 5 detected points."""
    return similarity_transform(_check_landmarks(landmarks5), canonical_points5(size, scale))


def _check_geometry(size: int, scale: float) -> None:
    if not (isinstance(size, (int, np.integer)) and size >= 8 and 0.0 < scale <= 2.0):
        raise ConfigError(f"aligned face size {size} / scale {scale}: need an integer size >= 8 and "
                          "0 < scale <= 2 (OpenFace: 112 and 0.7)")


@functools.lru_cache(maxsize=8)
def face_mask(size: int = 112, scale: float = 0.7) -> np.ndarray:
    """bool ``[size, size]``, True inside the canonical face outline (jaw tops and brows raised
    ``30 / 0.7 * scale`` px): pixel centres inside the polygon, as OpenFace's PAW tests them. Read-only."""
    _check_geometry(size, scale)
    shape = canonical_shape(size, scale).copy()
    shape[list(RAISED), 1] -= RAISE_PX_AT_07 / 0.7 * scale
    polygon = shape[list(OUTLINE)]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    inside = np.zeros((size, size), bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):   # even-odd rule
        if y0 == y1:
            continue
        crosses = (y0 > ys) != (y1 > ys)
        inside ^= crosses & (xs < x0 + (x1 - x0) * (ys - y0) / (y1 - y0))
    inside.setflags(write=False)
    return inside


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int = 112, scale: float = 0.7,
               mask: bool = True) -> np.ndarray:
    """uint8 ``[size, size, 3]``: ``image`` (RGB uint8 ``[H, W, 3]``) warped so that the 5 landmarks (frame
    pixels: left eye, right eye, nose tip, left and right mouth corner) land where OpenFace's aligned frame
    has them; bilinear, black outside the frame; with ``mask``, black outside the canonical face outline."""
    cv2 = require("cv2")
    _check_geometry(size, scale)
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"align_face got {what}: it needs an RGB uint8 [height, width, 3] frame")
    warp = alignment_matrix(landmarks5, size, scale)
    face = cv2.warpAffine(image, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    if mask:
        face[~face_mask(size, scale)] = 0
    return face
