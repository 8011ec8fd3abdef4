"""Fusion over time: per-window label distributions in, a smoothed estimate with a stable dominant label out.

- Smoothing (``method``): ``ema`` -- exponential smoothing with a time constant ``tau`` in seconds, robust to
  uneven spacing (``alpha = 1 - exp(-dt / tau)``, ``dt`` between window ends; a window after a long gap
  counts almost fully); ``moving_average`` -- the mean of the last ``average_windows`` distributions;
  ``none`` -- the window's own distribution. Every output is renormalised to sum to 1.
- Dominant label with hysteresis: the current label changes only when another one's smoothed probability
  exceeds the current one's by more than ``switch_margin`` in ``switch_windows`` consecutive windows. The
  first estimate sets it at once.
- Events: ``dominant_changed`` (the first estimate included, with ``previous: null``) and
  ``presence_changed`` when a modality (video, face, audio) appears or disappears.

Defaults (tau = 1.5 s, margin 0.1, 2 windows): at H = 0.5 s the EMA averages about three windows, so a
single noisy window moves the estimate by at most ~28 %; a real change of expression shows in the smoothed
output within about 1 s, and the dominant label follows within 2 windows (another 0.5 s) once the new
label leads by 0.1 -- enough to stop flicker between two labels that trade places by a few percent.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..config import FusionConfig
from ..errors import InputError
from ..spec import LABELS
from .clock import NS_PER_S

__all__ = ["FusedEstimate", "FusionEvent", "Fusion", "normalize"]

MODALITIES = ("video", "face", "audio")


@dataclass(frozen=True)
class FusionEvent:
    """``kind`` dominant_changed (previous/current labels) or presence_changed (modality, present)."""
    kind: str
    t_ns: int
    fields: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The wire form (an ``emollama.v2.event.`` payload)."""
        return {"kind": self.kind, "t_ns": self.t_ns, **self.fields}


@dataclass(frozen=True)
class FusedEstimate:
    t0_ns: int
    t1_ns: int
    labels: tuple
    probabilities: tuple     # this window, normalised, prompt order
    smoothed: tuple          # after smoothing, normalised
    dominant: str            # after hysteresis
    dominant_since_ns: int   # window end at which it became dominant
    events: tuple = ()

    @property
    def dominant_probability(self) -> float:
        return self.smoothed[self.labels.index(self.dominant)]


def normalize(probabilities: Sequence[float] | Mapping[str, float], labels: Sequence[str] = LABELS) -> np.ndarray:
    """Non-negative scores (a sequence in label order, or a label -> score mapping) scaled to sum to 1."""
    if isinstance(probabilities, Mapping):
        unknown = set(probabilities) - set(labels)
        if unknown:
            raise InputError(f"unknown labels {sorted(unknown)}: use {list(labels)}")
        probabilities = [probabilities.get(label, 0.0) for label in labels]
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (len(labels),):
        raise InputError(f"expected {len(labels)} probabilities (one per label: {list(labels)}), got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise InputError(f"probabilities must be finite and >= 0, got {p.tolist()}")
    total = p.sum()
    if total <= 0:
        raise InputError("probabilities sum to 0: at least one label needs a positive score")
    return p / total


class Fusion:
    """Feed ``update()`` one window at a time, in increasing window order."""

    def __init__(self, options: FusionConfig = FusionConfig(), labels: tuple = LABELS):
        self.options = options.validate()
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise InputError(f"labels {labels}: need at least two distinct labels")
        self.labels = tuple(labels)
        self.reset()

    def reset(self) -> None:
        self._smoothed: np.ndarray | None = None
        self._history: deque = deque(maxlen=self.options.average_windows)
        self._last_t1: int | None = None
        self._dominant: int | None = None
        self._since_ns = 0
        self._challenger: int | None = None
        self._streak = 0
        self._presence: dict[str, bool] = {}

    def update(self, probabilities, t0_ns: int, t1_ns: int, presence: Mapping | None = None) -> FusedEstimate:
        """One window's distribution (any non-negative scores; normalised here) -> the fused estimate.

        ``presence``: ``Window.presence()`` (or ``{modality: bool}``); changes become presence events.
        """
        if self._last_t1 is not None and t1_ns <= self._last_t1:
            raise InputError(f"window end {t1_ns} ns is not after the previous one ({self._last_t1} ns): "
                             "feed windows in order, or reset() after a restart")
        p = normalize(probabilities, self.labels)
        smoothed = self._smooth(p, t1_ns)
        self._last_t1 = t1_ns
        events = self._hysteresis(smoothed, t1_ns) + self._presence_events(presence, t1_ns)
        labels = tuple(self.labels)
        return FusedEstimate(t0_ns=t0_ns, t1_ns=t1_ns, labels=labels, probabilities=tuple(p.tolist()),
                             smoothed=tuple(smoothed.tolist()), dominant=labels[self._dominant],
                             dominant_since_ns=self._since_ns, events=tuple(events))

    def _smooth(self, p: np.ndarray, t1_ns: int) -> np.ndarray:
        method = self.options.method
        if method == "none":
            s = p
        elif method == "moving_average":
            self._history.append(p)
            s = np.mean(self._history, axis=0)
        elif self._smoothed is None:
            s = p
        else:
            dt = (t1_ns - self._last_t1) / NS_PER_S
            alpha = 1.0 - math.exp(-dt / self.options.time_constant_s)
            s = self._smoothed + alpha * (p - self._smoothed)
        s = s / s.sum()
        self._smoothed = s
        return s

    def _hysteresis(self, s: np.ndarray, t_ns: int) -> list[FusionEvent]:
        labels = self.labels
        best = int(np.argmax(s))
        if self._dominant is None:
            self._dominant, self._since_ns = best, t_ns
            return [self._change(None, best, s, t_ns)]
        if best == self._dominant or s[best] - s[self._dominant] <= self.options.switch_margin:
            self._challenger, self._streak = None, 0
            return []
        self._streak = self._streak + 1 if best == self._challenger else 1
        self._challenger = best
        if self._streak < self.options.switch_windows:
            return []
        previous = self._dominant
        self._dominant, self._since_ns, self._challenger, self._streak = best, t_ns, None, 0
        return [self._change(labels[previous], best, s, t_ns)]

    def _change(self, previous: str | None, current: int, s: np.ndarray, t_ns: int) -> FusionEvent:
        return FusionEvent("dominant_changed", t_ns, {
            "previous": previous, "current": self.labels[current], "probability": float(s[current])})

    def _presence_events(self, presence: Mapping | None, t_ns: int) -> list[FusionEvent]:
        if not presence:
            return []
        events = []
        for modality in MODALITIES:
            if modality not in presence:
                continue
            value = presence[modality]
            now = bool(value["present"] if isinstance(value, Mapping) else value)
            before = self._presence.get(modality)
            self._presence[modality] = now
            if before is not None and before != now:
                events.append(FusionEvent("presence_changed", t_ns, {"modality": modality, "present": now}))
        return events
