"""Fusion: smoothing, normalisation, hysteresis and events."""
import math

import numpy as np
import pytest

from edge_emollama.errors import ConfigError, InputError
from edge_emollama.config import FusionConfig
from edge_emollama.runtime.fusion import Fusion, normalize
from edge_emollama.scoring import softmax
from edge_emollama.spec import LABELS

S = 1_000_000_000
H = S // 2


def one_hot(label: str, weight: float = 0.9) -> np.ndarray:
    p = np.full(len(LABELS), (1 - weight) / (len(LABELS) - 1))
    p[LABELS.index(label)] = weight
    return p


def feed(fusion: Fusion, dists, start: int = 0):
    return [fusion.update(p, start + k * H, start + 4 * H + k * H) for k, p in enumerate(dists)]


@pytest.mark.parametrize("method", ["ema", "moving_average", "none"])
def test_outputs_are_distributions(method):
    rng = np.random.default_rng(1)
    fusion = Fusion(FusionConfig(method=method))
    for est in feed(fusion, rng.random((50, len(LABELS))) ** 3):
        for vec in (est.probabilities, est.smoothed):
            assert len(vec) == len(LABELS)
            assert math.isclose(sum(vec), 1.0, abs_tol=1e-9)
            assert all(0.0 <= v <= 1.0 for v in vec)
        assert est.dominant in LABELS
        assert est.labels == LABELS


def test_ema_follows_time_constant():
    tau = 1.5
    fusion = Fusion(FusionConfig(method="ema", time_constant_s=tau))
    a, b = one_hot("happy"), one_hot("sad")
    first = fusion.update(a, 0, 2 * S)
    assert np.allclose(first.smoothed, a / a.sum())
    # one window later by exactly tau seconds: the estimate moved 1 - 1/e of the way to b
    second = fusion.update(b, int(tau * S), 2 * S + int(tau * S))
    alpha = 1 - math.exp(-1.0)
    assert np.allclose(second.smoothed, a + alpha * (b - a), atol=1e-12)


def test_none_and_moving_average():
    rng = np.random.default_rng(2)
    dists = rng.random((6, len(LABELS)))
    raw = Fusion(FusionConfig(method="none"))
    for est, p in zip(feed(raw, dists), dists):
        assert np.allclose(est.smoothed, p / p.sum())
    avg = Fusion(FusionConfig(method="moving_average", average_windows=3))
    out = feed(avg, dists)
    expected = np.mean([p / p.sum() for p in dists[-3:]], axis=0)
    assert np.allclose(out[-1].smoothed, expected / expected.sum())


def test_first_estimate_sets_dominant_with_event():
    est = Fusion().update(one_hot("angry"), 0, 2 * S)
    assert est.dominant == "angry"
    assert [e.kind for e in est.events] == ["dominant_changed"]
    assert est.events[0].to_dict()["previous"] is None
    assert est.events[0].to_dict()["current"] == "angry"


def test_hysteresis_needs_margin_for_n_windows():
    opts = FusionConfig(method="none", switch_margin=0.1, switch_windows=2)
    fusion = Fusion(opts)
    close = np.zeros(len(LABELS))
    close[LABELS.index("happy")], close[LABELS.index("sad")] = 0.46, 0.54  # sad leads by 0.08 < margin
    clear = one_hot("sad", 0.8)
    out = feed(fusion, [one_hot("happy"), close, close, close, clear, one_hot("happy"), clear, clear, clear])
    dominants = [e.dominant for e in out]
    # close never switches; one clear window is not enough; two consecutive clear windows switch
    assert dominants == ["happy"] * 7 + ["sad", "sad"]
    changes = [ev for e in out for ev in e.events if ev.kind == "dominant_changed"]
    assert [(c.fields["previous"], c.fields["current"]) for c in changes] == [(None, "happy"), ("happy", "sad")]
    assert out[7].dominant_since_ns == out[7].t1_ns
    assert out[8].dominant_since_ns == out[7].t1_ns


def test_presence_events():
    fusion = Fusion()
    p = one_hot("neutral")
    seen = []
    for k, face in enumerate([True, True, False, False, True]):
        presence = {"face": {"present": face, "fraction": 1.0 * face}, "audio": {"present": True}, "video": True}
        est = fusion.update(p, k * H, 4 * H + k * H, presence)
        seen += [ev.to_dict() for ev in est.events if ev.kind == "presence_changed"]
    assert [(e["modality"], e["present"]) for e in seen] == [("face", False), ("face", True)]


def test_bad_inputs_are_refused():
    fusion = Fusion()
    for bad in ([0.5, 0.5], [float("nan")] * len(LABELS), [-0.1] + [0.2] * (len(LABELS) - 1), [0.0] * len(LABELS)):
        with pytest.raises(InputError):
            fusion.update(bad, 0, 2 * S)
    fusion.update(one_hot("happy"), 0, 2 * S)
    with pytest.raises(InputError, match="not after"):
        fusion.update(one_hot("happy"), 0, 2 * S)
    with pytest.raises(InputError, match="unknown labels"):
        normalize({"joy": 1.0})


@pytest.mark.parametrize("opts", [FusionConfig(method="kalman"), FusionConfig(time_constant_s=0),
                                  FusionConfig(switch_windows=0), FusionConfig(switch_margin=1.5)])
def test_bad_options(opts):
    with pytest.raises(ConfigError):
        Fusion(opts)


def test_softmax_and_mapping():
    logp = np.log(np.arange(1, len(LABELS) + 1, dtype=float)) - 20.0
    p = softmax(logp)
    assert math.isclose(p.sum(), 1.0) and np.argmax(p) == len(LABELS) - 1
    assert softmax([0.0, -np.inf])[1] == 0.0
    q = normalize({"happy": 2.0, "sad": 2.0})
    assert q[LABELS.index("happy")] == 0.5 and q.sum() == 1.0
