"""The three ViT encoders of Emotion-LLaMA, with the parameter names of their original checkpoints.

- ``EvaViT``: EVA ViT-g/14 as in minigpt4/models/eva_vit.py (q/v biases, learned position embedding,
  no final norm); a 224-pixel checkpoint's position embedding is resized bicubically to the model's grid.
- ``FaceViT``: MAE ViT-L/16 (facebookresearch/mae models_vit, qkv bias, ``norm``); the per-frame embedding is
  the CLS token after ``norm``.
- ``VideoViT``: VideoMAE ViT-L/16 with tubelet 2 (q/v biases, fixed sinusoidal positions) as the extraction
  built it: ``vit_large_patch16_224()`` with ``use_mean_pooling=True``, where the final ``norm`` is an Identity
  (and ``fc_norm`` is never applied): the clip embedding is the mean of the last block's tokens, no LayerNorm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import VitSpec


class Attention(nn.Module):
    """Multi-head self attention; ``bias="qv"`` is the EVA/VideoMAE style (no key bias)."""

    def __init__(self, dim: int, heads: int, bias: str):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=bias == "qkv")
        if bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self._qv = bias == "qv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = self.qkv.bias
        if self._qv:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: VitSpec, bias: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.attn = Attention(spec.dim, spec.heads, bias)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.mlp = Mlp(spec.dim, spec.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, spec: VitSpec, video: bool = False):
        super().__init__()
        if video:
            kernel = (spec.tubelet, spec.patch_size, spec.patch_size)
            self.proj = nn.Conv3d(3, spec.dim, kernel_size=kernel, stride=kernel)
        else:
            self.proj = nn.Conv2d(3, spec.dim, kernel_size=spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _ClsViT(nn.Module):
    """Patch embedding, a CLS token, learned positions and the blocks (the parameter names of both files)."""

    def __init__(self, spec: VitSpec, bias: str):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches + 1, spec.dim))
        self.blocks = nn.ModuleList(Block(spec, bias) for _ in range(spec.depth))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class EvaViT(_ClsViT):
    """EVA ViT-g: [B, 3, H, W] normalized pixels -> [B, 1 + patches, dim] (CLS first, no final norm)."""

    def __init__(self, spec: VitSpec):
        super().__init__(spec, "qv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)


class FaceViT(_ClsViT):
    """MAE ViT-L: [T, 3, 224, 224] face crops -> [T, dim] CLS embeddings after ``norm``."""

    def __init__(self, spec: VitSpec):
        super().__init__(spec, "qkv")
        self.norm = nn.LayerNorm(spec.dim, eps=spec.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tokens(x))[:, 0]


class VideoViT(nn.Module):
    """VideoMAE ViT-L: [B, 3, frames, 224, 224] -> [B, tokens, dim], the last block's output (no final norm)."""

    def __init__(self, spec: VitSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec, video=True)
        self.register_buffer("pos_embed", sinusoid_table(spec.num_patches, spec.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(spec, "qv") for _ in range(spec.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed position table: sin on even, cos on odd channels, 10000^(2*(j//2)/dim)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """eva_vit.interpolate_pos_embed: keep the CLS slot, resize the patch grid bicubically."""
    cls_slot, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(patches.shape[1]))
    if old == grid:
        return pos_embed
    patches = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((cls_slot.float(), patches.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)
