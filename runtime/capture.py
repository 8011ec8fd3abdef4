"""The capture stage: the configured sources, a window scheduler per source, and speech recognition.

Sources (``runtime.sources``, the CLI's repeatable ``--camera``/``--video`` and ``--mic``) are grouped into
named *feeds* (:func:`plan_feeds`): each video file is a feed with its own audio; the microphone goes with the
first camera, or is a feed of its own without a camera. Every feed has its own timeline (its clock anchor),
its own face tracker and window scheduler; :class:`Capture` takes their windows in turn, so one slow or
finished feed never holds up another, and one set of model sessions serves them all.

A feed is named ``NAME=TARGET`` on the command line; otherwise its name comes from the argument: a file's
stem, ``camera<index>``, ``video<N>`` for /dev/videoN, ``camera`` for a stream URL, ``mic`` for a lone
microphone (``-2``, ``-3``, ... make repeated names unique).

With ``runtime.asr`` set, every window of a feed with audio carries the newest transcript that is ready when
the window is cut (``stamp.subtitle``: the window never waits for one), and the speech up to the window's end
is handed to that feed's recognition worker (runtime/asr.py) for the windows that follow.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import RuntimeConfig, SourcesConfig
from ..errors import InputError
from ..manifest import Artifacts
from ..protocol import check_source_name
from .asr import AsrWorker, Transcriber
from .faces import FaceCache, make_detector
from .items import WindowItem
from .sources import CameraSource, MicrophoneSource, VideoFileSource
from .tracks import Tracker
from .windows import WindowPlan, WindowScheduler

__all__ = ["Capture", "FeedPlan", "plan_feeds"]

NAMED = re.compile(r"^([A-Za-z0-9_-]{1,64})=(.+)$")


@dataclass(frozen=True)
class FeedPlan:
    """One named feed: a video file, or a camera and/or a microphone."""
    name: str
    video: str | None = None
    camera: str | None = None
    microphone: str | None = None


def _split(entry: str) -> tuple:
    """(name, target) of ``NAME=TARGET`` (unless the whole entry is an existing file), else (None, entry)."""
    match = NAMED.match(entry)
    if match and not Path(entry).exists():
        return check_source_name(match.group(1)), match.group(2)
    return None, entry


def _camera_name(target: str) -> str:
    if target.isdigit():
        return f"camera{target}"
    match = re.fullmatch(r"/dev/video(\d+)", target)
    return f"video{match.group(1)}" if match else "camera"


def _file_name(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(target).stem).strip("-")[:64] or "video"


def plan_feeds(sources: SourcesConfig) -> list:
    """The feeds ``runtime.sources`` asks for, uniquely named (see the module's docstring)."""
    feeds, taken = [], set()

    def unique(name: str) -> str:
        candidate, k = name, 2
        while candidate in taken:
            candidate, k = f"{name}-{k}", k + 1
        taken.add(candidate)
        return candidate

    for entry in sources.video:
        name, target = _split(entry)
        feeds.append(FeedPlan(unique(name or _file_name(target)), video=target))
    microphone = sources.microphone
    for k, entry in enumerate(sources.camera):
        name, target = _split(entry)
        feeds.append(FeedPlan(unique(name or _camera_name(target)), camera=target,
                              microphone=microphone if k == 0 else None))
    if microphone is not None and not sources.camera:
        name, target = _split(microphone)
        feeds.append(FeedPlan(unique(name or "mic"), microphone=target))
    if not feeds:
        raise InputError("no source: give --camera, --mic or --video (see edge-emollama run --help)")
    return feeds


class Feed:
    """One feed's started sources, its tracker and window scheduler, and its speech recognition."""

    def __init__(self, plan: FeedPlan, config: RuntimeConfig, artifacts: Artifacts, windows: WindowPlan,
                 annotator=None):
        self.name, self.plan, self.annotator = plan.name, windows, annotator
        self.sources, video, audio = [], None, None
        self.asr: AsrWorker | None = None
        self._annotated_ns: int | None = None   # frames up to here went to the annotator
        try:
            video, audio = self._open(plan, config, windows.sample_rate)
            history_s = 0.0
            if config.asr.model is not None and audio is not None:
                self.asr = AsrWorker(Transcriber(config.asr), audio.audio, config.asr)
                history_s = config.asr.context_s
            faces = FaceCache(make_detector(artifacts, config.faces), Tracker(config.tracks), config.max_faces)
            self.scheduler = WindowScheduler(video, audio, windows, faces, history_s=history_s, name=plan.name)
            self.fps = getattr(video, "fps", None)
        except BaseException:
            self.close()
            raise

    def _open(self, plan: FeedPlan, config: RuntimeConfig, sample_rate: int) -> tuple:
        """(the video source or None, the audio source or None), every opened one in ``self.sources``."""
        video = audio = None
        if plan.video is not None:
            video = audio = VideoFileSource(plan.video, sample_rate, realtime=config.sources.realtime,
                                            options=config.file).start()
            self.sources.append(video)
        if plan.camera is not None:
            video = CameraSource(plan.camera, config.camera).start()
            self.sources.append(video)
        if plan.microphone is not None:
            name = plan.microphone
            audio = MicrophoneSource(None if name == "default" else name, sample_rate, config.microphone).start()
            self.sources.append(audio)
        return (video if video is not None and video.frames is not None else None,
                audio if audio is not None and audio.audio is not None else None)

    def next_window(self, timeout_s: float) -> WindowItem | None:
        window = self.scheduler.next_window(timeout_s=timeout_s)
        if window is None:
            return None
        if self.asr is not None:   # the newest transcript ready now; then the speech up to this window
            window.stamp.subtitle = self.asr.pick(window.t1_ns, self.plan.hop_ns).text
            self.asr.submit_until(window.t1_ns)
        window.stamp.dropped = self.scheduler.dropped
        if self.annotator is not None:
            self._annotate(window.t0_ns, window.t1_ns)
        return window

    def _annotate(self, t0_ns: int, t1_ns: int) -> None:
        """Hand the frames captured since the last window to the annotator, with their tracked boxes."""
        since = t0_ns if self._annotated_ns is None else self._annotated_ns
        if t1_ns <= since:
            return
        for frame, tracked in self.scheduler.tracked_frames(since, t1_ns):
            boxes = {t.face_id: (t.face.box.x, t.face.box.y, t.face.box.w, t.face.box.h) for t in tracked}
            self.annotator.add_frame(self.name, frame.t_ns, frame.image, boxes, fps=self.fps)
        self._annotated_ns = t1_ns

    def stop(self) -> None:
        for source in self.sources:
            source.stop()

    def close(self) -> None:
        self.stop()
        if self.asr is not None:
            self.asr.close()


class Capture:
    """Items from every configured feed in turn, each stamped with its source's name, what was lost before it
    and, with speech recognition, with the newest transcript."""

    def __init__(self, config: RuntimeConfig, artifacts: Artifacts, plan: WindowPlan, annotator=None):
        """``annotator``: a runtime.annotate.Annotator that gets every captured frame with its tracked boxes."""
        self.feeds: list[Feed] = []
        try:
            for feed in plan_feeds(config.sources):
                self.feeds.append(Feed(feed, config, artifacts, plan, annotator))
        except BaseException:
            self.close()
            raise
        self._turn = 0

    @property
    def ended(self) -> bool:
        return all(feed.scheduler.ended for feed in self.feeds)

    @property
    def asr(self) -> AsrWorker | None:
        """The first feed's speech recognition worker (None without --asr)."""
        return next((feed.asr for feed in self.feeds if feed.asr is not None), None)

    def file_windows(self, window_s: float, hop_s: float) -> int | None:
        """How many windows the run's files hold (for a progress bar); None when a source is live or a file's
        length is unknown."""
        total = 0
        for feed in self.feeds:
            for source in feed.sources:
                seconds = getattr(source, "duration_s", None) if isinstance(source, VideoFileSource) else None
                if seconds is None:
                    return None
                total += int((seconds - window_s) // hop_s) + 1 if seconds >= window_s else 0
        return total

    def next_window(self, timeout_s: float) -> WindowItem | None:
        """The next item of the feeds in turn (None when none had one within ``timeout_s``, or at the end)."""
        live = [feed for feed in self.feeds if not feed.scheduler.ended]
        if not live:
            return None
        share = timeout_s / len(live)
        for _ in range(len(live)):
            feed = live[self._turn % len(live)]
            self._turn += 1
            window = feed.next_window(share)
            if window is not None:
                return window
        return None

    def stop(self) -> None:
        """Stop capturing (idempotent); the recognition workers finish with close()."""
        for feed in self.feeds:
            feed.stop()

    def close(self) -> None:
        for feed in self.feeds:
            feed.close()
