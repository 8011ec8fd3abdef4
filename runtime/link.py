"""ZeroMQ links between pipeline stages, newest item wins.

A link is a PUSH socket on the producing side and a PULL socket on the consuming side (inproc:// in one
process by default; ipc:// or tcp:// to put a stage in another process or on another host). Items are the
typed items of runtime/items.py, encoded by its codec.

The consumer side runs a small thread that drains the socket into a one-item slot: when the consuming
stage is busy, an older item is replaced by the newer one (and counted as dropped), so latency never
grows with a slow stage and memory stays bounded. The producer never blocks: with the consumer gone,
sends fail after ``SNDHWM`` items and are counted as dropped.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError
from ..lazy import require
from ..protocol import check_loopback
from .items import EndOfInput, decode, encode

@dataclass(frozen=True)
class LinkOptions:
    endpoint: str
    bind_producer: bool = True   # the producer binds, the consumer connects (swap across hosts if needed)
    sndhwm: int = 4
    rcvhwm: int = 4


class Producer:
    def __init__(self, options: LinkOptions, context=None):
        zmq = self._zmq = require("zmq")
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, options.sndhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        _attach(self._socket, options.endpoint, options.bind_producer)
        self.dropped = 0

    def send(self, item, block_s: float = 0.0) -> bool:
        """Send without blocking (``block_s`` 0), or wait up to ``block_s`` for room (lossless mode)."""
        frames = encode(item)
        deadline = time.monotonic() + block_s
        while True:
            try:
                self._socket.send_multipart(frames, flags=self._zmq.NOBLOCK, copy=False)
                return True
            except self._zmq.Again:
                if time.monotonic() >= deadline:
                    self.dropped += 1
                    return False
                time.sleep(0.005)

    def close(self) -> None:
        self._socket.close(0)


class Consumer:
    """``get(timeout)`` returns the newest item received since the last ``get`` (or None on timeout).

    ``keep_newest=False`` (offline file mode) loses nothing: the drain thread waits until the slot is
    taken, so the producer meets a full queue and waits. An :class:`EndOfInput` is never replaced: it is
    returned once the slot is empty.
    """

    def __init__(self, options: LinkOptions, context=None, keep_newest: bool = True):
        zmq = self._zmq = require("zmq")
        self._socket = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, options.rcvhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        _attach(self._socket, options.endpoint, not options.bind_producer)
        self._slot, self._end, self._cond, self._stop = None, None, threading.Condition(), threading.Event()
        self.keep_newest = keep_newest
        self.replaced = 0     # items dropped because a newer one arrived first
        self.error = None
        self._thread = threading.Thread(target=self._drain, name=f"link {options.endpoint}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        poller = self._zmq.Poller()
        poller.register(self._socket, self._zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not self._room() or not poller.poll(50):
                    continue
                item = decode(self._socket.recv_multipart(copy=False))
                with self._cond:
                    if isinstance(item, EndOfInput):
                        self._end = item
                    else:
                        self.replaced += self._slot is not None
                        self._slot = item
                    self._cond.notify_all()
        except Exception as exc:   # kept for the stage, which raises it
            self.error = exc
        finally:
            self._socket.close(0)

    def _room(self) -> bool:
        if self.keep_newest:
            return True
        with self._cond:
            if self._slot is not None:
                self._cond.wait(0.05)
            return self._slot is None

    def get(self, timeout_s: float):
        with self._cond:
            if self._slot is None and self._end is None:
                self._cond.wait(timeout_s)
            item, self._slot = self._slot, None
            if item is None:
                item = self._end
            self._cond.notify_all()
        if item is None and self.error is not None:
            raise self.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


def _attach(socket, endpoint: str, bind: bool) -> None:
    zmq = require("zmq")
    if bind:
        check_loopback(endpoint)   # a stage link carries raw frames and audio
    try:
        socket.bind(endpoint) if bind else socket.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot {'bind' if bind else 'connect'} stage link {endpoint}: {exc}") from exc
