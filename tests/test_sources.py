"""Capture sources and rings, and the generated sample clip (real files, real decoding, no mocks)."""
import shutil
import threading
import time

import numpy as np
import pytest

from edge_emollama.errors import ConfigError, InputError
from edge_emollama.runtime.clock import NS_PER_S, ClockAnchor, now_ns, run_anchor
from edge_emollama.runtime.faces import HaarDetector
from edge_emollama.tools.sample_clip import synth_voice, write_sample_clip
from edge_emollama.config import FileConfig
from edge_emollama.runtime.sources import AudioRing, CameraSource, Frame, FrameRing, Source, VideoFileSource
from edge_emollama.spec import TINY

RATE = TINY.hubert.sample_rate

av = pytest.importorskip("av")
FPS, SECONDS = 20, 6.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_clip(tmp_path_factory.mktemp("clip") / "sample.mp4", seconds=SECONDS, fps=FPS)


def frame(t_ns: int, index: int = 0) -> Frame:
    return Frame(t_ns, np.zeros((4, 4, 3), np.uint8), index)


# --- the sample clip ----------------------------------------------------------------------------------------
def test_sample_clip_has_video_audio_and_a_detected_face(clip):
    with av.open(str(clip)) as container:
        assert container.streams.video and container.streams.audio
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(images) == int(SECONDS * FPS)
    detector = HaarDetector()  # the default options, as the runtime uses them
    sampled = images[::4]
    found = [detector.largest(img) for img in sampled]
    assert sum(f is not None for f in found) >= 0.9 * len(sampled)
    box = next(f.box for f in found if f is not None)
    assert 60 <= box.h <= 220 and 0 <= box.x < 320
    with VideoFileSource(clip, RATE, realtime=False, options=FileConfig(video=False)) as src:
        deadline = time.monotonic() + 10
        while not src.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        src.check()
        samples, coverage = src.audio.read(src.audio.start_ns(), src.audio.end_ns())
    assert abs(samples.size / 16000 - SECONDS) < 0.1 and coverage == 1.0
    speech = samples[int(0.5 * 16000):int(2.5 * 16000)]
    assert np.sqrt(np.mean(speech ** 2)) > 0.01  # a voice, well above the presence threshold


def test_synth_voice_is_voice_like():
    x = synth_voice(3.0)
    assert x.dtype == np.float32 and x.size == 48000 and np.abs(x).max() <= 0.31
    spectrum = np.abs(np.fft.rfft(x[8000:24000]))
    peak_hz = np.argmax(spectrum) * 16000 / 16000
    assert 80 <= peak_hz <= 3000                         # energy in the voice band
    env = np.sqrt(np.convolve(x ** 2, np.ones(800) / 800, mode="same"))
    assert env[:4000].max() < 0.01 < env.max()           # silent lead-in, then syllables


def test_sample_clip_rejects_bad_names(tmp_path):
    with pytest.raises(ConfigError):
        write_sample_clip(tmp_path / "clip.avi", seconds=1.0)
    with pytest.raises(ConfigError):
        write_sample_clip(tmp_path / "clip.mp4", seconds=1.0, voice="robot")


# --- clock ------------------------------------------------------------------------------------------------
def test_clock_anchor():
    anchor = ClockAnchor.take()
    assert abs(anchor.to_utc_ns(now_ns()) - time.time_ns()) < 50_000_000
    assert anchor.to_utc_iso(anchor.monotonic_ns).endswith("Z")
    assert anchor.to_utc_ns(anchor.monotonic_ns + NS_PER_S) == anchor.utc_ns + NS_PER_S
    assert run_anchor() is run_anchor() and run_anchor().to_utc_iso(now_ns())[:4].isdigit()


# --- rings --------------------------------------------------------------------------------------------------
def test_frame_ring_keeps_the_newest_and_queries_half_open():
    ring = FrameRing(4)
    for k in range(10):
        assert ring.put(frame(k * 100, k))
    assert len(ring) == 4 and ring.dropped == 6
    assert [f.t_ns for f in ring.between(700, 900)] == [700, 800]
    assert ring.latest().index == 9 and ring.first_t_ns() == 600
    assert not ring.put(frame(900)) and ring.out_of_order == 1  # time must increase
    ring.discard_before(800)
    assert [f.t_ns for f in ring.between(0, 10_000)] == [800, 900]


def test_frame_ring_blocks_when_asked_and_close_releases():
    ring = FrameRing(2, block_when_full=True)
    ring.put(frame(1))
    ring.put(frame(2))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (ring.put(frame(3)), done.set()))
    thread.start()
    assert not done.wait(0.2)          # full: the writer waits instead of dropping
    ring.discard_before(2)
    assert done.wait(2.0) and ring.dropped == 0
    thread = threading.Thread(target=ring.put, args=(frame(4),))
    thread.start()
    ring.close()                       # stop() path: a blocked writer gives up
    thread.join(2.0)
    assert not thread.is_alive()


def test_audio_ring_reads_exact_lengths_with_jittered_stamps():
    ring = AudioRing(16000, capacity_s=5.0)
    t0 = 10 * NS_PER_S
    rng = np.random.default_rng(0)
    chunk = 512
    for k in range(100):  # 3.2 s of audio, stamps after the first jittered by up to 20 ms
        stamp = t0 + k * chunk * NS_PER_S // 16000 + (int(rng.integers(0, 20_000_000)) if k else 0)
        ring.write(np.full(chunk, k % 7, np.int16) + 1, stamp)
    assert ring.resyncs == 0
    samples, coverage = ring.read(t0 + NS_PER_S, t0 + 3 * NS_PER_S)
    assert samples.size == 32000 and samples.dtype == np.float32 and coverage == 1.0
    runs = np.diff(np.flatnonzero(np.diff(samples) != 0))
    assert np.all(runs == chunk)  # placed by sample counting: no overlap, no gap despite the jitter
    # a window reaching before the first sample: zeros there, exact length all the same
    samples, coverage = ring.read(t0 - NS_PER_S // 2, t0 + NS_PER_S // 2)
    assert samples.size == 16000 and np.all(samples[:8000] == 0) and coverage == pytest.approx(0.5)


def test_audio_ring_gap_resync_and_capacity():
    ring = AudioRing(16000, capacity_s=1.0)
    ring.write(np.ones(8000, np.float32), 0)
    ring.write(np.ones(8000, np.float32), NS_PER_S)  # 0.5 s of silence lost between the chunks
    assert ring.resyncs == 1
    samples, coverage = ring.read(0, 3 * NS_PER_S // 2)
    assert samples.size == 24000 and coverage == pytest.approx(2 / 3)
    assert np.all(samples[8000:16000] == 0)
    ring.write(np.ones(8000, np.float32), 3 * NS_PER_S // 2)
    assert ring.dropped == 1 and ring.start_ns() == NS_PER_S  # bounded: the oldest chunk went
    with pytest.raises(InputError):
        ring.write(np.ones((2, 10)), 0)


# --- sources -----------------------------------------------------------------------------------------------
def test_missing_camera_is_a_clear_error():
    with pytest.raises(InputError) as info:
        CameraSource(99).start()
    message = str(info.value)
    assert "camera 99 could not be opened" in message and "/dev/video99 does not exist" in message
    assert "--video FILE" in message and "--no-camera" not in message and "another program" not in message
    with pytest.raises(InputError, match="could not be opened"):
        CameraSource("/nonexistent/video.mjpeg").start()


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        VideoFileSource(tmp_path / "missing.mp4", RATE).start()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(InputError, match="cannot decode"):
        VideoFileSource(junk, RATE).start()
    clip = write_sample_clip(tmp_path / "tiny.mp4", seconds=0.5, voice="synth")
    with pytest.raises(InputError, match="no usable track"):
        VideoFileSource(clip, RATE, options=FileConfig(video=False, audio=False)).start()


def test_file_offline_delivers_every_frame_in_order(clip):
    src = VideoFileSource(clip, RATE, realtime=False, options=FileConfig(ring_seconds=0.5))
    seen = []
    with src:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            batch = src.frames.between(seen[-1].t_ns + 1 if seen else 0, 2**62)
            seen += batch
            if batch:
                src.frames.discard_before(batch[-1].t_ns + 1)  # the consumer frees room; the writer blocks
            if src.finished and not batch:
                break
            time.sleep(0.005)
        src.check()
    assert len(seen) == int(SECONDS * FPS) and [f.index for f in seen] == list(range(len(seen)))
    times = np.array([f.t_ns for f in seen])
    assert np.all(np.diff(times) > 0)
    assert np.allclose(np.diff(times), NS_PER_S / FPS, atol=1e6)   # the file's pts on the monotonic clock
    assert abs(times[0] - src.origin_ns) < 1e6
    assert seen[0].image.shape == (240, 320, 3) and seen[0].image.dtype == np.uint8


def test_file_realtime_pacing(tmp_path):
    clip = write_sample_clip(tmp_path / "short.mp4", seconds=1.5, voice="synth")
    src = VideoFileSource(clip, RATE, realtime=True)
    lags = []
    with src:
        deadline = time.monotonic() + 6
        while not src.finished and time.monotonic() < deadline:
            latest = src.frames.latest()
            if latest is not None:
                lags.append(now_ns() - latest.t_ns)  # an item never shows before its capture time
            time.sleep(0.01)
        src.check()
        elapsed = (now_ns() - src.origin_ns) / NS_PER_S
        end = src.audio.end_ns()
    assert min(lags) >= 0 and elapsed >= 1.4
    assert abs((end - src.origin_ns) / NS_PER_S - 1.5) < 0.1


def test_audio_only_and_video_only(clip):
    with VideoFileSource(clip, RATE, realtime=False, options=FileConfig(audio=False)) as video_only:
        assert video_only.audio is None and video_only.frames is not None
    with VideoFileSource(clip, RATE, realtime=False, options=FileConfig(video=False)) as audio_only:
        assert audio_only.frames is None and audio_only.audio is not None


class _Failing(Source):
    """A real source whose capture thread dies: the base class must record and report it."""
    kind = "camera"

    def __init__(self, name, realtime, error=OSError("USB device disconnected")):
        super().__init__(name, realtime)
        self.failure = error

    def _open(self):
        self.frames = FrameRing(4)
        self._spawn("reader", self._body)

    def _body(self):
        self.frames.put(frame(1))
        raise self.failure


def test_thread_failure_is_recorded_and_reported():
    src = _Failing("test-cam", realtime=True).start()
    deadline = time.monotonic() + 2
    while not src.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.finished and isinstance(src.error, OSError)
    with pytest.raises(InputError, match="camera test-cam failed: OSError: USB device disconnected"):
        src.check()
    src.stop()


def test_a_bug_in_a_capture_thread_is_not_relabelled_as_bad_input(caplog):
    src = _Failing("test-cam", realtime=True, error=ZeroDivisionError("division by zero")).start()
    deadline = time.monotonic() + 2
    while not src.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ZeroDivisionError) as info:
        src.check()
    assert info.value.__traceback__ is not None and "_body" in str(info.traceback[-1])
    assert "camera test-cam failed unexpectedly" in caplog.text and "Traceback" in caplog.text
    src.stop()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
def test_espeak_voice(tmp_path):
    from edge_emollama.tools.sample_clip import espeak_voice
    x = espeak_voice("hello there", 2.0)
    assert x.size == 32000 and np.sqrt(np.mean(x ** 2)) > 0.01
