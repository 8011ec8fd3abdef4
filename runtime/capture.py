"""The capture stage: the configured sources, the window scheduler over them, and speech recognition.

With ``runtime.asr`` set, every window carries the newest transcript that is ready when the window is cut
(``stamp.subtitle``: the window never waits for one), and the speech up to the window's end is handed to the
recognition worker for the windows that follow (runtime/asr.py).
"""
from __future__ import annotations

from ..config import RuntimeConfig
from ..errors import InputError
from ..manifest import Artifacts
from .asr import AsrWorker, Transcriber
from .faces import FaceCache, make_detector
from .items import WindowItem
from .sources import CameraSource, MicrophoneSource, VideoFileSource
from .windows import WindowPlan, WindowScheduler

__all__ = ["Capture", "open_sources"]


def open_sources(config: RuntimeConfig, sample_rate: int) -> tuple:
    """(every started source, the video one or None, the audio one or None) as ``runtime.sources`` says."""
    sources, video, audio = [], None, None
    wanted = config.sources
    try:
        if wanted.video is not None:
            video = audio = VideoFileSource(wanted.video, sample_rate, realtime=wanted.realtime,
                                            options=config.file).start()
            sources.append(video)
        if wanted.camera is not None:
            video = CameraSource(wanted.camera, config.camera).start()
            sources.append(video)
        if wanted.microphone is not None:
            name = wanted.microphone
            audio = MicrophoneSource(None if name == "default" else name, sample_rate, config.microphone).start()
            sources.append(audio)
    except BaseException:
        for source in sources:
            source.stop()
        raise
    if not sources:
        raise InputError("no source: give --camera, --mic or --video (see edge-emollama run --help)")
    return (sources, video if video is not None and video.frames is not None else None,
            audio if audio is not None and audio.audio is not None else None)


class Capture:
    """Windows from the configured sources, each stamped with what was lost before it and, with speech
    recognition, with the newest transcript."""

    def __init__(self, config: RuntimeConfig, artifacts: Artifacts, plan: WindowPlan):
        self.plan = plan
        self.sources, video, audio = open_sources(config, plan.sample_rate)
        self.asr: AsrWorker | None = None
        try:
            history_s = 0.0
            if config.asr.model is not None and audio is not None:
                self.asr = AsrWorker(Transcriber(config.asr), audio.audio, config.asr)
                history_s = config.asr.context_s
            faces = FaceCache(make_detector(artifacts, config.faces))
            self.scheduler = WindowScheduler(video, audio, plan, faces, history_s=history_s)
        except BaseException:
            self.close()
            raise

    @property
    def ended(self) -> bool:
        return self.scheduler.ended

    def next_window(self, timeout_s: float) -> WindowItem | None:
        """The next window (None on timeout or at the end), its subtitle and losses stamped."""
        window = self.scheduler.next_window(timeout_s=timeout_s)
        if window is None:
            return None
        if self.asr is not None:   # the newest transcript ready now; then the speech up to this window
            window.stamp.subtitle = self.asr.pick(window.t1_ns, self.plan.hop_ns).text
            self.asr.submit_until(window.t1_ns)
        window.stamp.dropped = self.scheduler.dropped
        return window

    def stop(self) -> None:
        """Stop capturing (idempotent); the recognition worker finishes with close()."""
        for source in self.sources:
            source.stop()

    def close(self) -> None:
        self.stop()
        if self.asr is not None:
            self.asr.close()
