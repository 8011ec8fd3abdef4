"""Windows cut from a real clip: timing invariants, the encoders' inputs, presence, stale-window dropping."""
import time

import numpy as np
import pytest

from edge_emollama.errors import ConfigError
from edge_emollama.runtime.clock import NS_PER_S
from edge_emollama.config import FaceConfig, FileConfig
from edge_emollama.runtime.faces import FaceBox, FaceCache, HaarDetector, crop_square
from edge_emollama.tools.sample_clip import write_sample_clip
from edge_emollama.runtime.sources import VideoFileSource
from edge_emollama.runtime.windows import WindowPlan, WindowScheduler, segment_indices, uniform_indices
from edge_emollama.spec import EMOTION_LLAMA, TINY

RATE = TINY.hubert.sample_rate

FAST_FACES = FaceConfig(detect_width=160, min_size_frac=0.3, scale_factor=1.2)  # same cascade, fewer scales
FPS, SECONDS = 20, 6.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_clip(tmp_path_factory.mktemp("clip") / "talking.mp4", seconds=SECONDS, fps=FPS)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    return write_sample_clip(tmp_path_factory.mktemp("short") / "short.mp4", seconds=2.0, fps=FPS, voice="synth")


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """No face, no voice."""
    return write_sample_clip(tmp_path_factory.mktemp("blank") / "blank.mkv", seconds=3.0, voice="none",
                             face=False)


def run_windows(path, options, realtime=False, video=True, audio=True, faces=None, limit_s=20.0):
    src = VideoFileSource(path, RATE, realtime=realtime, options=FileConfig(video=video, audio=audio))
    with src:
        scheduler = WindowScheduler(src if video else None, src if audio else None, options,
                                    faces or FaceCache(HaarDetector(FAST_FACES)))
        windows, deadline = [], time.monotonic() + limit_s
        while time.monotonic() < deadline:
            window = scheduler.next_window(timeout_s=1.0)
            if window is None and scheduler.ended:
                break
            if window is not None:
                windows.append(window)
        assert scheduler.ended, "the scheduler did not reach the end of the clip in time"
    return scheduler, windows


@pytest.fixture(scope="module")
def offline(clip):
    return run_windows(clip, WindowPlan.for_spec(EMOTION_LLAMA))


def test_window_timing_invariants(offline):
    scheduler, windows = offline
    opts = scheduler.plan
    assert len(windows) == int((SECONDS - opts.window_s) / opts.hop_s) + 1 and scheduler.dropped == 0
    assert [w.index for w in windows] == list(range(len(windows)))
    t0s = np.array([w.t0_ns for w in windows])
    t1s = np.array([w.t1_ns for w in windows])
    assert np.all(np.diff(t0s) > 0) and np.all(np.diff(t1s) > 0)
    assert np.all(t1s - t0s == opts.window_ns) and np.all(np.diff(t1s) == opts.hop_ns)
    for w in windows:
        assert np.all((w.frame_times_ns >= w.t0_ns) & (w.frame_times_ns < w.t1_ns))
        assert np.all(np.diff(w.frame_times_ns) > 0)


def test_window_holds_the_encoders_inputs(offline):
    scheduler, windows = offline
    size, frames = scheduler.plan.crop_size, EMOTION_LLAMA.videomae.frames
    assert size == 112   # OpenFace's aligned size; the encoders' preprocessing resizes to 224
    for w in windows:
        n = w.frame_times_ns.size
        assert n == pytest.approx(2.0 * FPS, abs=1)
        assert w.presence.face and w.presence.face_fraction >= 0.9
        assert w.face_crops.shape == (n, size, size, 3) and w.face_crops.dtype == np.uint8
        assert w.videomae_frames.shape == (frames, size, size, 3) and w.videomae_frames.dtype == np.uint8
        assert np.all(np.diff(w.videomae_times_ns) > 0)  # 16 distinct frames, in time order, over the window
        np.testing.assert_array_equal(w.videomae_times_ns, w.frame_times_ns[segment_indices(n)])  # 8 x 2
        assert w.videomae_times_ns[0] - w.t0_ns <= 0.2 * NS_PER_S  # spread over the whole window
        assert w.t1_ns - w.videomae_times_ns[-1] <= 0.2 * NS_PER_S
        assert abs(w.audio.size - 2.0 * 16000) <= 1 and w.audio.dtype == np.float32
        assert w.presence.audio_coverage == 1.0 and w.presence.audio and w.presence.audio_active
        assert w.frame.shape == (240, 320, 3) and w.frame.dtype == np.uint8
        assert abs(w.frame_t_ns - (w.t0_ns + w.t1_ns) / 2) <= NS_PER_S / FPS / 2 + 1  # rule 'middle'
        assert w.frame_t_ns in w.frame_times_ns
        assert np.all(w.face_boxes[:, 2] > 60)
        presence = w.presence.to_wire()
        assert presence["face"]["present"] is True and presence["audio"]["present"] is True


def test_face_detection_runs_once_per_frame(offline):
    scheduler, windows = offline
    cache = scheduler.builder.faces
    distinct = len({int(t) for w in windows for t in w.frame_times_ns})
    assert cache.misses == distinct and cache.hits >= sum(w.frame_times_ns.size for w in windows) - distinct


def test_frame_rules_and_tiny_preset(short):
    for rule in ("first", "last"):
        _, windows = run_windows(short, WindowPlan.for_spec(TINY, frame_rule=rule, window_s=1.0, hop_s=1.0))
        w = windows[1]
        assert w.frame_t_ns == (w.frame_times_ns[0] if rule == "first" else w.frame_times_ns[-1])
        assert w.face_crops.shape[1:] == (112, 112, 3)   # OpenFace's aligned size, whatever the preset
        assert w.videomae_frames.shape[0] == 16  # 20 frames per window still give exactly 16
    _, boxes = run_windows(short, WindowPlan.for_spec(TINY, window_s=1.0, hop_s=1.0, face_crop="box"))
    assert boxes[1].face_crops.shape[1:] == (TINY.mae.image_size, TINY.mae.image_size, 3)   # the encoder's side


def test_video_only_and_audio_only(short):
    _, video = run_windows(short, WindowPlan.for_spec(TINY, window_s=1.0), audio=False)
    assert video and all(w.audio is None and not w.presence.audio and not w.presence.audio_active for w in video)
    assert video[0].presence.to_wire()["audio"] == {"present": False, "active": False, "rms": 0.0, "coverage": 0.0}
    _, audio = run_windows(short, WindowPlan.for_spec(TINY, window_s=1.0), video=False)
    assert audio and all(w.frame is None and w.videomae_frames is None and not w.presence.face for w in audio)
    assert all(w.audio.size == 16000 for w in audio) and any(w.presence.audio for w in audio)
    assert audio[0].presence.to_wire()["video"] == {"present": False}


def test_absent_face_and_silence_are_stated(blank):
    """absent: encode (the extraction's way: OpenFace wrote black faces, silence is audio too) keeps every input,
    black; absent: zeros leaves them out (zero features). Both say no face / no speech."""
    _, encoded = run_windows(blank, WindowPlan.for_spec(TINY, window_s=1.0, hop_s=0.5))
    _, zeroed = run_windows(blank, WindowPlan.for_spec(TINY, window_s=1.0, hop_s=0.5, absent="zeros"))
    assert encoded and len(encoded) == len(zeroed)
    for w in encoded:
        assert w.face_crops.shape[0] == w.frame_times_ns.size > 0 and not w.face_crops.any()   # black
        assert w.videomae_frames.shape[0] == 16 and not w.videomae_frames.any() and w.audio is not None
    for w in zeroed:
        assert w.face_crops.shape[0] == 0 and w.videomae_frames is None and w.audio is None
    for w in encoded + zeroed:
        assert w.frame is not None                    # EVA still sees the scene
        assert w.presence.audio_active and not w.presence.audio and w.presence.audio_rms < 0.01
        assert w.presence.to_wire()["face"]["present"] is False and w.presence.to_wire()["audio"]["present"] is False


def test_context_reaches_back_beyond_the_window(clip):
    plan = WindowPlan.for_spec(TINY, window_s=2.0, hop_s=0.5, context_s={"mae": 3.0, "videomae": 1.0, "hubert": 4.0})
    _, windows = run_windows(clip, plan)
    late = [w for w in windows if w.t1_ns - windows[0].t0_ns >= 4 * NS_PER_S]
    assert late and len(windows) == int((SECONDS - 2.0) / 0.5) + 1
    for w in late:
        assert abs(w.frame_times_ns.size - 3.0 * FPS) <= 1 and w.frame_times_ns[0] >= w.t1_ns - 3 * NS_PER_S
        assert w.frame_times_ns[0] < w.t0_ns                      # MAE sees a second before the window
        assert w.videomae_times_ns[0] >= w.t1_ns - 1 * NS_PER_S   # VideoMAE only its last second
        assert w.audio.size == 4 * RATE and w.presence.audio_coverage == 1.0
        assert w.t0_ns <= w.frame_t_ns < w.t1_ns                  # EVA's frame still from the window
        spans = w.stamp.spans
        assert spans["hubert"] == {"t0_ns": w.t1_ns - 4 * NS_PER_S, "t1_ns": w.t1_ns, "coverage": 1.0}
        assert spans["mae"]["frames"] == w.frame_times_ns.size and spans["videomae"]["frames"] == 16
    first = windows[0]   # at the start there is less behind the window than the context: said, not padded over
    assert first.presence.audio_coverage < 1.0 and first.stamp.spans["hubert"]["coverage"] < 1.0


def test_live_scheduler_skips_to_the_newest_window(short):
    src = VideoFileSource(short, RATE, realtime=True)
    opts = WindowPlan.for_spec(TINY, window_s=0.5, hop_s=0.125)
    with src:
        scheduler = WindowScheduler(src, src, opts, FaceCache(HaarDetector(FAST_FACES)))
        assert scheduler.drop_stale
        first = scheduler.next_window(timeout_s=5.0)
        time.sleep(0.6)                               # a slow consumer: about 4 hops behind
        second = scheduler.next_window(timeout_s=5.0)
    assert first.index == 0 and second.index >= 3 and scheduler.dropped == second.index - 1
    assert second.t0_ns > first.t0_ns


def extraction_segment_indices(num_frames, num_segments=8, duration=2):
    """VideoMAE's test-mode sampling (feature_extract maeVideo/dataset_MER.py, _get_test_indices and get),
    written out again: offsets in the middle of 8 segments, then 2 consecutive frames from each."""
    if num_frames > num_segments + duration - 1:
        tick = (num_frames - duration + 1) / float(num_segments)
        offsets = [int(tick / 2.0 + tick * x) for x in range(num_segments)]
    else:
        offsets = [0] * num_segments
    picked = []
    for offset in offsets:
        p = int(offset)
        for _ in range(duration):
            picked.append(p)
            if p < num_frames - 1:
                p += 1
    return picked


@pytest.mark.parametrize("n", [1, 2, 5, 9, 10, 16, 17, 40, 41, 60, 121, 300])
def test_videomae_segments_are_the_extractions(n):
    assert segment_indices(n).tolist() == extraction_segment_indices(n)


def test_uniform_indices():
    many = uniform_indices(40, 16)
    assert many.size == 16 and np.all(np.diff(many) > 0) and many[0] >= 0 and many[-1] <= 39
    few = uniform_indices(10, 16)
    assert few.size == 16 and np.all(np.diff(few) >= 0) and set(few.tolist()) == set(range(10))


def test_crop_square_pads_outside_the_frame():
    image = np.full((100, 100, 3), 200, np.uint8)
    crop = crop_square(image, FaceBox(80, 80, 40, 40), size=32, margin=0.0)
    assert crop.shape == (32, 32, 3) and crop[0, 0, 0] == 200 and crop[-1, -1, 0] == 0


@pytest.mark.parametrize("bad", [dict(hop_s=3.0), dict(frame_rule="peak"), dict(window_s=0),
                                 dict(min_face_fraction=2.0)])
def test_bad_window_options(bad):
    with pytest.raises(ConfigError):
        WindowPlan.for_spec(TINY, **bad)


def test_too_small_ring_is_reported_not_deadlocked(clip):
    src = VideoFileSource(clip, RATE, realtime=False, options=FileConfig(ring_seconds=0.5))
    with src:
        scheduler = WindowScheduler(src, src, WindowPlan.for_spec(TINY), FaceCache(HaarDetector(FAST_FACES)))
        with pytest.raises(ConfigError, match="ring_seconds"):
            scheduler.next_window(timeout_s=10.0)
