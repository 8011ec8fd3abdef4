"""How far the faces' inputs and features moved when the runtime began to feed what the extraction fed.

    python scripts/fidelity_delta.py [OUT.json] [--preset emotion-llama|mid] [--seconds 4]

On the generated sample clip, one window: the earlier inputs (Haar box crops squared to the encoder's side,
ImageNet mean/std, 16 evenly spaced VideoMAE frames, VideoMAE's final LayerNorm) against today's (MTCNN +
OpenFace-style alignment at 112 px, [0, 1] pixels, 8 x 2 consecutive VideoMAE frames, no final norm), through
MAE and VideoMAE encoders with seeded random weights at the preset's shapes. Prints and writes the cosine
similarities of inputs and features (1.0: unchanged). Random weights: the size of the change, not its effect
on real features (docs/model.md).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge_emollama.config import FaceConfig, FileConfig
from edge_emollama.export.face_detector import export_face_detector
from edge_emollama.reference.synthetic import randomize_
from edge_emollama.reference.vit import FaceViT, VideoViT
from edge_emollama.runtime.align import align_face
from edge_emollama.runtime.faces import HaarDetector, MtcnnDetector, crop_square
from edge_emollama.runtime.sources import VideoFileSource
from edge_emollama.runtime.windows import segment_indices, uniform_indices
from edge_emollama.spec import ALIGNED_FACE_SCALE, ALIGNED_FACE_SIZE, PRESETS
from edge_emollama.tools.sample_clip import write_sample_clip

IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def old_pixels(crops: np.ndarray) -> np.ndarray:
    x = crops.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - IMAGENET[0][:, None, None]) / IMAGENET[1][:, None, None]


def new_pixels(aligned: np.ndarray, size: int) -> np.ndarray:
    resized = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in aligned])
    return resized.astype(np.float32).transpose(0, 3, 1, 2) / 255.0


def frames_of(clip: Path, rate: int) -> list:
    with VideoFileSource(clip, rate, realtime=False, options=FileConfig(audio=False, ring_seconds=60)) as src:
        while not src.finished:
            src._stop.wait(0.05)
        return src.frames.between(0, 2**62)


class _Folder:
    """Just enough of an export for MtcnnDetector: the three face nets in a temporary folder."""

    def __init__(self, folder: Path):
        self.root = folder
        self.files = export_face_detector(folder, 17, {})

    def path(self, format: str, branch: str, **_) -> Path:
        return self.files[branch]


def crops_both_ways(frames: list, size: int, tmp: Path) -> tuple:
    haar = HaarDetector(FaceConfig())
    mtcnn = MtcnnDetector(_Folder(tmp), FaceConfig())
    boxes, aligned = [], []
    for frame in frames:
        old, new = haar.largest(frame.image), mtcnn.largest(frame.image)
        boxes.append(crop_square(frame.image, old.box, size) if old else np.zeros((size, size, 3), np.uint8))
        aligned.append(align_face(frame.image, new.landmarks, ALIGNED_FACE_SIZE, ALIGNED_FACE_SCALE) if new
                       else np.zeros((ALIGNED_FACE_SIZE,) * 2 + (3,), np.uint8))
    return np.stack(boxes), np.stack(aligned)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="bench-results/fidelity-delta.json")
    parser.add_argument("--preset", default="emotion-llama", choices=sorted(PRESETS))
    parser.add_argument("--seconds", type=float, default=2.0, help="the window's length")
    args = parser.parse_args()
    spec = PRESETS[args.preset]
    tmp = Path(tempfile.mkdtemp(prefix="edge-emollama-fidelity-"))
    clip = write_sample_clip(tmp / "clip.mp4", seconds=args.seconds + 0.5)
    frames = frames_of(clip, spec.hubert.sample_rate)[: int(args.seconds * 30)]
    boxes, aligned = crops_both_ways(frames, spec.mae.image_size, tmp)
    generator = torch.Generator().manual_seed(0)
    mae, video = FaceViT(spec.mae).eval(), VideoViT(spec.videomae).eval()
    randomize_(mae, generator)
    randomize_(video, generator)
    old_in, new_in = old_pixels(boxes), new_pixels(aligned, spec.mae.image_size)
    report = {"preset": spec.name, "frames": len(frames), "clip_s": args.seconds,
              "mae_input_cosine": float(np.mean([cosine(a, b) for a, b in zip(old_in, new_in)])),
              "normalisation_only_input_cosine": float(np.mean([cosine(a, b) for a, b in
                                                                zip(old_in, new_pixels(boxes, spec.mae.image_size))]))}
    old_row = mae(torch.from_numpy(old_in)).mean(0)
    new_row = mae(torch.from_numpy(new_in)).mean(0)
    report["mae_feature_cosine"] = cosine(old_row, new_row)
    uniform, segments = uniform_indices(len(frames), 16), segment_indices(len(frames))
    old_clip = torch.from_numpy(old_in[uniform].transpose(1, 0, 2, 3)[None].copy())
    new_clip = torch.from_numpy(new_in[segments].transpose(1, 0, 2, 3)[None].copy())
    tokens_old, tokens_new = video(old_clip), video(new_clip)
    normed = torch.nn.functional.layer_norm(tokens_old, (spec.videomae.dim,), eps=spec.videomae.eps)
    report["videomae_input_cosine"] = cosine(old_clip.numpy(), new_clip.numpy())
    report["videomae_feature_cosine"] = cosine(normed.mean(1), tokens_new.mean(1))
    report["videomae_norm_only_feature_cosine"] = cosine(normed.mean(1), tokens_old.mean(1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:36} {value if isinstance(value, (int, str)) else round(value, 4)}")


if __name__ == "__main__":
    main()
