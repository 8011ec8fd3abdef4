"""LLaMA-2 (transformers' LlamaForCausalLM) with the Emotion-LLaMA LoRA merged in."""
from __future__ import annotations

import torch

from ..lazy import require
from ..spec import LlamaSpec, LoraSpec


def llama_config(spec: LlamaSpec):
    transformers = require("transformers")
    return transformers.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        rms_norm_eps=spec.eps, rope_theta=spec.rope_theta, max_position_embeddings=spec.context,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )


def build_llama(spec: LlamaSpec):
    transformers = require("transformers")
    return transformers.LlamaForCausalLM(llama_config(spec)).eval()


@torch.no_grad()
def merge_lora(llama, lora: LoraSpec, adapters: dict) -> None:
    """W <- W + (alpha / r) * B @ A for every adapted projection.

    ``adapters`` maps (layer, target) -> (A [r, in], B [out, r]); every (layer, target) must be present.
    """
    for (layer, target), (a, b) in adapters.items():
        proj = getattr(llama.model.layers[layer].self_attn, target)
        delta = lora.scale * (b.double() @ a.double())
        proj.weight.copy_((proj.weight.double() + delta).to(proj.weight.dtype))
