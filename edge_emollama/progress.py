"""Progress of long work on stderr: a tqdm bar on a terminal, plain lines otherwise (CI logs, pipes, files).

Two reporters, both silent when ``enabled`` is False (a quiet run):

- :class:`Steps`: numbered steps. ``with steps.step("onnx eva"):`` prints, when the step ends, one line::

      export: [3/16] onnx eva ... 12.3 s, 9.1 MB

  (``... failed after 2.0 s`` when it raised; the exception goes on unchanged). On a terminal a tqdm bar
  over the steps shows the running one, and the same lines are kept above it.
- :class:`Progress`: a bar over a count (bytes, tensors, windows) inside one piece of work::

      with Progress(total, "run clip.mp4", "windows") as bar:
          for window in windows:
              ...
              bar.update(1)

  On a terminal a tqdm bar; otherwise a line at most every ``every_s`` seconds while it runs and, with
  ``leave``, one when it ends (``run clip.mp4: 120/120 windows in 35.2 s``).

tqdm is imported only when stderr is a terminal, and the plain lines work without it. This module imports
nothing of the project's, so the runtime, the tools and the exporter can all use it.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

__all__ = ["Progress", "Steps", "format_count", "format_seconds", "stderr_is_terminal"]

EVERY_S = 30.0   # plain mode: at most one line this often while a bar runs


def stderr_is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _tqdm():
    """tqdm's class, or None when it is not installed (the plain lines are used then)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s"


def _number(count: float) -> str:
    return str(int(count)) if float(count).is_integer() else f"{count:.1f}"


def format_count(count: float, unit: str) -> str:
    """``1.5 GB`` for bytes (unit ``B``), ``12 tensors`` otherwise."""
    if unit != "B":
        return f"{_number(count)} {unit}"
    for prefix in ("", "K", "M", "G"):
        if count < 1024 or prefix == "G":
            return f"{int(count)} B" if not prefix else f"{count:.1f} {prefix}B"
        count /= 1024
    return f"{count:.1f} GB"   # not reached


def _write(stream, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):   # a closed or broken stderr never fails the work it reports on
        pass


class Progress:
    """A count towards ``total`` (None: unknown) of ``unit`` s, labelled ``label``; a context manager."""

    def __init__(self, total: int | float | None, label: str, unit: str = "it", *, enabled: bool = True,
                 leave: bool = True, every_s: float | None = EVERY_S, delay_s: float = 0.0, stream=None):
        self.total, self.label, self.unit = total, label, unit
        self.enabled, self.leave, self.every_s, self.delay_s = enabled, leave, every_s, delay_s
        self.stream = stream
        self.n = 0
        self._lock = threading.Lock()
        self._bar = None
        self._start = self._last_line = None

    # --- the context manager ------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.close(failed=kind is not None)
        return False   # an exception goes on unchanged

    def start(self) -> "Progress":
        self._start = self._last_line = time.perf_counter()
        if not self.enabled:
            return self
        stream = sys.stderr if self.stream is None else self.stream
        self.stream = stream
        tqdm = _tqdm() if stderr_is_terminal(stream) else None
        if tqdm is not None:
            byte = {"unit_scale": True, "unit_divisor": 1024,
                    "bar_format": "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"}
            self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit, leave=self.leave, delay=self.delay_s,
                             file=stream, dynamic_ncols=True, **(byte if self.unit == "B" else {}))
        return self

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    def update(self, n: int | float = 1) -> None:
        """``n`` more done (thread-safe)."""
        with self._lock:
            self.n += n
            if not self.enabled:
                return
            if self._bar is not None:
                self._bar.update(n)
                return
            now = time.perf_counter()
            if self.every_s is not None and self._last_line is not None and now - self._last_line >= self.every_s:
                self._last_line = now
                _write(self.stream, f"{self.label}: {self._amount()}, {format_seconds(now - self._start)}")

    def close(self, failed: bool = False) -> None:
        """End the bar; with ``leave`` (plain mode), one line saying how far it got and in what time."""
        with self._lock:
            if not self.enabled:
                return
            if self._bar is not None:
                bar, self._bar = self._bar, None
                bar.close()
                return
            if self.leave and self._start is not None:
                how = "stopped after" if failed else "in"
                _write(self.stream, f"{self.label}: {self._amount(final=True)} {how} {format_seconds(self.elapsed_s)}")
            self._start = None

    def _amount(self, final: bool = False) -> str:
        """``40/120 windows (33 %)``, ``1.2 GB/13.5 GB (9 %)``, ``40 windows`` (no total); no share when final."""
        if self.total is None:
            return format_count(self.n, self.unit)
        if self.unit == "B":
            text = f"{format_count(self.n, 'B')}/{format_count(self.total, 'B')}"
        else:
            text = f"{_number(self.n)}/{format_count(self.total, self.unit)}"
        return text if final or not self.total else f"{text} ({100 * self.n / self.total:.0f} %)"


class Steps:
    """``total`` numbered steps of a job named ``prefix`` (e.g. "export"); see the module's docstring."""

    def __init__(self, total: int, prefix: str, *, enabled: bool = True, stream=None):
        self.total, self.prefix, self.enabled, self.stream = total, prefix, enabled, stream
        self.done = 0          # steps finished (failed ones included)
        self.current = None    # the running step's "[k/N] name"
        self._bar = None
        self._redirect = None

    # --- the whole job --------------------------------------------------------------------------------------
    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.restore()

    def _out(self):
        return sys.stderr if self.stream is None else self.stream

    def _terminal_bar(self):
        """The tqdm bar over the steps, started with the first step (None: plain lines)."""
        if self._bar is None and stderr_is_terminal(self._out()):
            tqdm = _tqdm()
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=self.prefix, unit="step", leave=False, file=self._out(),
                                 dynamic_ncols=True, bar_format="{desc} {bar} {elapsed}")
                self._redirect = _RedirectLogging(tqdm)
        return self._bar

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._out())
        else:
            _write(self._out(), text)

    # --- one step ---------------------------------------------------------------------------------------------
    def step(self, name: str) -> "_Step":
        """A context manager for the next step; ``note`` set on it is added to its line."""
        return _Step(self, name)

    def bar(self, total, label: str, unit: str = "it", *, delay_s: float = 2.0) -> Progress:
        """A :class:`Progress` inside the running step (shown only when it takes a while; gone when done)."""
        label = f"{self.prefix}: {self.current} {label}" if self.current else f"{self.prefix}: {label}"
        return Progress(total, label, unit, enabled=self.enabled, leave=False, delay_s=delay_s, stream=self.stream)

    def _begin(self, name: str) -> str:
        number = self.done + 1
        self.total = max(self.total, number)   # a step more than planned still gets a sensible counter
        self.current = f"[{number}/{self.total}] {name}"
        bar = self._terminal_bar() if self.enabled else None
        if bar is not None:
            bar.total = self.total
            bar.set_description_str(f"{self.prefix}: {self.current}", refresh=True)
        return self.current

    def _end(self, title: str, seconds: float, failed: bool, note: str | None) -> None:
        self.done += 1
        self.current = None
        if not self.enabled:
            return
        if failed:
            text = f"failed after {format_seconds(seconds)}"
        else:
            text = format_seconds(seconds) + (f", {note}" if note else "")
        self._line(f"{self.prefix}: {title} ... {text}")
        if self._bar is not None:
            self._bar.update(1)


class _Step:
    def __init__(self, steps: Steps, name: str):
        self.steps, self.name = steps, name
        self.note = None       # e.g. "9.1 MB": added to the step's line
        self.seconds = None
        self.title = None

    def __enter__(self) -> "_Step":
        self.title = self.steps._begin(self.name)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.seconds = time.perf_counter() - self._start
        self.steps._end(self.title, self.seconds, kind is not None, self.note)
        return False   # the step's exception goes on unchanged


class _AboveBars:
    """A stream for a console log handler while tqdm bars are drawn: each record is written above the bars."""

    def __init__(self, tqdm, stream):
        self.tqdm, self.stream = tqdm, stream

    def write(self, text: str) -> None:
        self.tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


class _RedirectLogging:
    """While a terminal bar is drawn, the console log handlers (root's stream handlers on stderr or stdout)
    write above it; their levels, formatters and filters stay as they are."""

    def __init__(self, tqdm):
        self.moved = []
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if type(handler) is logging.StreamHandler and stream in (sys.stderr, sys.stdout):
                handler.setStream(_AboveBars(tqdm, stream))
                self.moved.append((handler, stream))

    def restore(self) -> None:
        for handler, stream in self.moved:
            handler.setStream(stream)
        self.moved = []
