"""HuBERT-large (transformers' HubertModel, as the original's feature extraction used it)."""
from __future__ import annotations

import torch

from ..lazy import require
from ..spec import HubertSpec


def hubert_config(spec: HubertSpec):
    """A HubertConfig with HuBERT-large's structure (stable layer norm, layer-norm conv extractor)."""
    transformers = require("transformers")
    return transformers.HubertConfig(
        hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        intermediate_size=spec.ffn, conv_dim=list(spec.conv_dim), conv_kernel=list(spec.conv_kernel),
        conv_stride=list(spec.conv_stride), num_conv_pos_embeddings=spec.pos_conv_kernel,
        num_conv_pos_embedding_groups=spec.pos_conv_groups, feat_extract_norm="layer",
        do_stable_layer_norm=True, conv_bias=True, hidden_act="gelu", layer_norm_eps=1e-5,
        mask_time_prob=0.0, attn_implementation="eager",
    )


def build_hubert(spec: HubertSpec):
    transformers = require("transformers")
    return transformers.HubertModel(hubert_config(spec)).eval()


def normalize_waveform(pcm: torch.Tensor) -> torch.Tensor:
    """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation, per utterance ([B, S])."""
    mean = pcm.mean(dim=-1, keepdim=True)
    var = ((pcm - mean) ** 2).mean(dim=-1, keepdim=True)
    return (pcm - mean) / torch.sqrt(var + 1e-7)
