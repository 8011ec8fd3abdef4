"""A sample clip made on the spot: a drawn face that OpenCV's Haar cascade detects, and a voice.

No network and no outside files: the face is drawn with OpenCV (an oval face with hair, eyebrows, dark
eyes, nose and a mouth that opens with the voice's loudness; the drawing was tuned until
``haarcascade_frontalface_default`` fires on every frame at the sizes used here), and the voice is either
``espeak-ng`` (when installed, run at generation time) or a synthesized vowel-like signal (a glottal pulse
train at 110-170 Hz shaped by vowel formants, in syllables of ~4 Hz with pauses). The clip is H.264 + AAC
in MP4 (or Matroska for ``.mkv``), written with PyAV.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import ConfigError, OutputError
from ..lazy import require

__all__ = ["write_sample_clip", "write_group_clip", "group_centres", "draw_face", "synth_voice", "espeak_voice"]

SAMPLE_RATE = 16000   # the clip file's own audio rate (a reader resamples any rate to the model's)
VOICES = ("auto", "espeak", "synth", "none")
_FORMANTS = {  # (F1, F2, F3) Hz of five vowels
    "a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (390, 1990, 2550),
    "o": (570, 840, 2410), "u": (440, 1020, 2240),
}


def draw_face(width: int = 320, height: int = 240, center: tuple[int, int] | None = None, scale: float = 1.0,
              mouth_open: float = 0.0) -> np.ndarray:
    """An RGB uint8 ``[height, width, 3]`` image of a frontal face, about ``150 * scale`` pixels tall."""
    cv2 = require("cv2")
    cx, cy = center if center is not None else (width // 2, height // 2)

    def s(v: float) -> int:
        return max(1, int(round(v * scale)))

    img = np.full((height, width, 3), (130, 110, 90), np.uint8)  # RGB background
    cv2.ellipse(img, (cx, cy - s(10)), (s(62), s(82)), 0, 0, 360, (50, 40, 40), -1)   # hair
    cv2.ellipse(img, (cx, cy), (s(55), s(72)), 0, 0, 360, (220, 180, 150), -1)         # skin
    for side in (-1, 1):
        ex, ey = cx + side * s(22), cy - s(18)
        cv2.ellipse(img, (ex, ey - s(12)), (s(15), s(4)), 0, 180, 360, (60, 50, 40), s(4))  # eyebrow
        cv2.ellipse(img, (ex, ey), (s(13), s(7)), 0, 0, 360, (70, 60, 60), -1)              # eye
        cv2.circle(img, (ex, ey), s(5), (20, 20, 20), -1)                                   # pupil
    cv2.line(img, (cx, cy - s(10)), (cx - s(5), cy + s(15)), (170, 130, 110), s(3))          # nose
    cv2.ellipse(img, (cx, cy + s(18)), (s(9), s(4)), 0, 0, 360, (160, 120, 100), -1)
    mouth = (s(20), s(5 + 8 * float(np.clip(mouth_open, 0.0, 1.0))))
    cv2.ellipse(img, (cx, cy + s(38)), mouth, 0, 0, 360, (140, 60, 60), -1)
    return cv2.GaussianBlur(img, (0, 0), 2.0 * scale)


def _syllable_envelope(t: np.ndarray, start: float, stop: float, rate_hz: float = 4.0) -> np.ndarray:
    """Loudness 0..1: syllables at ``rate_hz`` between ``start`` and ``stop``, a pause every fifth one."""
    phase = (t - start) * rate_hz
    env = np.sin(np.pi * (phase % 1.0)) ** 2
    env[(np.floor(phase) % 5) == 4] = 0.0
    env[(t < start) | (t >= stop)] = 0.0
    return env


def synth_voice(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A voice-like float32 signal: vowel formants on a pitch contour, in syllables, with pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.4 * t) + 3 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    vowels = np.array(list(_FORMANTS.values()), dtype=np.float64)
    syllable = np.floor(t * 4.0).astype(int)
    formants = vowels[rng.integers(0, len(vowels), size=int(syllable.max()) + 1)][syllable]  # [n, 3]
    out = np.zeros(n)
    for k in range(1, int(3800 // f0.min())):
        gain = np.exp(-0.5 * ((k * f0[:, None] - formants) / 90.0) ** 2).sum(axis=1) + 0.02
        out += gain / k * np.sin(k * phase)
    out *= _syllable_envelope(t, 0.4, seconds - 0.4)
    out += 0.002 * rng.standard_normal(n)
    return (0.3 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def espeak_voice(text: str, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """``text`` spoken by espeak-ng (when installed), placed from 0.4 s and cut/padded to ``seconds``."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    wav = subprocess.run([exe, "-v", "en-us", "-s", "150", "--stdout", text], capture_output=True,
                         timeout=30, check=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate, width = w.getframerate(), w.getsampwidth()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16 if width == 2 else np.uint8)
    x = pcm.astype(np.float32) / 32768.0
    n_out = int(round(x.size * sample_rate / rate))
    x = np.interp(np.arange(n_out) * rate / sample_rate, np.arange(x.size), x).astype(np.float32)
    out = np.zeros(int(round(seconds * sample_rate)), np.float32)
    lead = int(0.4 * sample_rate)
    take = max(0, min(x.size, out.size - 2 * lead))
    out[lead:lead + take] = x[:take]
    return 0.3 * out / max(float(np.abs(out).max()), 1e-9)


def _voice(kind: str, seconds: float) -> np.ndarray:
    if kind not in VOICES:
        raise ConfigError(f"voice='{kind}': use one of {VOICES}")
    n = int(round(seconds * SAMPLE_RATE))
    if kind == "none":
        return np.zeros(n, np.float32)
    if kind in ("auto", "espeak"):
        spoken = espeak_voice("Hello! I am a test face. I am so happy to see you today. How are you?", seconds)
        if spoken is not None:
            return spoken
        if kind == "espeak":
            raise ConfigError("voice='espeak' needs espeak-ng: apt-get install espeak-ng (or use voice='synth')")
    return synth_voice(seconds)


def _mouth(audio: np.ndarray, t: float) -> float:
    lo = max(0, int((t - 0.04) * SAMPLE_RATE))
    chunk = audio[lo:lo + int(0.08 * SAMPLE_RATE)]
    return float(np.clip(np.sqrt(np.mean(chunk ** 2)) * 12, 0, 1)) if chunk.size else 0.0


def _open_output(av, path: Path):
    formats = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
    if path.suffix.lower() not in formats:
        raise ConfigError(f"sample clip {path}: use a .mp4, .mov or .mkv file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return av.open(str(path), mode="w", format=formats[path.suffix.lower()])
    except OSError as exc:
        raise OutputError(f"cannot write the sample clip to {path}: {exc}") from exc


def write_sample_clip(path: str | os.PathLike, seconds: float = 6.0, *, fps: int = 20,
                      size: tuple[int, int] = (320, 240), voice: str = "auto", face: bool = True,
                      seed: int = 0) -> Path:
    """Write a clip of ``seconds`` s at ``fps`` with a moving, talking face and a 16 kHz mono voice.

    ``voice``: auto (espeak-ng when installed, else synth), espeak, synth or none (silence);
    ``face=False`` draws the background only. Returns the path.
    """
    av = require("av")
    path = Path(path)
    width, height = size
    audio = _voice(voice, seconds)
    with _open_output(av, path) as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"preset": "veryfast", "crf": "20"}
        astream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        _write_video(av, container, vstream, audio, seconds, fps, size, face, seed)
        _write_audio(av, container, astream, audio)
    return path


def group_centres(faces: int, t: float, size: tuple[int, int], away: tuple | None = None,
                  cross: bool = False) -> list:
    """Where each of ``faces`` people is at ``t`` s (None: out of view): in a row, each swaying a little;
    ``away=(k, t0, t1)``: person k leaves at t0 and comes back at t1; ``cross``: person 1 walks across the
    frame and back below the others (passing person 0) over 4 s."""
    width, height = size
    out = []
    for k in range(faces):
        x = width * (k + 1) / (faces + 1) + 0.03 * width * np.sin(2 * np.pi * 0.3 * t + k)
        y = height * (0.42 if cross else 0.5) + 0.02 * height * np.sin(2 * np.pi * 0.4 * t + k)
        if cross and k == 1:
            phase = (t % 4.0) / 4.0
            x = width * (0.85 - 0.7 * (1 - abs(2 * phase - 1)))
            y = height * 0.42 + 0.36 * height
        gone = away is not None and away[0] == k and away[1] <= t < away[2]
        out.append(None if gone else (int(x), int(y)))
    return out


def write_group_clip(path: str | os.PathLike, faces: int = 2, seconds: float = 6.0, *, fps: int = 15,
                     size: tuple[int, int] = (640, 360), away: tuple | None = None, cross: bool = False,
                     voice: str = "auto", seed: int = 0) -> Path:
    """Like :func:`write_sample_clip` with several drawn people (:func:`group_centres`), one shared voice."""
    av = require("av")
    path = Path(path)
    audio = _voice(voice, seconds)
    def people(t: float) -> list:
        return group_centres(faces, t, size, away, cross)

    with _open_output(av, path) as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = size[0], size[1], "yuv420p"
        vstream.options = {"preset": "veryfast", "crf": "20"}
        astream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        _write_video(av, container, vstream, audio, seconds, fps, size, people, seed)
        _write_audio(av, container, astream, audio)
    return path


def _draw_people(size: tuple[int, int], centres: list, mouth: float) -> np.ndarray:
    """The background with a face at each centre (None: nobody), each face pasted within its own box."""
    width, height = size
    img = np.full((height, width, 3), (130, 110, 90), np.uint8)
    scale = height / 240 * 0.95 / max(1.5, len(centres) * 0.75)
    half = (int(75 * scale), int(100 * scale))
    for centre in centres:
        if centre is None:
            continue
        face = draw_face(width, height, centre, scale=scale, mouth_open=mouth)
        x0, y0 = max(0, centre[0] - half[0]), max(0, centre[1] - half[1])
        x1, y1 = min(width, centre[0] + half[0]), min(height, centre[1] + half[1])
        img[y0:y1, x0:x1] = face[y0:y1, x0:x1]
    return img


def _write_video(av, container, stream, audio, seconds, fps, size, face, seed) -> None:
    """``face``: one swaying face (True), none (False), or ``t -> centres`` for several people."""
    width, height = size
    rng = np.random.default_rng(seed)
    for i in range(int(round(seconds * fps))):
        t = i / fps
        center = (int(width / 2 + 0.06 * width * np.sin(2 * np.pi * 0.25 * t)),
                  int(height / 2 + 0.02 * height * np.sin(2 * np.pi * 0.4 * t)))
        if callable(face):
            img = _draw_people(size, face(t), _mouth(audio, t))
        elif face:
            img = draw_face(width, height, center, scale=height / 240 * 0.95, mouth_open=_mouth(audio, t))
        else:
            img = np.full((height, width, 3), (130, 110, 90), np.uint8)
        img = np.clip(img.astype(np.int16) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, fps)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _write_audio(av, container, stream, audio: np.ndarray) -> None:
    block = 1024
    for start in range(0, audio.size, block):
        chunk = np.ascontiguousarray(audio[start:start + block][None, :])
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
