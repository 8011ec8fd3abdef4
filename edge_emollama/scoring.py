"""Label scores -> distributions, shared by the reference, the export's validation and the runtime.

The LLM gives each label a log sequence probability (its pieces after ``[/INST]``); the distribution over
the nine labels is their softmax. KL(want || got) is how every parity check compares two distributions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = ["log_softmax", "softmax", "kl_divergence"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(logprobs: Sequence[float]) -> np.ndarray:
    """Label log-probabilities (e.g. the LLM's sequence log-probabilities) -> a distribution over the labels."""
    x = np.asarray(logprobs, dtype=np.float64)
    if not np.all(np.isfinite(x) | (x == -np.inf)) or np.all(x == -np.inf):
        raise InputError(f"log-probabilities must be finite or -inf, and not all -inf: {x.tolist()}")
    e = np.exp(x - x.max())
    return e / e.sum()


def kl_divergence(want: Sequence[float], got: Sequence[float]) -> float:
    """KL(want || got) in nats; zero-probability entries of ``want`` contribute nothing."""
    p, q = np.asarray(want, np.float64), np.asarray(got, np.float64)
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(np.maximum(q[mask], 1e-300)))))
