"""MicrophoneSource through a real PulseAudio server whose default source is a FIFO we write PCM into.

Needs (CI installs them): apt ``pulseaudio pulseaudio-utils portaudio19-dev libasound2-plugins`` and
pip ``pyaudio``. The server runs with its own XDG_RUNTIME_DIR and is killed at the end.
"""
import os
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest

from edge_emollama.errors import InputError
from edge_emollama.runtime.clock import NS_PER_S, now_ns
from edge_emollama.runtime.sources import MicrophoneSource
from edge_emollama.runtime.windows import WindowPlan, WindowScheduler
from edge_emollama.spec import TINY

RATE = TINY.hubert.sample_rate   # the model's rate: the virtual microphone delivers at it
MISSING = [tool for tool in ("pulseaudio", "pactl") if shutil.which(tool) is None]
try:
    import pyaudio  # noqa: F401
except ImportError:
    MISSING.append("pyaudio (pip install pyaudio; needs apt portaudio19-dev)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"microphone test needs {', '.join(MISSING)}: apt-get install "
                                "pulseaudio pulseaudio-utils portaudio19-dev libasound2-plugins && pip install pyaudio")


def _pactl(env, *args):
    return subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)


@pytest.fixture
def virtual_mic(monkeypatch):
    """A PulseAudio server with a pipe source as the default input; yields the FIFO path."""
    runtime = tempfile.mkdtemp(prefix="pulse-test-")
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime, "PULSE_SERVER": f"unix:{runtime}/pulse/native"}
    subprocess.run(["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n",
                    "--load=module-native-protocol-unix"], env=env, capture_output=True, timeout=15)
    try:
        deadline = time.monotonic() + 10
        while _pactl(env, "info").returncode != 0:
            assert time.monotonic() < deadline, "PulseAudio did not start"
            time.sleep(0.1)
        fifo = os.path.join(runtime, "mic.fifo")
        loaded = _pactl(env, "load-module", "module-pipe-source", "source_name=virtmic", f"file={fifo}",
                        "format=s16le", f"rate={RATE}", "channels=1")
        assert loaded.returncode == 0, loaded.stderr
        assert _pactl(env, "set-default-source", "virtmic").returncode == 0
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        monkeypatch.setenv("PULSE_SERVER", env["PULSE_SERVER"])
        yield fifo
    finally:
        subprocess.run(["pulseaudio", "--kill"], env=env, capture_output=True, timeout=10)
        shutil.rmtree(runtime, ignore_errors=True)


class Feeder:
    """Writes 20 ms blocks of PCM into the FIFO in real time: silence with one 440 Hz burst at ``burst_at``."""

    def __init__(self, fifo: str, burst_at_s: float = 1.0, burst_s: float = 0.2):
        self.fifo, self.burst_at_s, self.burst_s = fifo, burst_at_s, burst_s
        self.burst_ns: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        fd = os.open(self.fifo, os.O_WRONLY)
        try:
            block, start, k = RATE // 50, time.monotonic(), 0
            t = np.arange(block) / RATE
            while not self.stop.is_set() and k < 500:  # at most 10 s
                at = k * 0.02
                loud = self.burst_at_s <= at < self.burst_at_s + self.burst_s
                if loud and self.burst_ns is None:
                    self.burst_ns = now_ns()
                x = 0.5 * np.sin(2 * np.pi * 440 * (t + at)) if loud else np.zeros(block)
                os.write(fd, (x * 32767).astype("<i2").tobytes())
                k += 1
                time.sleep(max(0.0, start + k * 0.02 - time.monotonic()))
        finally:
            os.close(fd)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def test_microphone_capture_through_pulseaudio(virtual_mic):
    with Feeder(virtual_mic, burst_at_s=1.6) as feeder:
        mic = MicrophoneSource(None, RATE).start()  # the default input: ALSA 'default' -> PulseAudio -> virtmic
        try:
            # back-to-back windows (W = H), so that together they hold the whole capture
            scheduler = WindowScheduler(None, mic, WindowPlan.for_spec(TINY, window_s=1.0, hop_s=1.0))
            deadline = time.monotonic() + 8
            windows = []
            while time.monotonic() < deadline and len(windows) < 3:
                window = scheduler.next_window(timeout_s=1.0)
                if window is not None:
                    windows.append(window)
            mic.check()
        finally:
            mic.stop()
    assert mic.finished and mic.error is None and mic.device_name
    assert len(windows) == 3 and [w.audio.size for w in windows] == [RATE] * 3
    assert np.all(np.diff([w.t0_ns for w in windows]) == NS_PER_S)
    assert mic.audio.resyncs <= 1 and min(w.presence.audio_coverage for w in windows) > 0.99  # contiguous, bursts or not
    samples = np.concatenate([w.audio for w in windows])
    loud = np.flatnonzero(np.abs(samples) > 0.1)
    assert loud.size > 0.1 * RATE, "the burst written into the FIFO did not arrive"
    spectrum = np.abs(np.fft.rfft(samples[loud[0]:loud[0] + 1600]))
    assert abs(np.argmax(spectrum) * RATE / 1600 - 440) <= 20
    placed = windows[0].t0_ns + loud[0] * NS_PER_S // RATE
    assert abs(placed - feeder.burst_ns) < 0.2 * NS_PER_S           # capture time within 200 ms of the write
    assert not windows[0].presence.audio and any(w.presence.audio for w in windows[1:])  # silence, then the burst


def test_unknown_microphone_lists_the_devices(virtual_mic):
    with pytest.raises(InputError) as info:
        MicrophoneSource("no-such-microphone", RATE).start()
    message = str(info.value)
    assert "no-such-microphone" in message and "pulse" in message and "--no-mic" in message


def test_no_input_device_is_a_clear_error(tmp_path):
    """Without a sound server or card, PortAudio lists no input: the error says what to do."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PULSE_SERVER", "XDG_RUNTIME_DIR")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # no PulseAudio server there
    code = ("from edge_emollama.runtime.sources import MicrophoneSource\n"
            "try:\n    MicrophoneSource(None, 16000).start().stop()\n    print('OPENED')\n"
            "except Exception as e:\n    print('ERROR', type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    if "OPENED" in out or "no microphone" not in out and "could not be opened" in out:
        pytest.skip("this machine has a real audio input device")
    assert "ERROR InputError no microphone" in out and "--no-mic" in out, out
