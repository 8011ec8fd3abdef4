"""Window inputs -> model tensors (numpy + Pillow, no torch): shared by the reference and the runtime.

- EVA: the chosen frame resized to 448x448 with Pillow's bicubic (as Blip2ImageEvalProcessor), CLIP mean/std.
- MAE / VideoMAE: aligned face crops resized to 224x224 (Pillow bilinear), values in [0, 1], no mean/std.
- HuBERT: float32 PCM at 16 kHz in [-1, 1]; the wav2vec2 normalisation runs inside the exported graph.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import InputError
from .spec import ModelSpec


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"{what} must be an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _normalized(chw: np.ndarray, mean, std) -> np.ndarray:
    """(v / 255 - mean[c]) / std[c] in float32 for a uint8 [..., 3, H, W] array, computed in place on one
    C-contiguous copy (the same values as the expression written out, about 3x faster at 448 px)."""
    out = np.ascontiguousarray(chw).astype(np.float32)
    out /= np.float32(255.0)
    out -= np.asarray(mean, np.float32)[:, None, None]
    out /= np.asarray(std, np.float32)[:, None, None]
    return out


def _normalize(image: np.ndarray, size: int, resample, mean, std) -> np.ndarray:
    """[3, size, size] float32: resized with Pillow, then normalised per channel."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), resample))
    return _normalized(resized.transpose(2, 0, 1), mean, std)


def eva_pixels(frame: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """[1, 3, S, S] float32 from one RGB frame."""
    frame = _rgb(frame, "the EVA frame")
    return _normalize(frame, spec.eva.image_size, Image.BICUBIC, spec.clip_mean, spec.clip_std)[None]


def _face_stack(crops, size: int) -> np.ndarray:
    """[N, 3, size, size] in [0, 1]: each crop (OpenFace's 112 px aligned face) resized with Pillow's bilinear
    filter, then / 255, with no mean/std: MAE's extraction is ``Resize((224, 224))`` + ``ToTensor()``, VideoMAE's
    ``GroupResize`` (Pillow bilinear) + ``/ 255`` (docs/model.md)."""
    crops = [_rgb(np.asarray(c), "a face crop") for c in crops]
    crops = [c if c.shape[:2] == (size, size) else np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR))
             for c in crops]
    out = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)).astype(np.float32)
    out /= np.float32(255.0)
    return out


def face_batch(crops, spec: ModelSpec) -> np.ndarray:
    """[T, 3, 224, 224] float32 from T RGB face crops (T >= 1)."""
    if len(crops) == 0:
        raise InputError("face_batch needs at least one face crop; with no face use the zero features")
    return np.ascontiguousarray(_face_stack(crops, spec.mae.image_size))


def video_clip(crops, spec: ModelSpec) -> np.ndarray:
    """[1, 3, F, 224, 224] float32 from exactly F (16) RGB face crops."""
    frames = spec.videomae.frames
    if len(crops) != frames:
        raise InputError(f"VideoMAE needs exactly {frames} face frames per window, got {len(crops)}")
    return np.ascontiguousarray(_face_stack(crops, spec.videomae.image_size).transpose(1, 0, 2, 3)[None])


def audio_pcm(samples: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """[1, S] float32 from mono PCM (int16 or float in [-1, 1]); at least one HuBERT frame long."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise InputError(f"audio must be mono [S], got shape {samples.shape}")
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    minimum = spec.hubert.conv_kernel[0] + spec.hubert.hop_samples
    if samples.shape[0] < minimum:
        raise InputError(f"audio window of {samples.shape[0]} samples is shorter than HuBERT's minimum {minimum}")
    return samples.astype(np.float32)[None]
