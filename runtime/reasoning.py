"""Reasoning on request: the ``[reason]`` explanation of the latest window, generated off the estimate path.

A second llama.cpp context on the LLM stage's weights (its own KV cache and thread) generates greedily from
the reasoning prompt with the latest window's media rows, so estimates keep flowing while it writes. One
request runs at a time and one more may wait; further requests are answered ``busy``. The text is
published on the ``reason`` topic with the request's id.

What a request may cost is checked before it is queued: a subtitle that cannot fit the reasoning context is
refused at once (``too_long``, with the limit in tokens), and each control client (its ZeroMQ routing
identity) may queue ``per_client_per_minute`` requests in any 60 s (``rate_limited``, with ``retry_after_s``).
A client that reconnects gets a new identity from ZeroMQ; the one-waiting-request rule still bounds the work.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Callable

from ..config import ReasoningConfig
from ..errors import EdgeEmollamaError, InputError
from ..prompt import prompt_parts
from ..protocol import DEFAULT_SOURCE, TOPICS
from .control import RequestRefused
from .llm import LlamaCppScorer

log = logging.getLogger(__name__)
MAX_STREAMS = 64   # people whose newest window an explain request may name
UNTRAINED_NOTE = "[untrained model with seeded random weights: this text means nothing]"


class ClientBudget:
    """At most ``per_minute`` admissions per client in any ``window_s`` (0 or less: no limit). At most
    ``max_clients`` clients are remembered (the least recently admitted is forgotten first)."""

    def __init__(self, per_minute: int, window_s: float = 60.0, max_clients: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.window_s, self.max_clients, self._clock = per_minute, window_s, max_clients, clock
        self._admitted: OrderedDict[bytes, deque] = OrderedDict()

    def retry_after_s(self, client: bytes) -> float:
        """0 when ``client`` may go ahead now, else the seconds until it may."""
        times = self._recent(client)
        if self.per_minute <= 0 or len(times) < self.per_minute:
            return 0.0
        return max(0.0, times[0] + self.window_s - self._clock())

    def admit(self, client: bytes) -> None:
        """Count one admission of ``client``."""
        times = self._recent(client)
        times.append(self._clock())
        self._admitted[client] = times
        self._admitted.move_to_end(client)
        while len(self._admitted) > self.max_clients:
            self._admitted.popitem(last=False)

    def _recent(self, client: bytes) -> deque:
        times = self._admitted.get(client, deque(maxlen=max(1, self.per_minute)))
        while times and times[0] <= self._clock() - self.window_s:
            times.popleft()
        return times


class ReasoningWorker:
    def __init__(self, stage, publisher, max_tokens: int = ReasoningConfig.max_tokens, threads: int = 0,
                 per_client_per_minute: int = ReasoningConfig.per_client_per_minute):
        """``stage``: the LlmStage whose weights this worker shares (close the worker first)."""
        self.spec, self.layout, self.publisher, self.max_tokens = stage.spec, stage.layout, publisher, max_tokens
        self.untrained = stage.untrained
        self.tokenizer = stage.tokenizer
        self.scorer = LlamaCppScorer(stage.path, n_ctx=stage.n_ctx, n_threads=threads or None,
                                     share_model=stage.scorer)
        self.budget = ClientBudget(per_client_per_minute)
        self.refused = {"rate_limited": 0, "too_long": 0}   # explain requests refused before queueing, by code
        self._base_positions = self._positions("")     # the prompt without a subtitle
        self.max_subtitle_tokens = self.scorer.n_ctx - max_tokens - self._base_positions
        self._latest = None                            # (rows, subtitle, t1_ns, stream) of the newest window
        self._by_stream: OrderedDict = OrderedDict()   # (source, face_id) -> the same, for the newest MAX_STREAMS
        self._pending: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reasoning", daemon=True)
        self._thread.start()

    def remember(self, rows, subtitle: str, t1_ns: int, stream: tuple = (DEFAULT_SOURCE, None)) -> None:
        """Called by the LLM stage for every window of every person (keeps a reference, no copy)."""
        self._latest = self._by_stream[tuple(stream)] = (rows, subtitle, t1_ns, tuple(stream))
        self._by_stream.move_to_end(tuple(stream))
        while len(self._by_stream) > MAX_STREAMS:
            self._by_stream.popitem(last=False)

    def _window(self, args: dict) -> tuple:
        """The remembered window the request asks about: one person's (``source``, ``face_id``) or the newest."""
        if "source" not in args and "face_id" not in args:
            if self._latest is None:
                raise InputError("no window has been scored yet; ask again once estimates are flowing")
            return self._latest
        stream = (args.get("source", DEFAULT_SOURCE), args.get("face_id"))
        if stream not in self._by_stream:
            known = ", ".join(f"{s}/{'scene' if f is None else f'face-{f}'}" for s, f in self._by_stream) or "none"
            raise InputError(f"no window of source {stream[0]!r} face_id {stream[1]} has been scored recently "
                             f"(scored: {known})")
        return self._by_stream[stream]

    def _positions(self, subtitle: str) -> int:
        """Positions the reasoning prompt with ``subtitle`` takes (tokens and media rows)."""
        parts = prompt_parts(self.tokenizer, self.spec, subtitle, self.layout, task="reason")
        return sum(len(p) if isinstance(p, list) else p[2] - p[1] for p in parts)

    def check_subtitle(self, subtitle: str) -> None:
        """RequestRefused ``too_long`` when the prompt with ``subtitle`` and the answer cannot fit n_ctx."""
        tokens = self._positions(subtitle) - self._base_positions
        if tokens > self.max_subtitle_tokens:
            self.refused["too_long"] += 1
            raise RequestRefused("too_long", f"the subtitle is {tokens} tokens; the reasoning context "
                                             f"(n_ctx {self.scorer.n_ctx}, {self.max_tokens} for the answer) "
                                             f"holds at most {self.max_subtitle_tokens}: send a shorter one",
                                 limit_tokens=self.max_subtitle_tokens)

    def request(self, args: dict, client: bytes = b"") -> dict:
        """The control verb ``explain`` from ``client`` (its routing identity): check, queue the request and
        return its id at once. RequestRefused ``too_long`` / ``rate_limited`` before anything is queued."""
        rows, subtitle, t1_ns, stream = self._window(args)
        subtitle = args.get("subtitle", subtitle)
        self.check_subtitle(subtitle)
        request_id = uuid.uuid4().hex[:12]
        with self._cond:
            wait_s = self.budget.retry_after_s(client)
            if wait_s > 0:
                limit = self.budget.per_minute
                self.refused["rate_limited"] += 1
                raise RequestRefused("rate_limited", f"this client queued {limit} explain requests in the last "
                                                     "minute (reasoning.per_client_per_minute); "
                                                     f"retry in {wait_s:.1f} s", retry_after_s=round(wait_s, 3))
            if len(self._pending) >= 1:
                return {"request_id": None, "status": "busy", "message": "a reasoning request is already waiting"}
            self.budget.admit(client)
            self._pending.append((request_id, rows, subtitle, stream))
            self._cond.notify()
        return {"request_id": request_id, "status": "queued", "window_t1_ns": int(t1_ns),
                "topic": TOPICS["reason"], "source": stream[0], "face_id": stream[1]}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                request_id, rows, subtitle, stream = self._pending.pop(0)
            try:
                self._answer(request_id, rows, subtitle, stream)
            except Exception as exc:   # the request fails, the worker and the stream go on
                log.error("reasoning request %s failed: %s", request_id, exc,
                          exc_info=None if isinstance(exc, EdgeEmollamaError) else exc)
                self.publisher.tracker.record_error("reasoning", exc)

    def _answer(self, request_id: str, rows, subtitle: str, stream: tuple) -> None:
        start = time.perf_counter()
        parts = prompt_parts(self.tokenizer, self.spec, subtitle, self.layout, task="reason")
        text = self.scorer.generate(parts, rows, max_tokens=self.max_tokens).strip()
        tokens = len(self.tokenizer.tokenize(text, add_bos=False, special=False)) if text else 0
        if self.untrained:   # say it where the reader sees it: the text of seeded random weights is noise
            text = f"{UNTRAINED_NOTE} {text}"
        self.publisher.publish("reason", {"request_id": request_id, "text": text, "final": True, "label": None,
                                          "tokens": tokens, "source": stream[0], "face_id": stream[1],
                                          "timings_ms": {"generate_ms": (time.perf_counter() - start) * 1000}})

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)
        self.scorer.close()
