"""Seeded random models of the real architecture, and the user's checkpoint files written from them.

Tests and the ``tiny`` preset use these: the files carry the original key names and formats, so the
same loading code runs on them as on a user's real checkpoints.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoints import EMOTION_LLAMA_NAMES, LORA_PREFIX, CheckpointPaths
from ..spec import ModelSpec
from .llm import merge_lora
from .loading import PROJECTORS
from .model import EmotionLlamaReference
from .vit import resize_pos_embed


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights that give peaked, input-dependent outputs (default inits make near-uniform labels)."""
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, device=generator.device)
        if param.ndim >= 2 and "embed_tokens" in name:
            param.copy_(noise)
        elif param.ndim >= 2:
            param.copy_(noise / math.sqrt(math.prod(param.shape[1:])))
        elif name.endswith("weight") and ("norm" in name or "ln_" in name or "layer_norm" in name):
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.1 * noise)


def random_parts(spec: ModelSpec, tokenizer, seed: int = 0, device: str = "cpu"):
    """(base model before the LoRA merge, LoRA adapters, the EVA position table at checkpoint size).

    ``device``: where the model is built and the numbers drawn. A seed gives the same weights on every
    machine of one device kind; CPU and CUDA draws differ (the manifest records which one was used).
    Building on CUDA takes seconds at full size, against minutes on a CPU."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = EmotionLlamaReference(spec, tokenizer)
    randomize_(model, generator)
    with torch.no_grad():
        lm_head = model.llama_model.lm_head.weight
        lm_head.mul_(4.0)   # a sharper next-token distribution, so label choices are decisive
    half = max(spec.eva.grid // 2, 1)   # the real eva_vit_g.pth is 224 px (16x16) for a 448 px model
    pos_small = 0.5 * torch.randn(1, half * half + 1, spec.eva.dim, generator=generator, device=device)
    with torch.no_grad():
        model.visual_encoder.pos_embed.copy_(resize_pos_embed(pos_small, spec.eva.grid))
    adapters = {}
    kv = spec.llama.hidden // spec.llama.heads * spec.llama.kv_heads
    for layer in range(spec.llama.layers):
        for target in spec.lora.targets:
            out = spec.llama.hidden if target == "q_proj" else kv
            a = torch.randn(spec.lora.r, spec.llama.hidden, generator=generator, device=device)
            b = torch.randn(out, spec.lora.r, generator=generator, device=device)
            a, b = a / math.sqrt(spec.llama.hidden), b / math.sqrt(spec.lora.r)
            adapters[(layer, target)] = (a, b)
    return model, adapters, pos_small


def build_random(spec: ModelSpec, tokenizer, seed: int = 0, device: str = "cpu") -> EmotionLlamaReference:
    """The reference with seeded random weights and the LoRA merged (what the checkpoints would load to)."""
    model, adapters, _ = random_parts(spec, tokenizer, seed, device)
    merge_lora(model.llama_model, spec.lora, adapters)
    return model.eval()


def write_checkpoints(spec: ModelSpec, tokenizer, folder: str | Path, seed: int = 0) -> CheckpointPaths:
    """The file set a user brings (docs/checkpoints.md), with the original names, from ``random_parts``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, adapters, pos_small = random_parts(spec, tokenizer, seed)
    paths = CheckpointPaths.in_folder(folder)
    paths.emotion_llama = folder / EMOTION_LLAMA_NAMES[0]
    model.llama_model.save_pretrained(paths.llama_dir)
    model.audio_encoder.save_pretrained(paths.hubert_dir)
    eva = dict(model.visual_encoder.state_dict())
    eva["pos_embed"] = pos_small
    torch.save(eva, paths.eva)
    torch.save({"model": _emotion_llama_state(model, adapters), "epoch": 30}, paths.emotion_llama)
    torch.save({"model": _mae_state(model)}, paths.mae)
    torch.save({"model": _videomae_state(model)}, paths.videomae)
    return paths


def _emotion_llama_state(model: EmotionLlamaReference, adapters: dict) -> dict:
    state = {f"{p}.{k}": v.clone() for p in PROJECTORS for k, v in getattr(model, p).state_dict().items()}
    state.update({f"ln_vision.{k}": v.clone() for k, v in model.ln_vision.state_dict().items()})
    hidden = model.spec.llama.hidden
    state["attention.0.weight"] = torch.zeros(4, hidden)   # the original's unused attention head
    for (layer, target), (a, b) in adapters.items():
        stem = f"{LORA_PREFIX}{layer}.self_attn.{target}"
        state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = a, b
    return state


def _mae_state(model: EmotionLlamaReference) -> dict:
    state = dict(model.face_encoder.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 8)
    state["decoder_embed.weight"] = torch.zeros(8, model.spec.mae.dim)
    return state


def _videomae_state(model: EmotionLlamaReference) -> dict:
    state = {f"encoder.{k}": v for k, v in model.video_encoder.state_dict().items()}
    dim = model.spec.videomae.dim
    state["encoder.norm.weight"], state["encoder.norm.bias"] = torch.ones(dim), torch.zeros(dim)  # unused by the
    state["encoder_to_decoder.weight"] = torch.zeros(8, dim)                               # extraction's model
    state["decoder.norm.weight"] = torch.zeros(8)
    return state
