"""Windows encoded together (the people of a window, other streams) against each encoded alone and against
the reference: the batch axis of the EVA, VideoMAE and HuBERT files, MAE's frames of several people in one run."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_emollama.branches import BRANCHES, HUBERT, MAE, window_feeds
from edge_emollama.manifest import load_artifacts
from edge_emollama.runtime.items import synthetic_window
from edge_emollama.runtime.stages import EncoderStage
from edge_emollama.spec import TINY


def _two_people_and_another_source(rng) -> list:
    """Person 1 and person 2 of one window (the same frame and audio, their own crops and boxes), and a window
    of another source with a longer audio span (HuBERT runs it in a group of its own)."""
    first = synthetic_window(TINY, rng, index=3, t1_ns=4_000_000_000)
    first.stamp = dataclasses.replace(first.stamp, source="hall", face_id=1)
    second = dataclasses.replace(first, stamp=dataclasses.replace(first.stamp, face_id=2),
                                 face_crops=rng.integers(0, 255, first.face_crops.shape, dtype=np.uint8),
                                 face_boxes=first.face_boxes + 40)
    second.videomae_frames = second.face_crops[: TINY.videomae.frames]
    other = synthetic_window(TINY, rng, index=3, t1_ns=4_000_000_000, window_s=3.0)
    other.stamp = dataclasses.replace(other.stamp, source="door", face_id=1)
    return [first, second, other]


def test_windows_encoded_together_equal_each_alone_and_the_reference(tiny_artifacts, tiny_reference):
    artifacts = load_artifacts(tiny_artifacts)
    items = _two_people_and_another_source(np.random.default_rng())
    together = EncoderStage(artifacts, parallel=True)
    batched = together.encode(items)
    assert together.shared_reused == 2          # EVA and HuBERT of the shared window computed once
    for item, (rows, timings) in zip(items, batched):
        alone, _ = EncoderStage(artifacts, parallel=False)(item)
        np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
        want = tiny_reference.media_block(window_feeds(item, TINY))
        assert np.abs(rows - want).max() <= 1e-4 * np.abs(want).max()   # the fp32 parity limit
        assert {"encoders_ms", "encoder_eva_ms", "encoder_mae_ms", "encoder_videomae_ms"} <= set(timings)
    assert not np.allclose(batched[0][0], batched[1][0])   # the two people's rows differ (their faces)


def test_a_window_without_audio_or_face_gets_zero_rows_beside_one_that_has_them(tiny_artifacts):
    artifacts = load_artifacts(tiny_artifacts)
    full, bare = _two_people_and_another_source(np.random.default_rng())[::2]
    bare = dataclasses.replace(bare, audio=None, face_crops=np.zeros((0, 8, 8, 3), np.uint8), videomae_frames=None)
    stage = EncoderStage(artifacts, parallel=False)
    (rows_full, t_full), (rows_bare, t_bare) = stage.encode([full, bare])
    zero = artifacts.zero_rows()
    start = TINY.patch_rows
    np.testing.assert_array_equal(rows_bare[start:start + 3], zero)   # MAE, VideoMAE, HuBERT: their zero rows
    assert "encoder_hubert_ms" in t_full and "encoder_hubert_ms" not in t_bare
    assert not np.allclose(rows_full[start:start + 3], zero)


def test_split_gives_each_window_the_shapes_of_a_single_run():
    rng = np.random.default_rng()
    for branch in BRANCHES.values():
        if not branch.batched:
            assert branch is MAE   # per frame: its frames axis is the batch already
            with pytest.raises(ValueError, match="no batch axis"):
                branch.split([np.zeros((2, 4))], 2)
            continue
        outputs = [rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 1, 4))][:len(branch.outputs)]
        parts = branch.split(outputs, 3)
        assert len(parts) == 3 and all(p[0].shape == outputs[0].shape[1:] for p in parts)
        np.testing.assert_array_equal(parts[2][0], outputs[0][2])
    assert HUBERT.example_inputs(TINY, rng, seconds=0.5, batch=3)["pcm"].shape == (3, 8000)
