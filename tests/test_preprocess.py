"""Preprocessing equals the original's transforms exactly (Pillow resize, then ToTensor + Normalize as torch
computes them), on fresh random frames, at the tiny and the full emotion-llama sizes."""
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


@pytest.mark.parametrize("spec", [TINY, EMOTION_LLAMA], ids=["tiny", "emotion-llama"])
def test_face_crops_are_normalised_per_channel_and_resized_when_needed(spec):
    rng = np.random.default_rng()
    size = spec.mae.image_size
    crops = list(rng.integers(0, 256, (int(rng.integers(1, 12)), size, size, 3), np.uint8))
    got = preprocess.face_batch(crops, spec)
    want = np.stack([to_tensor_normalize(c, spec.face_mean, spec.face_std) for c in crops])
    assert got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, want)
    odd = [rng.integers(0, 256, (size + 7, size + 3, 3), np.uint8)]
    resized = np.asarray(Image.fromarray(odd[0]).resize((size, size), Image.BILINEAR))
    np.testing.assert_array_equal(preprocess.face_batch(odd, spec)[0],
                                  to_tensor_normalize(resized, spec.face_mean, spec.face_std))


def test_video_clip_is_channels_then_frames_and_needs_exactly_its_frame_count():
    rng = np.random.default_rng()
    frames = TINY.videomae.frames
    crops = list(rng.integers(0, 256, (frames, TINY.videomae.image_size, TINY.videomae.image_size, 3), np.uint8))
    got = preprocess.video_clip(crops, TINY)
    want = np.stack([to_tensor_normalize(c, TINY.face_mean, TINY.face_std) for c in crops], axis=1)[None]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError, match=f"exactly {frames} face frames"):
        preprocess.video_clip(crops[:-1], TINY)
    with pytest.raises(InputError, match="RGB uint8"):
        preprocess.eva_pixels(np.zeros((4, 4, 3), np.float32), TINY)
