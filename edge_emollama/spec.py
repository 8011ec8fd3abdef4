"""What Emotion-LLaMA is, as numbers and strings: presets, labels, the prompt and the media layout.

Everything here is plain data (no torch), shared by the reference model, the export stage and the
runtime. Facts follow the inference path of ZebangCheng/Emotion-LLaMA (see docs/model.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError, did_you_mean
from .vocab import tiny_vocab

# Prompt order: the order in which the instruction lists the labels, and the order of every
# probability vector this project produces.
LABELS = ("happy", "sad", "neutral", "angry", "worried", "surprise", "fear", "contempt", "doubt")

RECOGNITION_INSTRUCTION = (
    "Please determine which emotion label in the video represents: "
    "happy, sad, neutral, angry, worried, surprise, fear, contempt, doubt."
)
REASON_INSTRUCTION = (
    "Please analyze all the clues in the video and reason out the emotional label of the person in the video."
)
# conv template CONV_VISION_minigptv2 with system "" -> "<s>[INST] " + message + " [/INST]", and the message
# built as in first_face.py: "<video><VideoHere></video> <feature><FeatureHere></feature> {line} [{task}] {instr} ".
# The double spaces are real.
PROMPT_TEMPLATE = (
    "<s>[INST] <video><VideoHere></video> <feature><FeatureHere></feature> "
    "The person in video says: {subtitle}.  [{task}] {instruction}  [/INST]"
)
VIDEO_PLACEHOLDER = "<VideoHere>"
FEATURE_PLACEHOLDER = "<FeatureHere>"

# Media layouts: "inference" is get_context_emb (all rows at <VideoHere>, the published F1);
# "training" is prompt_wrap (EVA patch rows at <VideoHere>, the 4 other rows at <FeatureHere>).
LAYOUTS = ("inference", "training")
FEATURE_BRANCHES = ("mae", "videomae", "hubert")  # order of the three feature rows in the media block
FEATURE_MODES = ("real", "zeros")
FRAME_RULES = ("middle", "first", "last")
# The faces the model was trained on: OpenFace FeatureExtraction's aligned faces (default flags), 112 x 112 at
# similarity scale 0.7, masked outside the face; read back and resized to the encoders' size (docs/model.md).
ALIGNED_FACE_SIZE = 112
ALIGNED_FACE_SCALE = 0.7
# VideoMAE's extraction samples the clip in 8 segments of 2 consecutive frames (dataset_MER.py, test mode).
VIDEOMAE_SEGMENTS, VIDEOMAE_SEGMENT_FRAMES = 8, 2


@dataclass(frozen=True)
class VitSpec:
    """A ViT encoder: EVA ViT-g (image), MAE ViT-L (faces) or VideoMAE ViT-L (tubelets)."""
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    eps: float = 1e-6
    frames: int = 1        # VideoMAE: frames per clip
    tubelet: int = 1       # VideoMAE: frames per tubelet

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid * (self.frames // self.tubelet)


@dataclass(frozen=True)
class HubertSpec:
    """HuBERT-large style audio encoder (transformers HubertConfig fields)."""
    hidden: int
    layers: int
    heads: int
    ffn: int
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    sample_rate: int = 16000

    @property
    def hop_samples(self) -> int:
        hop = 1
        for s in self.conv_stride:
            hop *= s
        return hop


@dataclass(frozen=True)
class LlamaSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    eps: float = 1e-5
    rope_theta: float = 10000.0
    context: int = 4096


@dataclass(frozen=True)
class LoraSpec:
    r: int = 64
    alpha: int = 16
    targets: tuple = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class ModelSpec:
    """One preset: every dimension of the model, and what the encoders consume per window."""
    name: str
    eva: VitSpec
    mae: VitSpec
    videomae: VitSpec
    hubert: HubertSpec
    llama: LlamaSpec
    lora: LoraSpec = field(default_factory=LoraSpec)
    feature_dim: int = 1024       # MAE / VideoMAE / HuBERT features fed to feats_llama_proj1/2/3
    tokenizer: str = "llama2"     # "llama2": the user's tokenizer.model; "tiny": built in (edge_emollama.vocab)
    clip_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    clip_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @property
    def patch_rows(self) -> int:
        """EVA patch tokens after grouping every 4 consecutive ones (256 for the real model)."""
        return self.eva.grid * self.eva.grid // 4

    @property
    def media_rows(self) -> int:
        """[patch rows] + [MAE, VideoMAE, HuBERT] + [EVA CLS] (260 for the real model)."""
        return self.patch_rows + len(FEATURE_BRANCHES) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        """The inverse of ``to_dict`` (how the runtime reads the geometry a manifest recorded).

        TypeError/KeyError for a dict of another shape; the manifest reader turns them into one error."""
        parts = {"eva": VitSpec, "mae": VitSpec, "videomae": VitSpec, "hubert": HubertSpec, "llama": LlamaSpec,
                 "lora": LoraSpec}
        values = {}
        for f in fields(cls):
            value = data[f.name]
            if f.name in parts:
                value = _frozen(parts[f.name], value)
            elif isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        return cls(**values)


EMOTION_LLAMA = ModelSpec(
    name="emotion-llama",
    eva=VitSpec(image_size=448, patch_size=14, dim=1408, depth=39, heads=16, mlp_dim=6144),
    mae=VitSpec(image_size=224, patch_size=16, dim=1024, depth=24, heads=16, mlp_dim=4096),
    videomae=VitSpec(image_size=224, patch_size=16, dim=1024, depth=24, heads=16, mlp_dim=4096,
                     frames=16, tubelet=2),
    hubert=HubertSpec(hidden=1024, layers=24, heads=16, ffn=4096),
    llama=LlamaSpec(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000),
)

# Same architecture and code paths, seeded random weights, built in seconds, with the built-in
# vocabulary of edge_emollama.vocab.
TINY = ModelSpec(
    name="tiny",
    eva=VitSpec(image_size=56, patch_size=14, dim=32, depth=2, heads=2, mlp_dim=139),
    mae=VitSpec(image_size=32, patch_size=16, dim=24, depth=2, heads=2, mlp_dim=96),
    videomae=VitSpec(image_size=32, patch_size=16, dim=24, depth=2, heads=2, mlp_dim=96, frames=16, tubelet=2),
    hubert=HubertSpec(hidden=24, layers=2, heads=2, ffn=48, conv_dim=(16,) * 7, pos_conv_kernel=16, pos_conv_groups=4),
    llama=LlamaSpec(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, vocab=len(tiny_vocab()), context=1024),
    lora=LoraSpec(r=4, alpha=1),
    feature_dim=24,
    tokenizer="tiny",
)

# Between the two, for CPU benchmarks: every branch does real work (68 media rows, an 8-layer LLM).
MID = ModelSpec(
    name="mid",
    eva=VitSpec(image_size=224, patch_size=14, dim=256, depth=6, heads=4, mlp_dim=1117),
    mae=VitSpec(image_size=112, patch_size=16, dim=256, depth=4, heads=4, mlp_dim=1024),
    videomae=VitSpec(image_size=112, patch_size=16, dim=256, depth=4, heads=4, mlp_dim=1024, frames=16, tubelet=2),
    hubert=HubertSpec(hidden=256, layers=4, heads=4, ffn=1024, conv_dim=(128,) * 7, pos_conv_kernel=32,
                      pos_conv_groups=8),
    llama=LlamaSpec(hidden=512, layers=8, heads=8, kv_heads=8, ffn=1376, vocab=len(tiny_vocab()), context=2048),
    lora=LoraSpec(r=8, alpha=2),
    feature_dim=256,
    tokenizer="tiny",
)

PRESETS = {spec.name: spec for spec in (EMOTION_LLAMA, MID, TINY)}


def _frozen(cls, data: dict):
    """A frozen spec dataclass from its dict, lists back to tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def get_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'{did_you_mean(name, PRESETS)}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_prompt(subtitle: str, task: str = "emotion", instruction: str = RECOGNITION_INSTRUCTION) -> str:
    """The full prompt text exactly as eval_emotion.py builds it, placeholders still in."""
    return PROMPT_TEMPLATE.format(subtitle=subtitle, task=task, instruction=instruction)
