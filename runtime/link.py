"""ZeroMQ links between pipeline stages, newest item wins.

A link is a PUSH socket on the producing side and a PULL socket on the consuming side (inproc:// in one
process by default; ipc:// or tcp:// to put a stage in another process or on another host). Items are the
typed items of runtime/items.py, encoded by its codec.

The consumer side runs a small thread that drains the socket into a one-item slot: when the consuming
stage is busy, an older item is replaced by the newer one (and counted as dropped), so latency never
grows with a slow stage and memory stays bounded. The producer never blocks: with the consumer gone,
sends fail after ``SNDHWM`` items and are counted as dropped.

Links are point to point. Over TCP or IPC the bound side watches its connections (:class:`PeerMonitor`): a
second peer (which would receive every second item of a PUSH, or inject items into a PULL) is logged as a
warning naming the link and counted (``extra_link_peers`` in the status, when this process publishes). With
``runtime.security.curve`` the bound side is a CURVE server that accepts only the runtime's own key
(edge_emollama/security.py), and the connecting side uses it: a foreign peer cannot connect at all. A bind
beyond loopback without CURVE is refused unless ``runtime.security.insecure``.
"""
from __future__ import annotations

import logging
import os
import socket as stdsocket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..config import SecurityConfig
from ..errors import ConfigError
from ..lazy import require
from ..protocol import check_loopback
from ..security import ALLOW_STAGES, Security, connect_curve, security_of, serve_curve
from .items import EndOfInput, decode, encode

log = logging.getLogger(__name__)
MAX_STREAMS = 64   # items a keep-newest consumer holds at most: one per estimate stream
PeerCallback = Callable[[str, int, int], None]    # (link, peers connected now, peers beyond the first that joined)


@dataclass(frozen=True)
class LinkOptions:
    endpoint: str
    bind_producer: bool = True   # the producer binds, the consumer connects (swap across hosts if needed)
    sndhwm: int = 4
    rcvhwm: int = 4
    name: str = ""               # windows / rows / scores: how warnings name the link (default: the endpoint)

    @property
    def label(self) -> str:
        return f"'{self.name}' ({self.endpoint})" if self.name else self.endpoint


class Producer:
    """The PUSH end. ``security``: ``runtime.security`` (CURVE on TCP/IPC, the bind policy); ``on_peers``: told
    when the bound side's peer count goes beyond one (or back)."""

    def __init__(self, options: LinkOptions, context=None, *, security: Security | SecurityConfig | None = None,
                 on_peers: PeerCallback | None = None):
        zmq = self._zmq = require("zmq")
        context = context or zmq.Context.instance()
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, options.sndhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.monitor = _attach(self._socket, context, options, options.bind_producer, security_of(security),
                               on_peers)
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
        if self.monitor is not None:
            self.monitor.close()
        self._socket.close(0)


class Consumer:
    """``get(timeout)`` returns, per estimate stream (an item's ``stamp.stream``: source and person), the newest
    item received since that stream's last one was taken (or None on timeout).

    Fair: the stream whose item has waited longest goes first, so when the stage cannot keep up every person
    gets the same bounded rate (newest window per person wins) and nothing queues beyond one item per stream
    (at most :data:`MAX_STREAMS`; beyond that the longest-waiting is dropped). ``keep_newest=False`` (offline
    file mode) loses nothing: the drain thread waits until the slot is taken, so the producer meets a full
    queue and waits. An :class:`EndOfInput` is never replaced: it is returned once every slot is empty.
    """

    def __init__(self, options: LinkOptions, context=None, keep_newest: bool = True, *,
                 security: Security | SecurityConfig | None = None, on_peers: PeerCallback | None = None):
        zmq = self._zmq = require("zmq")
        context = context or zmq.Context.instance()
        self._socket = context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, options.rcvhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self.monitor = _attach(self._socket, context, options, not options.bind_producer, security_of(security),
                               on_peers)
        self._slots: OrderedDict = OrderedDict()   # stream -> its newest item not yet taken
        self._end, self._cond, self._stop = None, threading.Condition(), threading.Event()
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
                        self._hold(item)
                    self._cond.notify_all()
        except Exception as exc:   # kept for the stage, which raises it
            self.error = exc
        finally:
            self._socket.close(0)

    def _hold(self, item) -> None:
        """Keep ``item`` as its stream's newest (replacing an older one in place: it keeps its turn)."""
        stream = item.stamp.stream
        self.replaced += stream in self._slots
        self._slots[stream] = item
        while len(self._slots) > MAX_STREAMS:
            self._slots.popitem(last=False)
            self.replaced += 1

    def take(self, match, limit: int | None = None) -> list:
        """Up to ``limit`` held items for which ``match(item)`` is true, taken now without waiting (oldest
        first): the windows waiting with the one just taken, to score them together."""
        with self._cond:
            keys = [key for key, item in self._slots.items() if match(item)][:limit]
            taken = [self._slots.pop(key) for key in keys]
            if taken:
                self._cond.notify_all()
        return taken

    def _room(self) -> bool:
        if self.keep_newest:
            return True
        with self._cond:
            if self._slots:
                self._cond.wait(0.05)
            return not self._slots

    def get(self, timeout_s: float):
        with self._cond:
            if not self._slots and self._end is None:
                self._cond.wait(timeout_s)
            item = self._slots.popitem(last=False)[1] if self._slots else self._end
            self._cond.notify_all()
        if item is None and self.error is not None:
            raise self.error
        return item

    def close(self) -> None:
        self._stop.set()
        if self.monitor is not None:
            self.monitor.close()
        self._thread.join(1.0)


def _attach(socket, context, options: LinkOptions, bind: bool, security: Security,
            on_peers: PeerCallback | None) -> "PeerMonitor | None":
    """Bind or connect one end (CURVE over TCP/IPC when keys are given); the bound end's peer monitor."""
    zmq = require("zmq")
    endpoint, remote = options.endpoint, not options.endpoint.startswith("inproc://")
    if bind:
        check_loopback(endpoint, security, f"stage link {options.label}")   # raw frames and audio
    if remote and security.keys is not None:
        if bind:
            serve_curve(socket, context, security.keys, ALLOW_STAGES)
        else:
            connect_curve(socket, security.keys.as_client())
    monitor = PeerMonitor(socket, options.label, on_peers) if bind and remote else None
    try:
        socket.bind(endpoint) if bind else socket.connect(endpoint)
    except zmq.ZMQError as exc:
        if monitor is not None:
            monitor.close()
        raise ConfigError(f"cannot {'bind' if bind else 'connect'} stage link {options.label}: {exc}") from exc
    return monitor


class PeerMonitor:
    """Watches the bound end of a TCP/IPC link: a peer beyond the first is a warning and ``on_peers``;
    peers refused by CURVE are logged (at most every 10 s). Runs a thread until :meth:`close`.

    libzmq's handshake events do not say which connection they are about, so connections are counted
    ``SETTLE_S`` after a handshake succeeded: by then a peer that CURVE refused has been disconnected."""

    REFUSED_LOG_S = 10.0
    SETTLE_S = 0.3

    def __init__(self, socket, link: str, on_peers: PeerCallback | None = None):
        zmq = self._zmq = require("zmq")
        self._monitor_utils = require("zmq.utils.monitor")
        events = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._events = socket.get_monitor_socket(events)
        self.link, self._on_peers = link, on_peers
        self._open: dict[int, str] = {}     # connection fd -> peer address
        self.extra_peers = 0                # peers that connected while another was connected
        self.refused = 0                    # handshakes refused (a key not allowed, or no CURVE)
        self._known = 0                     # connections counted at the last check
        self._check_at: float | None = None
        self._refused_logged = -self.REFUSED_LOG_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"link monitor {link}", daemon=True)
        self._thread.start()

    @property
    def peers(self) -> int:
        return len(self._open)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._events.poll(50):
                    self._handle(self._monitor_utils.recv_monitor_message(self._events))
                if self._check_at is not None and time.monotonic() >= self._check_at:
                    self._check_at = None
                    self._count()
        finally:
            self._events.close(0)

    def _handle(self, event: dict) -> None:
        zmq, kind = self._zmq, event["event"]
        if kind == zmq.EVENT_ACCEPTED:
            self._open[event["value"]] = _peer_address(event["value"])
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._check_at = time.monotonic() + self.SETTLE_S
        elif kind == zmq.EVENT_DISCONNECTED:
            self._open.pop(event["value"], None)
            if len(self._open) < self._known:
                alerted, self._known = self._known > 1, len(self._open)
                if alerted:
                    self._tell(0)
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self._refused("its key is not allowed" if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                          else "it does not speak CURVE with this key")

    def _count(self) -> None:
        peers = len(self._open)
        if peers > max(self._known, 1):
            self._extra_peer(peers - max(self._known, 1))
        self._known = max(self._known, peers)

    def _extra_peer(self, new: int) -> None:
        self.extra_peers += new
        log.warning("stage link %s: another peer connected while one was connected (%d now: %s); a link is point "
                    "to point and its items are split between them: stop the other process, or use --curve DIR "
                    "to keep foreign peers out", self.link, len(self._open), ", ".join(self._open.values()))
        self._tell(new)

    def _tell(self, new_peers: int) -> None:
        if self._on_peers is not None:
            self._on_peers(self.link, len(self._open), new_peers)

    def _refused(self, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= self.REFUSED_LOG_S:
            self._refused_logged = now
            log.warning("stage link %s refused a peer: %s (%d refused so far)", self.link, why, self.refused)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)


def _peer_address(fd: int) -> str:
    """host:port (or the IPC path) of a connection's peer, read from a duplicate of its descriptor."""
    try:
        with stdsocket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:
        return "an unknown address"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "a local process")
