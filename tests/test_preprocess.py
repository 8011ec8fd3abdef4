"""Preprocessing equals the original's transforms (Pillow resize, then ToTensor + Normalize as torch computes
them for EVA; the extraction's bilinear resize + /255 for the faces, reimplemented here from Pillow's filter
definition), on fresh random frames, at the tiny and the full emotion-llama sizes."""
import numpy as np
import pytest
import torch
from PIL import Image

from edge_emollama import preprocess
from edge_emollama.errors import InputError
from edge_emollama.spec import EMOTION_LLAMA, TINY


def to_tensor_normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """torchvision's ToTensor (uint8 HWC -> float CHW / 255) then Normalize ((x - mean) / std), written in torch."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub(torch.tensor(mean)[:, None, None]).div(torch.tensor(std)[:, None, None]).numpy()


@pytest.mark.parametrize("spec", [TINY, EMOTION_LLAMA], ids=["tiny", "emotion-llama"])
def test_eva_pixels_are_bicubic_resize_then_clip_normalisation(spec):
    frame = np.random.default_rng().integers(0, 256, (480, 640, 3), np.uint8)
    got = preprocess.eva_pixels(frame, spec)
    resized = np.asarray(Image.fromarray(frame).resize((spec.eva.image_size,) * 2, Image.BICUBIC))
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, to_tensor_normalize(resized, spec.clip_mean, spec.clip_std)[None])


def bilinear_weights(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of Pillow's BILINEAR resample along one axis (libImaging/Resample.c): a triangle of
    support 1 (times the scale when shrinking) centred at (i + 0.5) * scale, normalised per output pixel."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - filterscale + 0.5), 0)
        hi = min(int(center + filterscale + 0.5), in_size)
        for j in range(lo, hi):
            weights[i, j] = max(0.0, 1.0 - abs((j - center + 0.5) / filterscale))
        weights[i] /= weights[i].sum()
    return weights


def extraction_faces(crops, size: int) -> np.ndarray:
    """The extraction's face input, independently: bilinear resize to size x size, then / 255 (no Normalize),
    channels first. Float arithmetic (Pillow rounds to uint8 between its two passes: within 1/255)."""
    out = []
    for crop in crops:
        rows, cols = bilinear_weights(size, crop.shape[0]), bilinear_weights(size, crop.shape[1])
        resized = np.stack([rows @ crop[:, :, c].astype(np.float64) @ cols.T for c in range(3)], axis=-1)
        out.append(np.clip(np.round(resized), 0, 255).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


@pytest.mark.parametrize("spec", [TINY, EMOTION_LLAMA], ids=["tiny", "emotion-llama"])
def test_face_crops_are_the_extractions_bilinear_resize_in_zero_one(spec):
    rng = np.random.default_rng()
    size = spec.mae.image_size
    aligned = list(rng.integers(0, 256, (int(rng.integers(1, 6)), 112, 112, 3), np.uint8))   # OpenFace's size
    got = preprocess.face_batch(aligned, spec)
    assert got.flags["C_CONTIGUOUS"] and got.dtype == np.float32 and got.shape == (len(aligned), 3, size, size)
    assert 0.0 <= got.min() and got.max() <= 1.0
    np.testing.assert_allclose(got, extraction_faces(aligned, size), rtol=0, atol=1.0 / 255 + 1e-6)
    exact = list(rng.integers(0, 256, (3, size, size, 3), np.uint8))   # already at size: exactly / 255
    np.testing.assert_array_equal(preprocess.face_batch(exact, spec),
                                  np.stack([c.transpose(2, 0, 1) for c in exact]).astype(np.float32) / np.float32(255))


def test_video_clip_is_channels_then_frames_and_needs_exactly_its_frame_count():
    rng = np.random.default_rng()
    frames = TINY.videomae.frames
    crops = list(rng.integers(0, 256, (frames, 112, 112, 3), np.uint8))
    got = preprocess.video_clip(crops, TINY)
    want = extraction_faces(crops, TINY.videomae.image_size).transpose(1, 0, 2, 3)[None]   # [1, 3, F, S, S]
    np.testing.assert_allclose(got, want, rtol=0, atol=1.0 / 255 + 1e-6)
    with pytest.raises(InputError, match=f"exactly {frames} face frames"):
        preprocess.video_clip(crops[:-1], TINY)
    with pytest.raises(InputError, match="RGB uint8"):
        preprocess.eva_pixels(np.zeros((4, 4, 3), np.float32), TINY)
