"""Sources that start late, drop and come back: real files written with PyAV, a real ffmpeg MJPEG server.

Files: tracks that do not start together (HEVC + AAC 44.1 kHz in .mov as a phone writes it, mp3, 8 kHz
stereo), garbage bytes in the middle, a file cut in half. Live: an HTTP MJPEG camera (ffmpeg) stopped and
restarted under a running CameraSource and WindowScheduler. Every wait is bounded.
"""
import logging
import shutil
import socket
import subprocess
import time
from fractions import Fraction

import numpy as np
import pytest

from edge_emollama.config import CameraConfig, FaceConfig, FileConfig
from edge_emollama.errors import InputError
from edge_emollama.runtime.clock import NS_PER_S, now_ns
from edge_emollama.runtime.faces import FaceCache, HaarDetector
from edge_emollama.runtime.sources import CameraSource, VideoFileSource
from edge_emollama.runtime.windows import WindowPlan, WindowScheduler
from edge_emollama.spec import TINY
from edge_emollama.tools.sample_clip import draw_face, synth_voice

av = pytest.importorskip("av")

RATE = TINY.hubert.sample_rate
FPS = 10
FAST_FACES = FaceConfig(detect_width=160, min_size_frac=0.3, scale_factor=1.2)
PLAN = WindowPlan.for_spec(TINY)   # W = 2 s, H = 0.5 s


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:   # PyAV raises UnknownCodecError (or ValueError in older versions)
        return False


HEVC = "libx265" if _has_encoder("libx265") else "libx264"   # the phone's codec when PyAV's build has it


def _video_stream(container, codec: str):
    stream = container.add_stream(codec, rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    stream.time_base = Fraction(1, FPS)
    stream.gop_size = FPS   # a keyframe every second, as cameras write: decoding recovers after damage
    if codec == "libx265":
        stream.options = {"x265-params": f"log-level=error:keyint={FPS}:min-keyint={FPS}"}
    return stream


def _audio_frame(stream, samples: np.ndarray, channels: int, rate: int, pts: int):
    planes = np.stack([samples] * channels).astype(np.float32)
    if stream.format.name.startswith(("s16", "s32")):   # an encoder that takes integer samples (libmp3lame)
        bits = 15 if stream.format.name.startswith("s16") else 31
        planes = (planes * (2 ** bits - 1)).astype(np.int16 if bits == 15 else np.int32)
    packed = not stream.format.name.endswith("p")
    data = planes.T.reshape(1, -1).copy() if packed else np.ascontiguousarray(planes)
    frame = av.AudioFrame.from_ndarray(data, format=stream.format.name, layout=stream.layout.name)
    frame.sample_rate, frame.pts = rate, pts
    return frame


def write_clip(path, seconds=6.0, *, video_start=0.0, audio_start=0.0, vcodec=HEVC, acodec="aac",
               rate=44100, channels=1, faststart=False):
    """A drawn face from ``video_start`` and a synthesized voice from ``audio_start`` to ``seconds``,
    muxed in time order as a recorder does; each track's first timestamp is its start."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        video = _video_stream(container, vcodec)
        audio = container.add_stream(acodec, rate=rate)
        audio.layout = "mono" if channels == 1 else "stereo"
        audio.time_base = Fraction(1, rate)
        voice, chunk = synth_voice(seconds - audio_start, rate), 1152
        events = [(video_start + k / FPS, "v", k) for k in range(int(round((seconds - video_start) * FPS)))]
        events += [(audio_start + s / rate, "a", s) for s in range(0, voice.size - chunk + 1, chunk)]
        face = av.VideoFrame.from_ndarray(draw_face(), format="rgb24")
        for t, kind, k in sorted(events):
            if kind == "v":
                face.pts = int(round(t * FPS))
                packets = video.encode(face)
            else:
                packets = audio.encode(_audio_frame(audio, voice[k:k + chunk], channels, rate, int(round(t * rate))))
            for packet in packets:
                container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
    return path


def run_windows(path, realtime=False, limit_s=20.0, max_windows=None):
    """Every window of the file (bounded); returns (source, scheduler, windows)."""
    src = VideoFileSource(path, RATE, realtime=realtime)
    with src:
        scheduler = WindowScheduler(src, src, PLAN, FaceCache(HaarDetector(FAST_FACES)))
        windows, deadline = [], time.monotonic() + limit_s
        while time.monotonic() < deadline and not scheduler.ended:
            window = scheduler.next_window(timeout_s=1.0)
            if window is not None:
                windows.append(window)
            if max_windows is not None and len(windows) >= max_windows:
                break
        finished = scheduler.ended or len(windows) == max_windows
    assert finished, f"no end of {path.name} within {limit_s} s: {len(windows)} windows"
    return src, scheduler, windows


def rel_s(src, t_ns: int) -> float:
    return (t_ns - src.origin_ns) / NS_PER_S


def assert_follows_video_then_audio(src, windows, seconds):
    """Windows from the video's first frame; audio absent while the window lies before the audio track (which
    starts where the container says: the encoder's priming samples come a few ms before the voice)."""
    audio_start_s = src.track_spans_s["audio"][0]
    assert rel_s(src, windows[0].t0_ns) == pytest.approx(0.0, abs=0.01)
    assert rel_s(src, windows[-1].t1_ns) >= seconds - PLAN.hop_s - 0.01
    for w in windows:
        assert w.presence.video and w.presence.face, f"window {w.index}: the face is there from the first frame"
        before = rel_s(src, w.t1_ns) <= audio_start_s
        assert w.presence.audio_active is not before, f"window {w.index} at {rel_s(src, w.t0_ns)} s"
        if rel_s(src, w.t0_ns) >= audio_start_s + 0.1:
            assert w.presence.audio_coverage == 1.0 and w.presence.audio
    assert not any(w.presence.to_wire()["audio"]["present"] for w in windows if rel_s(src, w.t1_ns) <= audio_start_s)


# --- tracks that do not start together ----------------------------------------------------------------------
@pytest.mark.parametrize("late_s", [2.4, 6.0])
def test_late_audio_in_a_phone_mov_is_absent_until_it_begins(tmp_path, late_s):
    seconds = late_s + 3.0
    clip = write_clip(tmp_path / "phone.mov", seconds, audio_start=late_s)
    src, scheduler, windows = run_windows(clip)
    assert src.track_spans_s["audio"][0] == pytest.approx(late_s, abs=0.05)   # the container says where it starts
    assert_follows_video_then_audio(src, windows, seconds)
    assert [w.index for w in windows] == list(range(len(windows))) and scheduler.dropped == 0
    assert sum(src.bad_packets.values()) == 0 and not src.cut_short


def test_late_video_is_absent_until_it_begins(tmp_path):
    clip = write_clip(tmp_path / "late_video.mov", 5.0, video_start=2.4)
    src, _, windows = run_windows(clip)
    assert rel_s(src, windows[0].t0_ns) == pytest.approx(0.0, abs=0.05)   # the audio's first sample
    for w in windows:
        assert w.presence.audio_active and w.presence.audio_coverage > 0.9
        before = rel_s(src, w.t1_ns) <= 2.4
        assert w.presence.video is not before and (w.frame is None) is before
        assert w.presence.to_wire()["video"]["present"] is not before


@pytest.mark.parametrize("name,acodec,rate,channels", [("mp3.mkv", "mp3", 44100, 1),
                                                      ("stereo8k.mp4", "aac", 8000, 2)])
def test_other_audio_codecs_and_rates_start_late_too(tmp_path, name, acodec, rate, channels):
    clip = write_clip(tmp_path / name, 5.4, vcodec="libx264", audio_start=2.4, acodec=acodec, rate=rate,
                      channels=channels)
    src, _, windows = run_windows(clip)
    assert_follows_video_then_audio(src, windows, 5.4)
    voiced = [w for w in windows if rel_s(src, w.t0_ns) >= 2.5]
    assert voiced and all(w.audio.size == 2 * RATE and w.presence.audio_rms > 0.01 for w in voiced)


def test_late_audio_in_real_time_starts_at_once_without_camera_wording(tmp_path):
    """6 s of missing audio: the first window comes after W, with the face and no audio; no start timeout."""
    clip = write_clip(tmp_path / "late6.mov", 7.0, audio_start=6.0)
    started = time.monotonic()
    src, _, windows = run_windows(clip, realtime=True, limit_s=6.0, max_windows=2)
    waited = time.monotonic() - started
    assert waited < PLAN.window_s + PLAN.hop_s + 1.5
    assert rel_s(src, windows[0].t0_ns) == pytest.approx(0.0, abs=0.01)
    assert all(w.presence.face and not w.presence.audio_active for w in windows)


def test_late_audio_in_real_time_keeps_every_window_of_the_video(tmp_path):
    clip = write_clip(tmp_path / "late24.mov", 4.4, audio_start=2.4)
    src, _, windows = run_windows(clip, realtime=True, limit_s=10.0)
    assert rel_s(src, windows[0].t0_ns) == pytest.approx(0.0, abs=0.01) and windows[0].presence.face
    assert not windows[0].presence.audio_active and windows[-1].presence.audio_active
    assert sum(w.presence.face for w in windows) >= len(windows) - 1


# --- damaged files --------------------------------------------------------------------------------------------
def _garble(path, fraction=0.5, size=4096):
    data = bytearray(path.read_bytes())
    at = int(len(data) * fraction)
    data[at:at + size] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _cut(path, fraction=0.5):
    path.write_bytes(path.read_bytes()[:int(len(path.read_bytes()) * fraction)])


def test_garbage_in_the_middle_is_skipped_and_counted(tmp_path, caplog):
    clip = write_clip(tmp_path / "damaged.mov", 6.0, faststart=True)
    _, _, intact = run_windows(clip)
    _garble(clip)
    with caplog.at_level(logging.WARNING):
        src, _, windows = run_windows(clip)
    assert sum(src.bad_packets.values()) > 0 and "unreadable" in caplog.text
    assert len(windows) == len(intact) and windows[-1].t1_ns - windows[0].t0_ns >= 5 * NS_PER_S   # to the end
    assert sum(w.presence.face for w in windows) >= len(windows) - 3
    assert not src.cut_short and src.error is None


@pytest.mark.parametrize("name,faststart", [("cut.mkv", False), ("cut.mov", True)])
def test_a_file_cut_short_ends_as_end_of_input_with_a_warning(tmp_path, caplog, name, faststart):
    clip = write_clip(tmp_path / name, 6.0, faststart=faststart)
    _cut(clip)
    with caplog.at_level(logging.WARNING):
        src, scheduler, windows = run_windows(clip)
    assert scheduler.ended and src.cut_short and "cut short" in caplog.text and src.error is None
    assert windows and 2.0 <= rel_s(src, windows[-1].t1_ns) <= 4.0 and all(w.presence.face for w in windows)


def test_a_mov_cut_before_its_index_is_refused_in_file_wording(tmp_path):
    clip = write_clip(tmp_path / "noindex.mov", 4.0)   # the index (moov) is written last
    _cut(clip)
    with pytest.raises(InputError) as info:
        VideoFileSource(clip, RATE, realtime=False).start()
    assert "cut short" in str(info.value) and "cable" not in str(info.value)


# --- a network camera that goes away and comes back -------------------------------------------------------------
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the camera test serves MJPEG with ffmpeg: "
                                  "apt-get install -y ffmpeg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MjpegServer:
    """``ffmpeg`` serving a 10 fps test pattern as MJPEG over HTTP on loopback (one client at a time)."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/feed.mjpg"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MjpegServer":
        self.process = subprocess.Popen(
            [FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
             "testsrc=size=320x240:rate=10", "-f", "mpjpeg", "-listen", "1", self.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None


def _open_camera(url: str, within_s: float = 5.0) -> CameraSource:
    """The server needs a moment to listen: try until it answers (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return CameraSource(url, CameraConfig(ring_seconds=3.0)).start()
        except InputError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_for(condition, within_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True


@needs_ffmpeg
def test_a_lost_network_camera_is_reopened_and_windows_go_on(tmp_path):
    server = MjpegServer(_free_port()).start()
    camera = None
    try:
        camera = _open_camera(server.url)
        assert _wait_for(lambda: len(camera.frames) >= 5, 5.0) and camera.state == "capturing"
        server.stop()
        assert _wait_for(lambda: camera.state == "lost", 5.0), "the loss was not noticed"
        lost_at = camera.frames.last_t_ns()
        assert camera.losses == 1 and not camera.connected and not camera.finished
        time.sleep(0.5)
        assert camera.frames.last_t_ns() == lost_at                     # its frames stopped
        returned = now_ns()
        server.start()
        assert _wait_for(lambda: camera.frames.last_t_ns() != lost_at, 4.0), "the camera did not come back"
        assert (camera.frames.last_t_ns() - returned) / NS_PER_S < 2.0  # frames within 2 s of its return
        assert camera.reconnects == 1 and camera.state == "capturing" and camera.error is None
        latest = camera.frames.latest()
        assert latest.image.shape == (240, 320, 3) and latest.t_ns > lost_at
    finally:
        server.stop()
        if camera is not None:
            camera.stop()


@needs_ffmpeg
def test_windows_flow_without_video_while_the_camera_is_gone():
    server = MjpegServer(_free_port()).start()
    camera = None
    try:
        camera = _open_camera(server.url)
        plan = WindowPlan.for_spec(TINY, window_s=0.5, hop_s=0.25)
        scheduler = WindowScheduler(camera, None, plan, FaceCache(HaarDetector(FAST_FACES)))
        windows, events = [], {}
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and len(windows) < 200:
            window = scheduler.next_window(timeout_s=1.0)
            assert window is not None, f"no window for 1 s (camera {camera.state})"
            windows.append(window)
            if len(windows) == 6:
                server.stop()
                events["stopped"] = now_ns()
            if "stopped" in events and "started" not in events and now_ns() - events["stopped"] > 2.0 * NS_PER_S:
                server.start()
                events["started"] = now_ns()
            if "started" in events and now_ns() - events["started"] > 2.6 * NS_PER_S:
                break
        gone = [w for w in windows if events["stopped"] + NS_PER_S < w.t0_ns and w.t1_ns < events["started"]]
        back = [w for w in windows if w.t0_ns > events["started"] + 2 * NS_PER_S]   # video within 2 s of return
        assert gone and not any(w.presence.video for w in gone)      # said absent while it is gone
        assert back and all(w.presence.video for w in back)          # and present again after its return
        assert all(w.presence.video for w in windows[1:5])
        gaps = np.diff([w.t1_ns for w in windows]) / NS_PER_S
        assert gaps.max() <= 1.0                                     # windows never stopped flowing
        assert camera.losses == 1 and camera.reconnects == 1
    finally:
        server.stop()
        if camera is not None:
            camera.stop()
