"""The streaming runtime: sources -> windows -> encoders -> LLM -> fusion -> publisher.

Each stage runs in its own thread and stages are linked by ZeroMQ (runtime/link.py): inproc:// in one
process by default; configure tcp:// or ipc:// endpoints and ``stages`` to run a stage elsewhere. Live
sources keep the newest window when a stage falls behind; an offline file run (``realtime=False``) loses
nothing and goes as fast as the slowest stage. A failing stage stops the run with its error.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import ConfigError, EdgeEmollamaError, InputError
from .artifacts import load_artifacts
from .clock import now_ns, run_anchor
from .control import ControlOptions, ControlServer
from .fusion import Fusion, FusionOptions
from .link import Consumer, LinkOptions, Producer, as_item
from .publish import Publisher, PublisherOptions
from .reasoning import ReasoningWorker
from .sources import FileOptions
from .stages import EncoderStage, LlmStage
from .windows import WindowOptions, WindowScheduler

log = logging.getLogger("edge_emollama.runtime")
STAGES = ("capture", "encode", "llm", "publish")
LINKS = ("windows", "rows", "scores")


@dataclass
class RunOptions:
    artifacts: str = "artifacts/tiny"
    camera: str | None = None          # index, /dev/videoN or URL
    microphone: str | None = None      # PyAudio device index or name; "default" for the default input
    video: str | None = None           # a file with video and/or audio
    realtime: bool = True              # file: paced like a live source (False: as fast as possible)
    file: FileOptions = field(default_factory=FileOptions)
    subtitle: str = ""
    precision: str = "fp32"            # ONNX encoders: fp32 | fp16
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 0
    quant: str = "F16"
    n_gpu_layers: int = 0
    window: WindowOptions = field(default_factory=WindowOptions)
    fusion: FusionOptions = field(default_factory=FusionOptions)
    publisher: PublisherOptions = field(default_factory=PublisherOptions)
    control: ControlOptions = field(default_factory=ControlOptions)
    reasoning: bool = True
    reason_tokens: int = 96
    stages: tuple = STAGES
    links: dict = field(default_factory=dict)   # windows / rows / scores -> endpoint; unset: inproc, unique

    lossless: bool | None = None       # None: lossless for a file read as fast as possible, else newest wins
    max_windows: int | None = None
    on_estimate: object = None          # callable(fused estimate, item) after each publish (printing, benches)


class Pipeline:
    def __init__(self, options: RunOptions):
        unknown = [s for s in options.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage '{unknown[0]}': stages are {', '.join(STAGES)}")
        self.options = options
        self.artifacts = load_artifacts(options.artifacts)
        self.stop_event = threading.Event()
        self.errors: list = []
        self.sources, self.threads, self._closers = [], [], []
        self.publisher = self.control = self.reasoner = None
        self.published = 0
        self._lossless = (options.lossless if options.lossless is not None
                          else options.video is not None and not options.realtime)
        self.links = {name: options.links.get(name) or f"inproc://{name}-{id(self):x}" for name in LINKS}

    # -- assembly -------------------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        try:
            want = set(self.options.stages)
            if "publish" in want:
                self._start_publisher()
            if "llm" in want:
                llm = LlmStage(self.artifacts, self.options.quant, self.options.threads, self.options.n_gpu_layers)
                llm.warmup()
                self._start_reasoning(llm)
                self._spawn("llm", self._llm_loop, self._link_in("rows"), self._link_out("scores"), llm)
            if "encode" in want:
                encoders = EncoderStage(self.artifacts, self.options.precision, self.options.providers,
                                        self.options.threads)
                encoders.warmup()
                self._spawn("encode", self._encode_loop, self._link_in("windows"), self._link_out("rows"), encoders)
            if "publish" in want:
                self._spawn("publish", self._publish_loop, self._link_in("scores"), None, None)
            if "capture" in want:
                self._spawn("capture", self._capture_loop, None, self._link_out("windows"), self._open_sources())
        except BaseException:
            self.close()
            raise
        return self

    def _link_out(self, name: str) -> Producer:
        producer = Producer(LinkOptions(self.links[name]))
        self._closers.append(producer.close)
        return producer

    def _link_in(self, name: str) -> Consumer:
        consumer = Consumer(LinkOptions(self.links[name]), keep_newest=not self._lossless)
        self._closers.append(consumer.close)
        return consumer

    def _spawn(self, name, loop, inbox, outbox, worker) -> None:
        def run():
            try:
                loop(inbox, outbox, worker)
            except BaseException as exc:   # recorded; the run stops and raises it
                log.error("stage %s failed: %s", name, exc)
                self.errors.append(exc)
                if self.publisher is not None:
                    self.publisher.tracker.record_error(name, exc, fatal=True)
                self.stop_event.set()
            finally:
                if worker is not None and hasattr(worker, "close"):
                    worker.close()
        thread = threading.Thread(target=run, name=f"stage-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _open_sources(self):
        from .sources import CameraSource, MicrophoneSource, VideoFileSource

        o = self.options
        video = audio = None
        if o.video is not None:
            video = audio = VideoFileSource(o.video, realtime=o.realtime, options=o.file).start()
            self.sources.append(video)
        if o.camera is not None:
            video = CameraSource(o.camera).start()
            self.sources.append(video)
        if o.microphone is not None:
            audio = MicrophoneSource(None if o.microphone == "default" else o.microphone).start()
            self.sources.append(audio)
        if not self.sources:
            raise InputError("no source: give --camera, --mic or --video (see edge-emollama run --help)")
        return WindowScheduler(video if video is not None and video.frames is not None else None,
                               audio if audio is not None and audio.audio is not None else None, o.window)

    def _start_publisher(self) -> None:
        anchor = run_anchor()
        self.publisher = Publisher(self.options.publisher, anchor=anchor).start()
        self.control = ControlServer.for_publisher(self.publisher, self.options.control)
        self.control.start()

    # -- stage loops ----------------------------------------------------------------------------------------
    def _send(self, outbox: Producer, item: dict) -> bool:
        """Live: never wait (the newest window wins downstream). Offline: wait for room until stopped.
        The end marker waits up to 5 s even when stopping, so downstream stages learn that input ended."""
        if item.get("end"):
            return outbox.send(item, block_s=5.0)
        if not self._lossless:
            return outbox.send(item)
        while not self.stop_event.is_set():
            if outbox.send(item, block_s=0.2):
                return True
        return False

    def _capture_loop(self, _inbox, outbox: Producer, scheduler: WindowScheduler) -> None:
        count = 0
        try:
            while not self.stop_event.is_set():
                window = scheduler.next_window(timeout_s=0.2)
                if window is None:
                    if scheduler.ended:
                        break
                    continue
                item = as_item(window)
                item.update(presence=window.presence(), sent_ns=now_ns(), dropped_before=scheduler.dropped)
                self._send(outbox, item)
                count += 1
                if self.options.max_windows is not None and count >= self.options.max_windows:
                    break
        finally:
            for source in self.sources:
                source.stop()
            self._send(outbox, {"end": True})

    def _encode_loop(self, inbox: Consumer, outbox: Producer, stage: EncoderStage) -> None:
        for item in self._items(inbox):
            if item.get("end"):
                self._send(outbox, item)
                return
            waited = (now_ns() - item["sent_ns"]) / 1e6
            out = stage(item)
            timings = {**_ms_keys(item.get("timings_ms", {})), "queue_encode_ms": waited,
                       **_ms_keys(out["encoder_timings"])}
            keep = ("index", "t0_ns", "t1_ns", "presence", "dropped_before")
            self._send(outbox, {**{k: item[k] for k in keep}, "rows": out["rows"], "timings_ms": timings,
                                "sent_ns": now_ns(), "dropped_links": inbox.replaced})

    def _start_reasoning(self, stage: LlmStage) -> None:
        if self.options.reasoning and self.publisher is not None:
            self.reasoner = ReasoningWorker(stage, self.publisher, max_tokens=self.options.reason_tokens,
                                            threads=self.options.threads)
            self.control.set_explain(self.reasoner.request)

    def _llm_loop(self, inbox: Consumer, outbox: Producer, stage: LlmStage) -> None:
        try:
            for item in self._items(inbox):
                if item.get("end"):
                    self._send(outbox, item)
                    return
                waited = (now_ns() - item["sent_ns"]) / 1e6
                out = stage(item["rows"], self.options.subtitle)
                if self.reasoner is not None:
                    self.reasoner.remember(item["rows"], self.options.subtitle, item["t1_ns"])
                timings = {**item["timings_ms"], "queue_llm_ms": waited, "llm_ms": out["llm_ms"]}
                keep = ("index", "t0_ns", "t1_ns", "presence", "dropped_before")
                self._send(outbox, {**{k: item[k] for k in keep}, "probabilities": out["probabilities"],
                                    "timings_ms": timings, "sent_ns": now_ns(),
                                    "dropped_links": item["dropped_links"] + inbox.replaced})
        finally:
            if self.reasoner is not None:
                self.control.set_explain(None)
                self.reasoner.close()

    def _publish_loop(self, inbox: Consumer, _outbox, _worker) -> None:
        fusion, dropped = Fusion(self.options.fusion), 0
        for item in self._items(inbox):
            if item.get("end"):
                return
            start = time.perf_counter()
            presence = {k: v["present"] for k, v in item["presence"].items()}
            fused = fusion.update(item["probabilities"], item["t0_ns"], item["t1_ns"], presence)
            lost = item["dropped_before"] + item["dropped_links"] + inbox.replaced
            if lost > dropped:
                self.publisher.tracker.record_dropped_windows(lost - dropped)
                dropped = lost
            timings = {**item["timings_ms"], "queue_publish_ms": (now_ns() - item["sent_ns"]) / 1e6,
                       "fusion_ms": (time.perf_counter() - start) * 1000}
            self.publisher.publish_estimate(fused, item["presence"], timings, item["index"],
                                            self.options.fusion.method)
            for event in fused.events:
                self.publisher.publish_event(event, (item["t0_ns"], item["t1_ns"]))
            self.published += 1
            if self.options.on_estimate is not None:
                self.options.on_estimate(fused, item)

    def _items(self, inbox: Consumer):
        while True:
            item = inbox.get(timeout_s=0.2)
            if item is not None:
                yield item
            elif self.stop_event.is_set():
                return

    # -- life cycle -----------------------------------------------------------------------------------------
    def wait(self, timeout_s: float | None = None) -> bool:
        """Until every stage thread has ended (True) or the timeout passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.2)
                if deadline is not None and time.monotonic() > deadline:
                    return False
        return True

    def stop(self) -> None:
        """Stop capture; the windows in flight finish or are dropped; then close everything."""
        self.stop_event.set()
        for source in self.sources:
            source.stop()
        self.wait(timeout_s=10.0)
        self.close()

    def close(self) -> None:
        self.stop_event.set()
        for source in self.sources:
            source.stop()
        for close in self._closers:
            close()
        self._closers.clear()
        if self.control is not None:
            self.control.close()
        if self.publisher is not None:
            self.publisher.close()   # publishes the final 'stopped' status

    def raise_errors(self) -> None:
        if self.errors:
            error = self.errors[0]
            if isinstance(error, EdgeEmollamaError):
                raise error
            raise InputError(f"the runtime failed: {type(error).__name__}: {error}") from error


def _ms_keys(timings: dict) -> dict:
    return {(k if k.endswith("_ms") else f"{k}_ms"): float(v) for k, v in timings.items()}
