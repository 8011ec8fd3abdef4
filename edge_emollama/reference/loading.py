"""Build the reference from a user's checkpoint files (every tensor accounted for)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoints import (IGNORED_EMOTION_LLAMA, IGNORED_HUBERT, IGNORED_MAE, IGNORED_VIDEOMAE, CheckpointPaths,
                           account, load_state, shapes, split_emotion_llama)
from ..errors import CheckpointError
from ..lazy import require
from ..spec import ModelSpec
from .llm import merge_lora
from .model import EmotionLlamaReference
from .vit import resize_pos_embed

log = logging.getLogger(__name__)
PROJECTORS = ("llama_proj", "cls_tk_llama_proj", "feats_llama_proj1", "feats_llama_proj2", "feats_llama_proj3")


def load_reference(spec: ModelSpec, paths: CheckpointPaths, tokenizer, zeros: tuple = ()) -> EmotionLlamaReference:
    """The reference with every tensor from the user's files; branches in ``zeros`` need no file."""
    needed = ("llama_dir", "emotion_llama", "eva", "hubert_dir") + tuple(
        name for name in ("mae", "videomae") if name not in zeros)
    paths.check_exist(needed)
    model = EmotionLlamaReference(spec, tokenizer, hubert=_load_hubert(spec, paths.hubert_dir),
                                  llama=_load_llama(spec, paths.llama_dir))
    _load_eva(model, paths.eva)
    adapters = _load_emotion_llama(model, spec, paths.emotion_llama)
    merge_lora(model.llama_model, spec.lora, adapters)
    for name, module, ignored, prefix in (("mae", model.face_encoder, IGNORED_MAE, ""),
                                          ("videomae", model.video_encoder, IGNORED_VIDEOMAE, "encoder.")):
        if name not in zeros:
            _load_vit(module, getattr(paths, name), ignored, prefix)
    return model.eval()


def _load_eva(model: EmotionLlamaReference, path: Path) -> None:
    state = load_state(path, "EVA ViT-g")
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model.spec.eva.grid)
    account(shapes(model.visual_encoder), state, path)
    model.visual_encoder.load_state_dict({k: v.float() for k, v in state.items()})


def _load_emotion_llama(model: EmotionLlamaReference, spec: ModelSpec, path: Path) -> dict:
    state = load_state(path, "Emotion-LLaMA")
    rest, adapters = split_emotion_llama(state, spec, path)
    expected = {f"{p}.{k}": s for p in PROJECTORS for k, s in shapes(getattr(model, p)).items()}
    optional = {f"ln_vision.{k}": s for k, s in shapes(model.ln_vision).items()}
    account({**expected, **{k: s for k, s in optional.items() if k in rest}}, rest, path, IGNORED_EMOTION_LLAMA)
    for key, value in rest.items():
        if key in expected or key in optional:
            owner, name = key.split(".", 1)
            getattr(model, owner).state_dict()[name].copy_(value.float())
    if not any(k in rest for k in optional):
        log.info("%s has no ln_vision: it keeps its frozen initial values (weight 1, bias 0), as in the original",
                 path.name)
    return adapters


def _load_vit(module, path: Path, ignored: tuple, prefix: str) -> None:
    state = load_state(path, type(module).__name__)
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if "pos_embed" in state and "pos_embed" in module.state_dict():
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], module.spec.grid)
    account(shapes(module), state, path, ignored)
    module.load_state_dict({k: v.float() for k, v in state.items() if k in module.state_dict()})


def _from_pretrained(cls, folder: Path, what: str, ignored: tuple = (), **kwargs):
    if not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{what} folder {folder} has no config.json: point it at the Hugging Face directory")
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except Exception as exc:
        raise CheckpointError(f"{what} in {folder} could not be loaded ({type(exc).__name__}: {exc}); "
                              "the files are corrupt or incomplete: download them again") from exc
    unexpected = [k for k in info.get("unexpected_keys", []) if not any(i in k for i in ignored)]
    problems = {"missing": info.get("missing_keys", []), "unexpected": unexpected,
                "wrong shape": [str(m) for m in info.get("mismatched_keys", [])]}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(f"{what} in {folder} does not match the architecture: " +
                              "; ".join(f"{k} ({len(v)}): {', '.join(map(str, v[:8]))}" for k, v in problems.items()))
    return model.eval()


def _check_dims(what: str, folder: Path, pairs: dict) -> None:
    wrong = [f"{k}: file {a}, preset {b}" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        raise CheckpointError(f"{what} in {folder} has other dimensions than the preset: " + ", ".join(wrong))


def _load_hubert(spec: ModelSpec, folder: Path):
    transformers = require("transformers")
    model = _from_pretrained(transformers.HubertModel, folder, "HuBERT", IGNORED_HUBERT,
                             attn_implementation="eager", torch_dtype=torch.float32)
    c = model.config
    _check_dims("HuBERT", folder, {"hidden_size": (c.hidden_size, spec.hubert.hidden),
                                   "num_hidden_layers": (c.num_hidden_layers, spec.hubert.layers)})
    return model


def _load_llama(spec: ModelSpec, folder: Path):
    transformers = require("transformers")
    dtype = torch.float32 if spec.llama.hidden < 1024 else torch.float16
    model = _from_pretrained(transformers.LlamaForCausalLM, folder, "LLaMA-2", attn_implementation="eager",
                             torch_dtype=dtype)
    c = model.config
    _check_dims("LLaMA-2", folder, {"hidden_size": (c.hidden_size, spec.llama.hidden),
                                    "num_hidden_layers": (c.num_hidden_layers, spec.llama.layers),
                                    "vocab_size": (c.vocab_size, spec.llama.vocab)})
    return model
