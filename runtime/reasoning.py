"""Reasoning on request: the ``[reason]`` explanation of the latest window, generated off the estimate path.

A second llama.cpp context on the LLM stage's weights (its own KV cache and thread) generates greedily from
the reasoning prompt with the latest window's media rows, so estimates keep flowing while it writes. One
request runs at a time and one more may wait; further requests are answered ``busy``. The text is
published on the ``reason`` topic with the request's id.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

from ..errors import EdgeEmollamaError, InputError
from ..prompt import prompt_parts
from ..protocol import TOPICS
from .llm import LlamaCppScorer

log = logging.getLogger(__name__)


class ReasoningWorker:
    def __init__(self, stage, publisher, max_tokens: int = 96, threads: int = 0):
        """``stage``: the LlmStage whose weights this worker shares (close the worker first)."""
        self.spec, self.layout, self.publisher, self.max_tokens = stage.spec, stage.layout, publisher, max_tokens
        self.tokenizer = stage.tokenizer
        self.scorer = LlamaCppScorer(stage.path, n_ctx=stage.n_ctx, n_threads=threads or None,
                                     share_model=stage.scorer)
        self._latest = None
        self._pending: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reasoning", daemon=True)
        self._thread.start()

    def remember(self, rows, subtitle: str, t1_ns: int) -> None:
        """Called by the LLM stage for every window (keeps a reference, no copy)."""
        self._latest = (rows, subtitle, t1_ns)

    def request(self, args: dict) -> dict:
        """The control verb ``explain``: queue a request and return its id at once."""
        if self._latest is None:
            raise InputError("no window has been scored yet; ask again once estimates are flowing")
        rows, subtitle, t1_ns = self._latest
        subtitle = args.get("subtitle", subtitle)
        request_id = uuid.uuid4().hex[:12]
        with self._cond:
            if len(self._pending) >= 1:
                return {"request_id": None, "status": "busy", "message": "a reasoning request is already waiting"}
            self._pending.append((request_id, rows, subtitle, t1_ns))
            self._cond.notify()
        return {"request_id": request_id, "status": "queued", "window_t1_ns": int(t1_ns),
                "topic": TOPICS["reason"]}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                request_id, rows, subtitle, t1_ns = self._pending.pop(0)
            try:
                self._answer(request_id, rows, subtitle)
            except Exception as exc:   # the request fails, the worker and the stream go on
                log.error("reasoning request %s failed: %s", request_id, exc,
                          exc_info=None if isinstance(exc, EdgeEmollamaError) else exc)
                self.publisher.tracker.record_error("reasoning", exc)

    def _answer(self, request_id: str, rows, subtitle: str) -> None:
        start = time.perf_counter()
        parts = prompt_parts(self.tokenizer, self.spec, subtitle, self.layout, task="reason")
        text = self.scorer.generate(parts, rows, max_tokens=self.max_tokens).strip()
        tokens = len(self.tokenizer.tokenize(text, add_bos=False, special=False)) if text else 0
        self.publisher.publish("reason", {"request_id": request_id, "text": text, "final": True, "label": None,
                                          "tokens": tokens,
                                          "timings_ms": {"generate_ms": (time.perf_counter() - start) * 1000}})

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)
        self.scorer.close()
