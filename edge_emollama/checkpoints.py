"""Loading the checkpoint files a user actually has, accounting for every tensor.

The original loads with ``strict=False`` and silently ignores renamed keys (a LoRA saved under another
name simply vanishes). Here every expected tensor must be found with its shape, and anything else in
the files must be on a short, named list of tensors the inference path does not use.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import CheckpointError
from .lazy import require
from .spec import ModelSpec

log = logging.getLogger(__name__)

# Unused tensors that real files carry: documented here, never silently dropped elsewhere.
IGNORED_EMOTION_LLAMA = ("attention.",)                        # an unused attention head in the .pth
IGNORED_MAE = ("mask_token", "decoder_", "head.", "fc_norm.")   # MAE pretraining decoder / heads
# VideoMAE: the pretraining encoder's final "norm." has no place in the extraction's model (use_mean_pooling:
# an Identity there), and its "fc_norm." is created but never applied (docs/model.md)
IGNORED_VIDEOMAE = ("mask_token", "decoder.", "encoder_to_decoder.", "head.", "fc_norm.", "norm.")
IGNORED_HUBERT = ("masked_spec_embed", "label_embs_concat", "final_proj.")
LORA_PREFIX = "llama_model.base_model.model.model.layers."
EMOTION_LLAMA_NAMES = ("Emoation_LLaMA.pth", "Emotion_LLaMA.pth", "checkpoint_best.pth", "MER2024-best.pth")


@dataclass
class CheckpointPaths:
    """Where a user's files are. ``mae``/``videomae`` may be None when those features are zeros."""
    llama_dir: Path
    emotion_llama: Path
    eva: Path
    hubert_dir: Path
    mae: Path | None = None
    videomae: Path | None = None

    @classmethod
    def in_folder(cls, folder: str | os.PathLike, **overrides) -> "CheckpointPaths":
        """The standard names inside one folder; ``overrides`` replace single entries."""
        folder = Path(folder)
        emotion = next((folder / n for n in EMOTION_LLAMA_NAMES if (folder / n).exists()),
                       folder / EMOTION_LLAMA_NAMES[0])
        paths = cls(llama_dir=folder / "Llama-2-7b-chat-hf", emotion_llama=emotion, eva=folder / "eva_vit_g.pth",
                    hubert_dir=folder / "chinese-hubert-large", mae=folder / "mae.pth",
                    videomae=folder / "videomae.pth")
        for key, value in overrides.items():
            if value is not None:
                setattr(paths, key, Path(value))
        return paths

    def check_exist(self, needed: tuple) -> None:
        missing = [f"{f.name}: {getattr(self, f.name)}" for f in fields(self)
                   if f.name in needed and not Path(getattr(self, f.name) or "").exists()]
        if missing:
            raise CheckpointError("checkpoint files not found:\n  " + "\n  ".join(missing) +
                                  "\nPass --checkpoints DIR holding the standard names, or set the paths under "
                                  "export.checkpoints in config.yaml (see docs/checkpoints.md).")


def load_state(path: Path, what: str) -> dict:
    """A tensor dict from a .pth/.bin/.safetensors file; {'model': ...} and {'module': ...} are unwrapped."""
    torch = require("torch")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            state = require("safetensors.torch").load_file(str(path))
        else:
            state = _torch_load(torch, path)
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign file: name it and the fix
        raise CheckpointError(f"{what} checkpoint {path} could not be read ({type(exc).__name__}: {exc}); "
                              "the file is corrupt or not a PyTorch checkpoint: download it again") from exc
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{what} checkpoint {path} holds no tensor dictionary")
    return state


def _torch_load(torch, path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc) and "Unpickl" not in type(exc).__name__:
            raise
        log.warning("%s holds more than tensors (e.g. a training config); loading it as a full pickle. "
                    "Only do this with files you trust.", path)
        return torch.load(str(path), map_location="cpu", weights_only=False)


def account(expected: dict, found: dict, source: Path, ignored: tuple = ()) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped tensors (if any)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not k.startswith(ignored))
    misshaped = sorted(f"{k}: file {tuple(found[k].shape)}, model {tuple(expected[k])}"
                       for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    problems = [(label, items) for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
    if problems:
        lines = [f"{label} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                 for label, items in problems]
        raise CheckpointError(f"{source} does not match the architecture:\n  " + "\n  ".join(lines) +
                              "\nCheck that the file is the one the preset expects (docs/checkpoints.md).")


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def split_emotion_llama(state: dict, spec: ModelSpec, source: Path):
    """Separate the Emotion-LLaMA .pth into projector/ln_vision tensors and LoRA adapters (both checked)."""
    lora, rest = {}, {}
    for key, value in state.items():
        (lora if key.startswith(LORA_PREFIX) else rest)[key] = value
    expected_lora = {}
    hidden, r = spec.llama.hidden, spec.lora.r
    kv = spec.llama.hidden // spec.llama.heads * spec.llama.kv_heads
    for layer in range(spec.llama.layers):
        for target in spec.lora.targets:
            out = hidden if target == "q_proj" else kv
            stem = f"{LORA_PREFIX}{layer}.self_attn.{target}"
            expected_lora[f"{stem}.lora_A.weight"] = (r, hidden)
            expected_lora[f"{stem}.lora_B.weight"] = (out, r)
    lora = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in lora.items()}
    account(expected_lora, lora, source)
    adapters = {}
    for layer in range(spec.llama.layers):
        for target in spec.lora.targets:
            stem = f"{LORA_PREFIX}{layer}.self_attn.{target}"
            adapters[(layer, target)] = (lora[f"{stem}.lora_A.weight"].float(), lora[f"{stem}.lora_B.weight"].float())
    return rest, adapters
