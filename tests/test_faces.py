"""Faces as the training saw them: the exported MTCNN (ONNX against torch), the runtime detector on the sample
clip, OpenFace's alignment reproduced from 5 points, the face mask, and the detector choice."""
import dataclasses

import numpy as np
import pytest

from edge_emollama.config import FaceConfig
from edge_emollama.errors import ArtifactError, ConfigError, InputError
from edge_emollama.runtime.align import (MEAN_SHAPE_68, alignment_matrix, align_face, canonical_points5,
                                         canonical_shape, face_mask)
from edge_emollama.runtime.faces import (Face, FaceBox, FaceCache, HaarDetector, MtcnnDetector, make_detector)
from edge_emollama.tools.sample_clip import draw_face

cv2 = pytest.importorskip("cv2")

# OpenFace's rigid points (Face_utils.cpp extract_rigid_points; /tmp/research/extraction.md section 9)
RIGID = [1, 2, 3, 4, 12, 13, 14, 15, 27, 28, 29, 31, 32, 33, 34, 35, 36, 39, 40, 41, 42, 45, 46, 47]


# --- (a) the exported networks ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets_onnx(tmp_path_factory):
    pytest.importorskip("torch")
    from edge_emollama.export.face_detector import export_face_detector, load_nets

    folder = tmp_path_factory.mktemp("faces")
    return load_nets(), export_face_detector(folder, opset=17, metadata={"producer": "test"})


@pytest.mark.parametrize("net, shapes", [
    ("pnet", [(1, 3, 12, 12), (1, 3, 37, 91), (2, 3, 240, 320)]),    # height and width are dynamic
    ("rnet", [(1, 3, 24, 24), (17, 3, 24, 24)]),                        # the batch is dynamic
    ("onet", [(1, 3, 48, 48), (9, 3, 48, 48)]),
])
def test_onnx_nets_equal_torch_on_fresh_inputs(nets_onnx, net, shapes):
    import onnxruntime as ort
    import torch

    modules, paths = nets_onnx
    session = ort.InferenceSession(str(paths[net]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for shape in shapes:
        image = rng.uniform(-1, 1, shape).astype(np.float32)
        got = session.run(None, {"image": image})
        with torch.no_grad():
            want = [w.numpy() for w in modules[net](torch.from_numpy(image))]
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            assert np.abs(g - w).max() / np.abs(w).max() <= 1e-4
        np.testing.assert_allclose(got[-1].sum(axis=1), 1.0, atol=1e-5)   # face_prob: a softmax over 2


def test_the_export_lists_the_face_detector(tiny_artifacts):
    from edge_emollama.export.formats import plan
    from edge_emollama.manifest import load_artifacts

    assert [f.name for f in plan(["onnx", "onnx-fp16", "gguf"])[0]][:2] == ["faces", "onnx"]   # required first
    manifest = load_artifacts(tiny_artifacts).manifest
    entries = {e.branch: e for e in manifest.entries(format="face-detector")}
    assert set(entries) == {"pnet", "rnet", "onet"}
    assert all(e.precision == "fp32" and e.file == f"onnx/face_{b}.onnx" for b, e in entries.items())
    assert entries["onet"].outputs == ("box_offsets", "landmarks", "face_prob")
    checks = [manifest.quick_checks[f"faces {b}"] for b in entries]
    assert all(c["passed"] and c["max_rel_err"] <= 1e-4 for c in checks)


def test_auto_skips_the_face_detector_without_facenet_pytorch(monkeypatch):
    """facenet-pytorch made unfindable: "auto" skips "faces" with its install command and keeps "onnx"; a named
    "onnx" needs it."""
    import importlib.util

    from edge_emollama.errors import MissingDependencyError
    from edge_emollama.export.formats import plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "facenet_pytorch" else real(name, *rest))
    chosen, skipped = plan(["auto"])
    assert "faces" not in [f.name for f in chosen] and "onnx" in [f.name for f in chosen]
    assert "facenet-pytorch" in skipped["faces"]
    with pytest.raises(MissingDependencyError, match="needed by 'onnx'"):
        plan(["onnx"])


# --- (b) the alignment reproduces OpenFace's rigid alignment ------------------------------------------------
def test_the_mean_shape_is_openfaces():
    """Pinned against the research report's table (0.7 * mean + 56, two decimals)."""
    shape = canonical_shape(112, 0.7)
    expected = {1: (5.06, 48.34), 14: (103.75, 60.89), 27: (56.46, 26.46), 33: (56.39, 60.59),
                36: (23.77, 29.77), 45: (87.62, 29.34), 47: (76.14, 31.16)}
    for index, point in expected.items():
        np.testing.assert_allclose(shape[index], point, atol=0.006)
    np.testing.assert_allclose(MEAN_SHAPE_68.mean(axis=0), 0.0, atol=1e-6)


def openface_rigid_warp(landmarks68: np.ndarray, size: int = 112, scale: float = 0.7) -> np.ndarray:
    """OpenFace's AlignFace written out again: AlignShapesWithScale (mean-centre, RMS-normalise, Kabsch 2D
    without reflection, scale = RMS ratio) on the 24 rigid points to ``scale * mean shape``, then the PDM's
    translation (for a mean-shaped face: the centroid of the 68 points) to ``size / 2``."""
    src, dst = landmarks68[RIGID], (scale * MEAN_SHAPE_68)[RIGID]
    src_c, dst_c = src - src.mean(axis=0), dst - dst.mean(axis=0)
    s_src, s_dst = np.sqrt((src_c ** 2).sum() / len(src)), np.sqrt((dst_c ** 2).sum() / len(dst))
    u, _, vt = np.linalg.svd((src_c / s_src).T @ (dst_c / s_dst))
    correction = np.diag([1.0, 1.0 if np.linalg.det(vt.T @ u.T) > 0 else -1.0])
    a = (s_dst / s_src) * (vt.T @ correction @ u.T)
    t = landmarks68.mean(axis=0)
    return np.hstack([a, (-(a @ t) + size // 2)[:, None]])


def random_similarity(rng) -> np.ndarray:
    angle, scale = np.radians(rng.uniform(-30, 30)), rng.uniform(1.2, 3.0)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, rng.uniform(50, 250)], [s, c, rng.uniform(40, 200)]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def five_points(shape68: np.ndarray) -> np.ndarray:
    return np.stack([shape68[36:42].mean(axis=0), shape68[42:48].mean(axis=0), shape68[30], shape68[48],
                     shape68[54]])


def test_alignment_reproduces_openfaces_rigid_alignment():
    rng = np.random.default_rng()
    for _ in range(20):
        placed = random_similarity(rng)
        detected = apply(placed, canonical_shape())        # a mean-shaped face somewhere in a frame
        ours, openface = alignment_matrix(five_points(detected)), openface_rigid_warp(detected)
        assert np.abs(apply(ours, detected) - apply(openface, detected)).max() < 0.5
        assert np.abs(apply(ours, detected) - canonical_shape()).max() < 1e-6
    image = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 3)
    ours = align_face(image, five_points(detected), mask=False)
    theirs = cv2.warpAffine(image, openface, (112, 112), flags=cv2.INTER_LINEAR)
    assert ours.shape == (112, 112, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_alignment_error_with_noisy_landmarks():
    """2 px (standard deviation, frame pixels) on each of the 5 points against OpenFace on the exact shape:
    the error of the 68 mapped points, in aligned-face pixels, for a face 1.5x the aligned size."""
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(500):
        placed = random_similarity(rng)
        placed[:, :2] *= 1.5 / np.sqrt(abs(np.linalg.det(placed[:, :2])))
        detected = apply(placed, canonical_shape())
        noisy = five_points(detected) + rng.normal(0, 2.0, (5, 2))
        mapped = apply(alignment_matrix(noisy), detected) - apply(openface_rigid_warp(detected), detected)
        errors.append(np.linalg.norm(mapped, axis=1))
    errors = np.array(errors)
    mean, p95 = float(errors.mean()), float(np.percentile(errors.max(axis=1), 95))
    print(f"\nalignment, 2 px landmark noise, face at 1.5x: mean {mean:.2f} px, 95th pct of the worst point {p95:.2f}")
    assert mean < 2.0 and p95 < 6.0


# --- (c) the mask -------------------------------------------------------------------------------------------
def test_the_mask_blacks_out_the_corners_and_keeps_the_face():
    image = np.full((300, 300, 3), 200, np.uint8)
    frame_points = canonical_points5() * 2.0 + 20      # the face at twice the aligned size
    face, bare = align_face(image, frame_points), align_face(image, frame_points, mask=False)
    for y, x in [(0, 0), (0, 111), (111, 0), (111, 111), (100, 5), (105, 100)]:
        assert not face[y, x].any() and bare[y, x].all()
    assert (face[35:80, 30:82] == 200).all()           # eyes, nose and mouth region kept
    kept = face.any(axis=2)
    assert 0.7 < kept.mean() < 0.85
    outline = canonical_shape().copy()                 # an independent rasteriser of the raised outline
    outline[[0, 16] + list(range(17, 27)), 1] -= 30
    polygon = outline[list(range(17)) + list(range(26, 16, -1))]
    filled = np.zeros((112, 112), np.uint8)
    cv2.fillPoly(filled, [np.round(polygon * 16).astype(np.int32)], 1, shift=4)
    assert (filled.astype(bool) ^ kept).mean() < 0.02 and (kept == face_mask()).all()


def test_align_face_refuses_bad_input():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(InputError):
        align_face(image, np.zeros((4, 2)))
    with pytest.raises(InputError):
        align_face(image, np.ones((5, 2)))              # all at one point
    with pytest.raises(InputError):
        align_face(image.astype(np.float32), canonical_points5())
    with pytest.raises(ConfigError):
        align_face(image, canonical_points5(), size=4)


# --- (d) MTCNN on the sample clip ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtcnn(tiny_artifacts):
    from edge_emollama.manifest import load_artifacts

    return make_detector(load_artifacts(tiny_artifacts), FaceConfig(detector="mtcnn"))


@pytest.fixture(scope="module")
def clip_frames(sample_clip):
    av = pytest.importorskip("av")
    with av.open(str(sample_clip)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def plausible(face: Face) -> bool:
    """Eyes left to right and level, the nose below them, the mouth below the nose, all inside the box."""
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    box = face.box
    inside = ((face.landmarks[:, 0] > box.x) & (face.landmarks[:, 0] < box.x + box.w)
              & (face.landmarks[:, 1] > box.y) & (face.landmarks[:, 1] < box.y + box.h)).all()
    return bool(inside and lx < nx < rx and mlx < mrx and abs(ly - ry) < 0.1 * box.h
                and max(ly, ry) < ny < min(mly, mry))


def test_mtcnn_finds_the_sample_clips_face(mtcnn, clip_frames):
    assert isinstance(mtcnn, MtcnnDetector) and len(clip_frames) >= 60
    found = [mtcnn.detect(image) for image in clip_frames]
    hits = [faces[0] for faces in found if faces]
    assert len(hits) >= 0.9 * len(clip_frames)
    assert sum(plausible(f) for f in hits) >= 0.9 * len(clip_frames)
    assert all(f.score > 0.7 and 80 <= f.box.h <= 200 for f in hits)


@pytest.mark.parametrize("center, scale", [((160, 120), 0.95), ((130, 110), 0.8), ((330, 250), 1.9)])
def test_mtcnn_landmarks_sit_on_the_drawn_features(mtcnn, center, scale):
    """draw_face puts the eyes at (cx -+ 22 s, cy - 18 s) and the mouth corners at (cx -+ 20 s, cy + 38 s)."""
    width, height = (320, 240) if scale < 1.5 else (640, 480)
    faces = mtcnn.detect(draw_face(width, height, center, scale=scale))
    assert faces and faces[0].landmarks.shape == (5, 2) and faces[0].landmarks.dtype == np.float32
    cx, cy = center
    drawn = np.array([(cx - 22 * scale, cy - 18 * scale), (cx + 22 * scale, cy - 18 * scale),
                      (cx - 20 * scale, cy + 38 * scale), (cx + 20 * scale, cy + 38 * scale)])
    found = faces[0].landmarks[[0, 1, 3, 4]]
    assert np.linalg.norm(found - drawn, axis=1).max() < 6 * scale
    assert abs(faces[0].landmarks[2, 0] - cx) < 6 * scale


# --- (e) the detector choice, the cache, Haar -----------------------------------------------------------------
def test_make_detector_honours_the_options(tiny_artifacts, mtcnn):
    from edge_emollama.manifest import load_artifacts

    artifacts = load_artifacts(tiny_artifacts)
    image = draw_face(320, 240, (150, 120), scale=0.9)
    haar = make_detector(artifacts, FaceConfig(detector="haar"))
    assert isinstance(haar, HaarDetector) and isinstance(make_detector(None, FaceConfig(detector="haar")),
                                                         HaarDetector)
    (face,) = haar.detect(image)
    assert face.landmarks is None and face.score == 1.0 and abs(face.box.x + face.box.w / 2 - 150) < 15
    (face,) = mtcnn.detect(image)
    assert abs(face.box.x + face.box.w / 2 - 150) < 15
    assert make_detector(artifacts, FaceConfig(min_size_frac=0.9)).detect(image) == []   # face ~0.6 of 240
    narrow = make_detector(artifacts, FaceConfig(detect_width=160)).detect(image)
    assert narrow and abs(narrow[0].box.h - face.box.h) < 0.15 * face.box.h               # full-frame pixels
    assert mtcnn.detect(np.full((240, 320, 3), (130, 110, 90), np.uint8)) == []
    with pytest.raises(ConfigError):
        make_detector(None, FaceConfig(detector="mtcnn"))
    with pytest.raises(ConfigError):
        make_detector(artifacts, FaceConfig(mtcnn_thresholds=[0.6, 0.7]))
    with pytest.raises(InputError):
        mtcnn.detect(np.zeros((240, 320), np.uint8))
    bare = dataclasses.replace(artifacts.manifest, artifacts=tuple(
        a for a in artifacts.manifest.artifacts if a.format != "face-detector"))
    with pytest.raises(ArtifactError, match="detector: haar"):
        make_detector(type(artifacts)(artifacts.root, bare), FaceConfig(detector="mtcnn"))


def test_detectors_order_faces_largest_first_and_the_cache_tracks_both(mtcnn):
    image = np.full((480, 640, 3), (130, 110, 90), np.uint8)
    small, big = draw_face(640, 480, (160, 240), scale=1.0), draw_face(640, 480, (450, 240), scale=1.6)
    image[:, :320], image[:, 320:] = small[:, :320], big[:, 320:]
    for detector in (mtcnn, HaarDetector(FaceConfig(detector="haar"))):
        faces = detector.detect(image)
        assert len(faces) == 2 and faces[0].box.area > faces[1].box.area and faces[0].box.x > 320
        cache = FaceCache(detector)
        first = cache.get(7, image)
        assert [t.face.box for t in first] == [f.box for f in faces] and [t.face_id for t in first] == [1, 2]
        assert cache.get(7, image) is first and (cache.hits, cache.misses) == (1, 1)
        assert cache.get(8, np.zeros((240, 320, 3), np.uint8)) == ()
        assert [t.face_id for t in FaceCache(detector, max_faces=1).get(7, image)] == [1]
    assert isinstance(faces[0].box, FaceBox)
