"""The four encoder branches, declared once: what export, validation, runtime and bench all read.

Each branch is an encoder with its projector, exported as one ONNX unit that emits LLM-space rows. Its
declaration says (in the manner of optimum's per-model export configs):

- the ONNX inputs and outputs, with their dynamic axes;
- how a window's raw input becomes the unit's feed (``feed``; numpy + Pillow, edge_emollama/preprocess.py),
  and what random inputs of those shapes look like (``example_inputs``, drawn fresh by every validation);
- the zero rule: a window item without the branch's input (``raw`` is None: no video, no audio source, or
  ``absent: zeros`` with no face / no speech) gets the branch's zero row (its projector's bias,
  ``zero_rows.npy``); with ``absent: encode`` (the extraction's way) black faces and silence are encoded;
- whether it yields one row per frame (MAE: the window's row is their mean, so each frame is computed
  once for all the windows that cover it), or has a batch axis (EVA, VideoMAE, HuBERT: axis 0 of every input
  and output counts windows; window ``i``'s outputs are ``output[i]``, the shapes of one window's rows), so
  that several windows (people, streams) go through one run (:meth:`Branch.split`);
- the parity tolerance per precision (max |onnx - torch| / max |torch| over each output);
- the TensorRT optimisation profile of its dynamic axes.

The media block is ``[EVA patch rows] + [MAE, VideoMAE, HuBERT] + [EVA CLS]`` (:func:`assemble_media`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from . import preprocess
from .spec import FEATURE_BRANCHES, ModelSpec

__all__ = ["TensorIO", "Branch", "EVA", "MAE", "VIDEOMAE", "HUBERT", "BRANCHES", "FEATURES", "assemble_media"]

TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}
BATCH = "batch"   # the name of the windows axis of a batched branch
MAX_BATCH = 8     # the largest batch the TensorRT profiles allow (ONNX Runtime has no limit)


@dataclass(frozen=True)
class TensorIO:
    name: str
    dynamic: dict = field(default_factory=dict)   # axis -> axis name


@dataclass(frozen=True)
class Branch(ABC):
    name: str
    inputs: tuple
    outputs: tuple
    per_frame: bool = False         # one output row per input frame (the window's row is their mean)
    per_person: bool = False        # its input is a person's face crops (else the window's frame or audio,
                                    # shared by the people of one window)
    tolerance: dict = field(default_factory=lambda: dict(TOLERANCES))

    @property
    def input_names(self) -> tuple:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple:
        return tuple(t.name for t in self.outputs)

    @property
    def batched(self) -> bool:
        """Axis 0 of its inputs and outputs counts windows (see the module's docstring)."""
        return all(t.dynamic.get(0) == BATCH for t in self.inputs + self.outputs)

    def split(self, outputs: list, count: int) -> list:
        """A batched run's outputs -> ``count`` windows' outputs, each as one window's run would give them."""
        if not self.batched:
            raise ValueError(f"{self.name} has no batch axis")
        return [[output[i] for output in outputs] for i in range(count)]

    def dynamic_axes(self) -> dict:
        """{tensor name: {axis: name}} for torch.onnx.export and the manifest."""
        return {t.name: dict(t.dynamic) for t in self.inputs + self.outputs if t.dynamic}

    @abstractmethod
    def raw(self, item):
        """The window item's raw input for this branch (None when the window lacks it)."""

    @abstractmethod
    def feed(self, raw, spec: ModelSpec) -> dict:
        """{input name: float32 array} from the raw input."""

    @abstractmethod
    def example_shapes(self, spec: ModelSpec, frames: int, seconds: float) -> dict:
        """{input name: shape} of random inputs with ``frames`` face frames and ``seconds`` of audio."""

    def example_inputs(self, spec: ModelSpec, rng: np.random.Generator, frames: int = 4,
                       seconds: float = 1.0, batch: int = 1) -> dict:
        """Random float32 inputs of the unit's input shapes (what validation draws fresh each run); ``batch``
        windows for a batched branch."""
        shapes = self.example_shapes(spec, frames, seconds)
        if batch != 1:
            if not self.batched:
                raise ValueError(f"{self.name} has no batch axis")
            shapes = {name: (batch, *shape[1:]) for name, shape in shapes.items()}
        return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}

    def trt_profile(self, spec: ModelSpec) -> dict:
        """{input name: (min, opt, max) shape} for the dynamic axes (TensorRT)."""
        return {}


class _Eva(Branch):
    def raw(self, item):
        return item.frame

    def feed(self, raw, spec: ModelSpec) -> dict:
        if raw is None:   # no video: an all-zero (mean-colour) image
            return {"pixels": np.zeros((1, 3, spec.eva.image_size, spec.eva.image_size), np.float32)}
        return {"pixels": preprocess.eva_pixels(raw, spec)}

    def example_shapes(self, spec: ModelSpec, frames: int, seconds: float) -> dict:
        return {"pixels": (1, 3, spec.eva.image_size, spec.eva.image_size)}

    def trt_profile(self, spec: ModelSpec) -> dict:
        image = (3, spec.eva.image_size, spec.eva.image_size)
        return {"pixels": ((1, *image), (1, *image), (MAX_BATCH, *image))}


class _Mae(Branch):
    def raw(self, item):
        return item.face_crops if len(item.face_crops) else None

    def feed(self, raw, spec: ModelSpec) -> dict:
        return {"faces": preprocess.face_batch(list(raw), spec)}

    def example_shapes(self, spec: ModelSpec, frames: int, seconds: float) -> dict:
        return {"faces": (frames, 3, spec.mae.image_size, spec.mae.image_size)}

    def trt_profile(self, spec: ModelSpec) -> dict:
        face = (3, spec.mae.image_size, spec.mae.image_size)
        return {"faces": ((1, *face), (16, *face), (64, *face))}


class _VideoMae(Branch):
    def raw(self, item):
        return item.videomae_frames

    def feed(self, raw, spec: ModelSpec) -> dict:
        return {"clip": preprocess.video_clip(list(raw), spec)}

    def example_shapes(self, spec: ModelSpec, frames: int, seconds: float) -> dict:
        v = spec.videomae
        return {"clip": (1, 3, v.frames, v.image_size, v.image_size)}

    def trt_profile(self, spec: ModelSpec) -> dict:
        v = spec.videomae
        clip = (3, v.frames, v.image_size, v.image_size)
        return {"clip": ((1, *clip), (1, *clip), (MAX_BATCH, *clip))}


class _Hubert(Branch):
    def raw(self, item):
        return item.audio

    def feed(self, raw, spec: ModelSpec) -> dict:
        return {"pcm": preprocess.audio_pcm(raw, spec)}

    def example_shapes(self, spec: ModelSpec, frames: int, seconds: float) -> dict:
        return {"pcm": (1, int(seconds * spec.hubert.sample_rate))}

    def example_inputs(self, spec: ModelSpec, rng: np.random.Generator, frames: int = 4,
                       seconds: float = 1.0, batch: int = 1) -> dict:
        return {k: 0.3 * v for k, v in super().example_inputs(spec, rng, frames, seconds, batch).items()}   # speech-like

    def trt_profile(self, spec: ModelSpec) -> dict:
        second = spec.hubert.sample_rate
        return {"pcm": ((1, second // 4), (1, 4 * second), (MAX_BATCH, 8 * second))}


EVA = _Eva("eva", (TensorIO("pixels", {0: BATCH}),),
           (TensorIO("patch_rows", {0: BATCH}), TensorIO("cls_row", {0: BATCH})))
MAE = _Mae("mae", (TensorIO("faces", {0: "frames"}),), (TensorIO("mae_frame_rows", {0: "frames"}),), per_frame=True,
           per_person=True)
VIDEOMAE = _VideoMae("videomae", (TensorIO("clip", {0: BATCH}),), (TensorIO("videomae_row", {0: BATCH}),),
                     per_person=True)
HUBERT = _Hubert("hubert", (TensorIO("pcm", {0: BATCH, 1: "samples"}),), (TensorIO("hubert_row", {0: BATCH}),))

BRANCHES = {b.name: b for b in (EVA, MAE, VIDEOMAE, HUBERT)}
FEATURES = tuple(BRANCHES[name] for name in FEATURE_BRANCHES)   # media-block order of the three feature rows


def assemble_media(patch_rows: np.ndarray, feature_rows: list, cls_row: np.ndarray) -> np.ndarray:
    """[media_rows, hidden] float32: EVA patch rows, the MAE / VideoMAE / HuBERT rows, the EVA CLS row."""
    return np.concatenate([patch_rows, *feature_rows, cls_row]).astype(np.float32, copy=False)


def window_feeds(item, spec: ModelSpec, zeros: tuple = ()) -> dict:
    """{branch: feed} for every branch a window item has input for (EVA always; the rest by their zero rule),
    leaving out ``zeros``: what the reference takes for the same window the runtime encodes."""
    feeds = {}
    for name, branch in BRANCHES.items():
        raw = branch.raw(item)
        if name not in zeros and (raw is not None or branch is EVA):
            feeds[name] = branch.feed(raw, spec)
    return feeds
