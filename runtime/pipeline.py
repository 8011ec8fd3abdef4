"""The streaming runtime: sources -> windows -> encoders -> LLM -> fusion -> publisher.

Each stage runs in its own thread and stages are linked by ZeroMQ (runtime/link.py): inproc:// in one
process by default; configure ``runtime.links`` endpoints and ``runtime.stages`` to run a stage elsewhere.
Live sources keep the newest window when a stage falls behind; an offline file run (``realtime: false``)
loses nothing and goes as fast as the slowest stage. A failing stage stops the run with its error.

The pipeline reads the manifest once (or is handed the loaded :class:`~edge_emollama.manifest.Artifacts`)
and gives every stage what it needs from it: the window plan, the model geometry, the feature modes, the
prompt layout and the label pieces.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from typing import Callable

from ..config import LINKS, RuntimeConfig
from ..errors import ConfigError, EdgeEmollamaError
from ..manifest import Artifacts, load_artifacts
from .annotate import Annotator
from .capture import Capture
from .clock import now_ns, run_anchor
from .control import ControlServer
from .items import EndOfInput, RowsItem, ScoresItem
from .link import Consumer, LinkOptions, Producer
from .outputs import close_sinks, make_sinks
from .publish import Publisher
from .reasoning import ReasoningWorker
from .stages import EncoderStage, LlmStage
from .streams import StreamBook
from .windows import WindowPlan

__all__ = ["Pipeline"]

log = logging.getLogger("edge_emollama.runtime")


class Pipeline:
    """``Pipeline(cfg.runtime).start()``, then ``wait()``; ``stop()`` or ``close()`` end it.

    ``on_estimate(fused, item)`` runs after each publish (printing, benches); ``max_windows`` ends capture
    after that many windows; ``lossless`` (default: for a file read as fast as possible) makes every link
    wait instead of keeping the newest item."""

    def __init__(self, config: RuntimeConfig, artifacts: Artifacts | None = None, *,
                 on_estimate: Callable | None = None, max_windows: int | None = None, lossless: bool | None = None):
        self.config = config.validate()
        self.artifacts = artifacts if artifacts is not None else load_artifacts(config.artifacts)
        self.plan = WindowPlan.from_manifest(self.artifacts.manifest, config.windows)
        self.on_estimate, self.max_windows = on_estimate, max_windows
        self.stop_event = threading.Event()
        self.errors: list = []
        self.threads, self._closers = [], []
        self.publisher = self.control = self.reasoner = self.capture = self.annotator = None
        self.published = 0
        offline_file = bool(config.sources.video) and not config.sources.realtime
        self._lossless = offline_file if lossless is None else lossless
        self.links = {name: config.links.get(name) or f"inproc://{name}-{id(self):x}" for name in LINKS}

    # -- assembly -------------------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        try:
            want = set(self.config.stages)
            if "publish" in want:
                self._start_publisher()
            if "llm" in want:
                llm = LlmStage(self.artifacts, self.config.llm)
                llm.warmup()
                self._start_reasoning(llm)
                self._spawn("llm", self._llm_loop, self._link_in("rows"), self._link_out("scores"), llm)
            if "encode" in want:
                encoders = EncoderStage(self.artifacts, self.config.encoders)
                encoders.warmup()
                self._spawn("encode", self._encode_loop, self._link_in("windows"), self._link_out("rows"), encoders)
            if "publish" in want:
                self._spawn("publish", self._publish_loop, self._link_in("scores"), None, None)
            if "capture" in want:
                self.capture = Capture(self.config, self.artifacts, self.plan, self.annotator)
                self._spawn("capture", self._capture_loop, None, self._link_out("windows"), self.capture)
        except BaseException:
            self.close()
            raise
        return self

    def _link_out(self, name: str) -> Producer:
        producer = Producer(LinkOptions(self.links[name], name=name), security=self.config.security,
                            on_peers=self._on_link_peers())
        self._closers.append(producer.close)
        return producer

    def _link_in(self, name: str) -> Consumer:
        consumer = Consumer(LinkOptions(self.links[name], name=name), keep_newest=not self._lossless,
                            security=self.config.security, on_peers=self._on_link_peers())
        self._closers.append(consumer.close)
        return consumer

    def _on_link_peers(self):
        """A second peer on a stage link shows in the status when this process publishes."""
        return self.publisher.tracker.record_link_peers if self.publisher is not None else None

    def _spawn(self, name, loop, inbox, outbox, worker) -> None:
        def run():
            try:
                loop(inbox, outbox, worker)
            except BaseException as exc:   # recorded; the run stops and raises it
                expected = isinstance(exc, EdgeEmollamaError)
                log.error("stage %s failed: %s", name, exc, exc_info=None if expected else exc)
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

    def _start_publisher(self) -> None:
        """The PUB socket with the outputs of ``runtime.outputs`` as its sinks (it closes them), and control."""
        stream_id = str(uuid.uuid4())
        sinks = make_sinks(self.config.outputs, self.artifacts.manifest.labels, self.plan.hop_s,
                           stream_id=stream_id, security=self.config.security)
        try:
            self.annotator = self._make_annotator()
        except BaseException:
            close_sinks(sinks)
            raise
        if self.annotator is not None:
            sinks.append(self.annotator)
        try:
            self.publisher = Publisher(self.config.publish, anchor=run_anchor(), security=self.config.security,
                                       stream_id=stream_id, sinks=sinks)
        except BaseException:
            close_sinks(sinks)
            raise
        self.publisher.start()   # a failure here: close() closes the publisher, which closes the sinks
        self.control = ControlServer.for_publisher(self.publisher, self.config.control)
        self.control.start()

    def _make_annotator(self):
        """The annotated video / preview of ``runtime.outputs`` (None when neither is asked for): it sees the
        captured frames and the published estimates, so capture and publish must run in this process."""
        outputs = self.config.outputs
        if outputs.annotate is None and not outputs.preview:
            return None
        if "capture" not in self.config.stages:
            raise ConfigError("--annotate/--preview need the capture stage in the process that publishes: run "
                              "them where runtime.stages has both capture and publish")
        return Annotator(self.artifacts.manifest.labels, path=outputs.annotate, preview=outputs.preview)

    def _start_reasoning(self, stage: LlmStage) -> None:
        if self.config.reasoning.enabled and self.publisher is not None:
            self.reasoner = ReasoningWorker(stage, self.publisher, max_tokens=self.config.reasoning.max_tokens,
                                            threads=self.config.llm.threads,
                                            per_client_per_minute=self.config.reasoning.per_client_per_minute)
            self.control.set_explain(self.reasoner.request)

    # -- stage loops ----------------------------------------------------------------------------------------
    def _send(self, outbox: Producer, item) -> bool:
        """Live: never wait (the newest window wins downstream). Offline: wait for room until stopped.
        The end marker waits up to 5 s even when stopping, so downstream stages learn that input ended."""
        if isinstance(item, EndOfInput):
            return outbox.send(item, block_s=5.0)
        if not self._lossless:
            return outbox.send(item)
        while not self.stop_event.is_set():
            if outbox.send(item, block_s=0.2):
                return True
        return False

    def _capture_loop(self, _inbox, outbox: Producer, capture: Capture) -> None:
        count = 0
        try:
            while not self.stop_event.is_set():
                window = capture.next_window(timeout_s=0.2)
                if window is None:
                    if capture.ended:
                        break
                    continue
                window.stamp.sent_ns = now_ns()
                self._send(outbox, window)
                count += 1
                if self.max_windows is not None and count >= self.max_windows:
                    break
        finally:
            capture.stop()
            self._send(outbox, EndOfInput())

    def _encode_loop(self, inbox: Consumer, outbox: Producer, stage: EncoderStage) -> None:
        for first in self._items(inbox, outbox):
            # up to runtime.encoders.batch_windows waiting windows (people, streams) share each branch's run
            batch = [first] + (inbox.take(lambda _: True, stage.batch - 1) if stage.batch > 1 else [])
            waited = [(now_ns() - item.stamp.sent_ns) / 1e6 for item in batch]
            for item, (rows, timings), queued_ms in zip(batch, stage.encode(batch), waited):
                stamp = item.stamp.timed(now_ns(), inbox.replaced, queue_encode_ms=queued_ms, **timings)
                self._send(outbox, RowsItem(stamp, rows))

    def _llm_loop(self, inbox: Consumer, outbox: Producer, stage: LlmStage) -> None:
        try:
            for first in self._items(inbox, outbox):
                subtitle, batch = self._subtitle(first), self._waiting_with(first, inbox, stage.batch)
                waited = [(now_ns() - item.stamp.sent_ns) / 1e6 for item in batch]
                distributions, llm_ms = stage.score_batch([item.rows for item in batch], subtitle)
                for item, probabilities, queued_ms in zip(batch, distributions, waited):
                    if self.reasoner is not None:
                        self.reasoner.remember(item.rows, subtitle, item.t1_ns, item.stamp.stream)
                    stamp = item.stamp.timed(now_ns(), inbox.replaced, queue_llm_ms=queued_ms, llm_ms=llm_ms)
                    self._send(outbox, ScoresItem(dataclasses.replace(stamp, subtitle=subtitle), probabilities))
        finally:
            if self.reasoner is not None:
                self.control.set_explain(None)
                self.reasoner.close()

    def _subtitle(self, item) -> str:
        """The prompt's subtitle: a fixed runtime.subtitle, else what speech recognition heard (capture attached
        it to the window)."""
        return self.config.subtitle or item.stamp.subtitle or ""

    def _waiting_with(self, first, inbox: Consumer, limit: int) -> list:
        """``first`` and, up to ``limit`` in all (runtime.llm.batch_windows), the windows waiting with the same
        prompt (the window's other people, other streams' windows), oldest first: one llama_decode for them."""
        if limit <= 1:
            return [first]
        subtitle = self._subtitle(first)
        return [first] + inbox.take(lambda other: self._subtitle(other) == subtitle, limit - 1)

    def _publish_loop(self, inbox: Consumer, _outbox, _worker) -> None:
        book, dropped = StreamBook(self.config.fusion, self.artifacts.manifest.labels), 0
        for item in self._items(inbox, None):
            start = time.perf_counter()
            fused, track_events = book.update(item, item.probabilities, now_ns())
            lost = item.stamp.dropped + inbox.replaced
            if lost > dropped:
                self.publisher.tracker.record_dropped_windows(lost - dropped)
                dropped = lost
            window = (item.t0_ns, item.t1_ns)
            for stream, event in track_events:
                self.publisher.publish_event(event, window, stream)
            timings = {**item.stamp.timings_ms, "queue_publish_ms": (now_ns() - item.stamp.sent_ns) / 1e6,
                       "fusion_ms": (time.perf_counter() - start) * 1000}
            self.publisher.publish_estimate(fused, item.presence.to_wire(), timings, item.index,
                                            self.config.fusion.method, item.stamp.spans, item.stamp.subtitle,
                                            stream=item.stamp.stream, box=item.stamp.box)
            for event in fused.events:
                self.publisher.publish_event(event, window, item.stamp.stream)
            self.publisher.tracker.record_tracks(book.status())
            self.published += 1
            if self.on_estimate is not None:
                self.on_estimate(fused, item)

    def _items(self, inbox: Consumer, outbox: Producer | None):
        """The items of ``inbox`` until the end of input (passed on to ``outbox``) or until stopped."""
        while True:
            item = inbox.get(timeout_s=0.2)
            if isinstance(item, EndOfInput):
                if outbox is not None:
                    self._send(outbox, item)
                return
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

    @property
    def asr(self):
        """The speech-recognition worker of this process's capture (None without --asr)."""
        return self.capture.asr if self.capture is not None else None

    def stop(self) -> None:
        """Stop capture; the windows in flight finish or are dropped; then close everything."""
        self.stop_event.set()
        if self.capture is not None:
            self.capture.stop()
        self.wait(timeout_s=10.0)
        self.close()

    def close(self) -> None:
        self.stop_event.set()
        if self.capture is not None:
            self.capture.close()
        for close in self._closers:
            close()
        self._closers.clear()
        if self.control is not None:
            self.control.close()
        if self.publisher is not None:
            self.publisher.close()   # publishes the final 'stopped' status

    def raise_errors(self) -> None:
        """Raise the first stage failure as it was (bad input stays bad input; a bug keeps its traceback)."""
        if self.errors:
            raise self.errors[0]
