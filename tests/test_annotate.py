"""The annotated video: draw() on synthetic frames, the Annotator writing real files read back with OpenCV."""
import re
import threading
import time

import numpy as np
import pytest

from edge_emollama.errors import ConfigError, InputError
from edge_emollama.runtime.annotate import (ESTIMATE_PREFIX, STALE_COLOUR, Annotator, Overlay, colour_of,
                                            draw)
from edge_emollama.spec import LABELS

cv2 = pytest.importorskip("cv2")

WIDTH, HEIGHT = 320, 240
FRAME_NS = 40_000_000   # 25 fps
START_NS = 5_000_000_000
BACKGROUND, SKIN = (40, 40, 40), (200, 170, 140)


def probabilities(top: str) -> list[float]:
    p = [0.04] * len(LABELS)
    p[LABELS.index(top)] = 1.0 - 0.04 * (len(LABELS) - 1)
    return p


def estimate(face_id, t0_ns: int, t1_ns: int, top: str = "happy", source: str = "cam0",
             box=None) -> tuple[str, dict, dict]:
    """An estimate as protocol v2 sends it: source and face_id in the header, the dominant label an object."""
    person = "scene" if face_id is None else f"face-{face_id}"
    head = {"window": {"t0_ns": t0_ns, "t1_ns": t1_ns}, "source": source, "face_id": face_id}
    payload = {"box": box, "labels": list(LABELS), "probabilities": probabilities(top),
               "smoothed": probabilities(top),
               "dominant": {"label": top, "probability": max(probabilities(top)), "since_ns": t0_ns}}
    return f"{ESTIMATE_PREFIX}{source}.{person}.", head, payload


def clip_frame(i: int, width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, dict]:
    """Frame ``i`` of a clip with two moving rectangles as faces, and their boxes (ids 1 and 2)."""
    boxes = {1: (20 + 2 * i, 60, 60, 80), 2: (230 - i, 120, 50, 70)}
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    for x, y, w, h in boxes.values():
        image[y:y + h, x:x + w] = SKIN
    return image, boxes


def t_of(i: int) -> int:
    return START_NS + i * FRAME_NS


def read_video(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, bgr = capture.read()
    while ok:
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        ok, bgr = capture.read()
    capture.release()
    return frames


def left_edge(image: np.ndarray, box) -> np.ndarray:
    """The mean colour of the middle of a box's left outline (2 px wide)."""
    x, y, w, h = box
    return image[y + h // 4:y + 3 * h // 4, x:x + 2].reshape(-1, 3).mean(axis=0)


def closest(colour, candidates) -> int:
    return int(np.argmin([np.linalg.norm(np.asarray(colour, float) - c) for c in candidates]))


# --- draw() -------------------------------------------------------------------------------------------------
def test_draw_outlines_the_box_in_the_face_colour_and_leaves_the_rest():
    image, _ = clip_frame(0)
    box = (40, 80, 60, 80)
    out = draw(image, [Overlay(3, box, "happy", tuple(probabilities("happy")))], LABELS)
    assert out is not image and np.array_equal(image, clip_frame(0)[0])   # a copy; the input is untouched
    assert tuple(out[120, 40]) == colour_of(3)          # the left edge
    assert tuple(out[160, 70]) == colour_of(3)          # the bottom edge
    assert np.array_equal(out[200:, 250:], image[200:, 250:])   # far away: untouched
    assert not np.array_equal(out[80:160, 102:200], image[80:160, 102:200])   # the bars beside the box


def test_colours_follow_the_face_id():
    assert colour_of(7) == colour_of(7)
    assert colour_of(1) != colour_of(2)
    assert len({colour_of(i) for i in range(16)}) == 16
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    first = draw(image, [Overlay(5, (10, 10, 50, 50))], LABELS)
    second = draw(image, [Overlay(5, (100, 100, 50, 50))], LABELS)
    assert tuple(first[30, 10]) == tuple(second[120, 100]) == colour_of(5)


def test_stale_estimates_are_grey_and_the_scene_is_a_top_left_panel():
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    stale = draw(image, [Overlay(4, (50, 50, 60, 60), "sad", tuple(probabilities("sad")), stale=True)], LABELS)
    assert tuple(stale[80, 50]) == STALE_COLOUR
    scene = draw(image, [Overlay(None, None, "sad", tuple(probabilities("sad")))], LABELS)
    assert scene[:40, :40].any() and not scene[HEIGHT // 2:, WIDTH // 2:].any()


@pytest.mark.parametrize("box", [(-30, -30, 60, 60), (300, 220, 100, 100), (-500, 10, 40, 40),
                                 (10, 5000, 40, 40), (-10**9, -10**9, 10**9 + 5, 2 * 10**9), (0, 0, 0, 0)])
@pytest.mark.parametrize("size", [(240, 320), (720, 1280), (30, 40)])
def test_boxes_off_the_frame_never_raise(box, size):
    image = np.zeros((*size, 3), np.uint8)
    people = [Overlay(1, box, "fear", tuple(probabilities("fear"))), Overlay(2, box)]
    assert draw(image, people, LABELS).shape == image.shape


def test_draw_refuses_a_frame_that_is_not_rgb_uint8():
    with pytest.raises(InputError, match="RGB uint8"):
        draw(np.zeros((10, 10), np.uint8), [], LABELS)


# --- the Annotator ------------------------------------------------------------------------------------------
def test_a_clip_with_two_faces_is_written_and_reads_back(tmp_path):
    path = tmp_path / "out.mp4"
    annotator = Annotator(LABELS, path=path)
    for i in range(50):
        image, boxes = clip_frame(i)
        annotator.add_frame("cam0", t_of(i), image, boxes)
        if i % 10 == 9:
            for face_id, top in ((1, "happy"), (2, "sad")):
                annotator(*estimate(face_id, t_of(i - 9), t_of(i), top))
    assert annotator.written == {"cam0": 50} and annotator.buffered == {"cam0": 0}
    annotator.close()
    annotator.close()   # idempotent
    frames = read_video(path)
    assert len(frames) == 50 and frames[0].shape == (HEIGHT, WIDTH, 3)
    late = clip_frame(45)[1]
    assert closest(left_edge(frames[45], late[1]), [colour_of(1), colour_of(2), BACKGROUND, SKIN]) == 0
    assert closest(left_edge(frames[45], late[2]), [colour_of(1), colour_of(2), BACKGROUND, SKIN]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]   # no .partial left


def test_a_frame_waits_for_the_estimate_about_it(tmp_path):
    annotator = Annotator(LABELS, path=tmp_path / "out.avi")
    for i in range(5):
        annotator.add_frame("cam0", t_of(i), *clip_frame(i))
    assert annotator.written == {"cam0": 0} and annotator.buffered == {"cam0": 5}
    assert (tmp_path / "out.partial.avi").exists() is False   # opened at the first written frame
    annotator("emollama.v2.status", {}, {})                   # other topics: ignored
    annotator(*estimate(1, t_of(0), t_of(2)))
    assert annotator.written == {"cam0": 3} and annotator.buffered == {"cam0": 2}
    assert (tmp_path / "out.partial.avi").exists()
    annotator.close()
    assert annotator.written == {"cam0": 5} and len(read_video(tmp_path / "out.avi")) == 5


def test_a_flat_estimate_with_source_and_face_id_in_the_payload_is_read_too(tmp_path):
    annotator = Annotator(LABELS, path=tmp_path / "out.mp4")
    annotator.add_frame("cam0", t_of(0), *clip_frame(0))
    topic, head, payload = estimate(1, t_of(0), t_of(0), "sad")
    flat = {**payload, "source": head.pop("source"), "face_id": head.pop("face_id"), "dominant": "sad"}
    annotator(topic, head, flat)
    assert annotator.written == {"cam0": 1}
    annotator.close()


def test_the_scene_estimate_shows_in_frames_without_faces(tmp_path):
    path = tmp_path / "out.mp4"
    annotator = Annotator(LABELS, path=path)
    empty = np.full((HEIGHT, WIDTH, 3), BACKGROUND, np.uint8)
    annotator.add_frame("cam0", t_of(0), empty, {})
    annotator(*estimate(None, t_of(0), t_of(0), "neutral"))
    annotator.close()
    frame = read_video(path)[0]
    assert np.abs(frame[:60, :60].astype(int) - BACKGROUND).max() > 100        # the panel, top-left
    assert np.abs(frame[120:, 160:].astype(int) - BACKGROUND).max() < 20       # nothing elsewhere


def test_an_old_estimate_is_drawn_grey(tmp_path):
    path = tmp_path / "out.mp4"
    annotator = Annotator(LABELS, path=path, hold_s=1.0)
    for i in range(60):   # 2.4 s; one estimate about the first 10 frames
        image, boxes = clip_frame(i)
        annotator.add_frame("cam0", t_of(i), image, {1: boxes[1]})
        if i == 9:
            annotator(*estimate(1, t_of(0), t_of(9)))
    annotator.close()
    frames = read_video(path)
    fresh, old = left_edge(frames[20], clip_frame(20)[1][1]), left_edge(frames[55], clip_frame(55)[1][1])
    assert closest(fresh, [colour_of(1), STALE_COLOUR]) == 0
    assert closest(old, [colour_of(1), STALE_COLOUR]) == 1


def test_each_source_gets_its_own_file(tmp_path):
    annotator = Annotator(LABELS, path=tmp_path / "out.mp4")
    for i in range(12):
        annotator.add_frame("front", t_of(i), *clip_frame(i))
        annotator.add_frame("side/1", t_of(i), *clip_frame(i, 640, 480))
    annotator(*estimate(1, t_of(0), t_of(11), source="side/1"))
    annotator.close()
    assert annotator.paths == {"front": tmp_path / "out.mp4", "side/1": tmp_path / "out-side_1.mp4"}
    assert annotator.written == {"front": 12, "side/1": 12}
    assert len(read_video(tmp_path / "out.mp4")) == 12
    side = read_video(tmp_path / "out-side_1.mp4")
    assert len(side) == 12 and side[0].shape == (480, 640, 3)


def test_frames_of_another_size_are_resized(tmp_path):
    annotator = Annotator(LABELS, path=tmp_path / "out.mp4")
    annotator.add_frame("cam0", t_of(0), *clip_frame(0))
    annotator.add_frame("cam0", t_of(1), *clip_frame(1, 640, 480))
    annotator.close()
    frames = read_video(tmp_path / "out.mp4")
    assert [f.shape for f in frames] == [(HEIGHT, WIDTH, 3)] * 2


def test_capture_and_publisher_threads_together_keep_every_frame_in_order(tmp_path):
    path, count = tmp_path / "out.mp4", 200
    annotator = Annotator(LABELS, path=path)
    fed = threading.Event()

    def capture():
        for i in range(count):
            image, boxes = clip_frame(i % 40)
            image[:12, :12] = (i % 12) * 20   # the frame's number (mod 12), read back below
            annotator.add_frame("cam0", t_of(i), image, boxes)
            time.sleep(0.0005)
        fed.set()

    def publish():
        for i in range(9, count, 10):
            annotator(*estimate(1 + i % 2, t_of(i - 9), t_of(i)))
            time.sleep(0.003)

    threads = [threading.Thread(target=capture), threading.Thread(target=publish)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert fed.is_set()
    annotator.close()
    frames = read_video(path)
    assert len(frames) == count == annotator.written["cam0"]
    marks = [frame[2:10, 2:10].mean() for frame in frames]
    assert all(abs(mark - (i % 12) * 20) < 8 for i, mark in enumerate(marks))


def test_the_buffer_stays_bounded_without_estimates(tmp_path):
    annotator = Annotator(LABELS, path=tmp_path / "out.mp4", fps=25.0, max_buffer_s=2.0)
    most = 0
    for i in range(2000):
        annotator.add_frame("cam0", t_of(i), *clip_frame(i % 40))
        most = max(most, annotator.buffered["cam0"])
    assert most <= 51 and annotator.written["cam0"] >= 2000 - 51
    annotator.close()
    assert annotator.written == {"cam0": 2000} and len(read_video(tmp_path / "out.mp4")) == 2000


def test_unsupported_suffix_existing_file_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"\.mp4, \.avi"):
        Annotator(LABELS, path=tmp_path / "out.mkv")
    (tmp_path / "taken.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="already exists"):
        Annotator(LABELS, path=tmp_path / "taken.mp4")
    with pytest.raises(InputError, match="does not exist"):
        Annotator(LABELS, path=tmp_path / "nowhere" / "out.mp4")
    with pytest.raises(ConfigError, match="preview"):
        Annotator(LABELS)


def test_a_writer_that_cannot_open_names_the_path(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    annotator = Annotator(LABELS, path=folder / "out.mp4")
    folder.rmdir()
    annotator.add_frame("cam0", t_of(0), *clip_frame(0))
    with pytest.raises(InputError, match="out.partial.mp4"):
        annotator(*estimate(1, t_of(0), t_of(0)))


def test_estimates_with_other_labels_are_refused(tmp_path):
    annotator = Annotator(LABELS[:3], path=tmp_path / "out.mp4")
    with pytest.raises(InputError, match="labels"):
        annotator(*estimate(1, 0, 1))


def test_preview_without_a_display_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(ConfigError, match="opencv-python"):
        Annotator(LABELS, preview=True, path=tmp_path / "out.mp4")


@pytest.mark.skipif(not re.search(r"GUI:\s+NONE", cv2.getBuildInformation()),
                    reason="this OpenCV has a GUI: a fake DISPLAY could hang or abort it")
def test_preview_with_headless_opencv_is_a_config_error(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":99")
    with pytest.raises(ConfigError, match="no GUI.*not -headless"):
        Annotator(LABELS, preview=True)
