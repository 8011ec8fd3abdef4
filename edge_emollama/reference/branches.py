"""The four exported units: each encoder together with its projector, emitting LLM-space rows.

Inputs are the preprocessed tensors of edge_emollama.preprocess; outputs are float32 rows of the LLM's
hidden size. These modules are what ONNX export traces and what the validation compares against.
"""
from __future__ import annotations

import torch
from torch import nn

from .audio import normalize_waveform


class EvaBranch(nn.Module):
    """pixels [B, 3, S, S] -> patch_rows [B, P/4, hidden], cls_row [B, 1, hidden] (encode_img of minigpt_v2)."""

    def __init__(self, eva, ln_vision, llama_proj, cls_tk_llama_proj):
        super().__init__()
        self.eva, self.ln_vision = eva, ln_vision
        self.llama_proj, self.cls_tk_llama_proj = llama_proj, cls_tk_llama_proj

    def forward(self, pixels: torch.Tensor):
        embeds = self.ln_vision(self.eva(pixels))
        cls_row = self.cls_tk_llama_proj(embeds[:, :1, :])
        patches = embeds[:, 1:, :]
        b, n, c = patches.shape
        patch_rows = self.llama_proj(patches.reshape(b, n // 4, c * 4))
        return patch_rows, cls_row


class FaceBranch(nn.Module):
    """faces [T, 3, 224, 224] -> [1, hidden]: per-frame MAE embedding, mean over frames, feats_llama_proj1."""

    def __init__(self, face_vit, proj):
        super().__init__()
        self.face_vit, self.proj = face_vit, proj

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.proj(self.face_vit(faces).mean(dim=0, keepdim=True))


class FaceFrameBranch(nn.Module):
    """faces [T, 3, 224, 224] -> [T, hidden]: each frame's MAE embedding through feats_llama_proj1.

    What is exported for MAE: the projector is affine, so the mean of these rows over a window's frames
    equals FaceBranch's row, and the runtime computes each frame's row once for all the windows that
    cover it (W / H = 4 at the defaults)."""

    def __init__(self, face_vit, proj):
        super().__init__()
        self.face_vit, self.proj = face_vit, proj

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.proj(self.face_vit(faces))


class VideoBranch(nn.Module):
    """clip [B, 3, 16, 224, 224] -> [B, 1, hidden]: VideoMAE tokens, mean, feats_llama_proj2."""

    def __init__(self, video_vit, proj):
        super().__init__()
        self.video_vit, self.proj = video_vit, proj

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.proj(self.video_vit(clip).mean(dim=1, keepdim=True))


class AudioBranch(nn.Module):
    """pcm [B, S] at 16 kHz in [-1, 1] -> [B, 1, hidden]: normalise, HuBERT last layer, mean, feats_llama_proj3."""

    def __init__(self, hubert, proj):
        super().__init__()
        self.hubert, self.proj = hubert, proj

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        hidden = self.hubert(normalize_waveform(pcm)).last_hidden_state
        return self.proj(hidden.mean(dim=1, keepdim=True))
