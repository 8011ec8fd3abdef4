"""The one clock of the runtime: monotonic nanoseconds, plus one UTC anchor per run.

Every capture time, window bound and publish time is ``time.monotonic_ns()`` (immune to NTP steps and
wall-clock changes). A run takes one :class:`ClockAnchor` -- the wall-clock (UTC) time at one monotonic
instant -- and every message carries it, so a reader converts any monotonic time of the stream to UTC with
``utc = anchor.utc + (t_ns - anchor.monotonic_ns)``. The anchor is not refreshed during a run: UTC times
derived from it drift with the monotonic clock (a few ppm), never jump.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["NS_PER_S", "now_ns", "ClockAnchor", "run_anchor"]

NS_PER_S = 1_000_000_000


def now_ns() -> int:
    """The runtime's clock: ``time.monotonic_ns()``."""
    return time.monotonic_ns()


def _iso(utc_ns: int) -> str:
    """UTC nanoseconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (RFC 3339, microseconds)."""
    seconds, rest = divmod(int(utc_ns), NS_PER_S)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1000:06d}Z"


@dataclass(frozen=True)
class ClockAnchor:
    """Wall-clock time ``utc_ns`` (ns since the Unix epoch, UTC) read at monotonic time ``monotonic_ns``."""
    monotonic_ns: int
    utc_ns: int

    @classmethod
    def take(cls) -> "ClockAnchor":
        """Read both clocks; the monotonic reading is the midpoint of two around the wall-clock one."""
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        return cls(monotonic_ns=(before + after) // 2, utc_ns=wall)

    def to_utc_ns(self, t_ns: int) -> int:
        return self.utc_ns + (int(t_ns) - self.monotonic_ns)

    def to_utc_iso(self, t_ns: int) -> str:
        """A monotonic time of this run as UTC ISO-8601 with microseconds, e.g. ``2026-11-29T23:24:01.123456Z``."""
        return _iso(self.to_utc_ns(t_ns))

    def to_dict(self) -> dict:
        """The wire form: ``{"monotonic_ns": int, "utc": ISO-8601}``."""
        return {"monotonic_ns": self.monotonic_ns, "utc": _iso(self.utc_ns)}


_RUN_ANCHOR: ClockAnchor | None = None
_LOCK = threading.Lock()


def run_anchor() -> ClockAnchor:
    """The process-wide anchor, taken on first use and then fixed for the whole run."""
    global _RUN_ANCHOR
    with _LOCK:
        if _RUN_ANCHOR is None:
            _RUN_ANCHOR = ClockAnchor.take()
        return _RUN_ANCHOR

