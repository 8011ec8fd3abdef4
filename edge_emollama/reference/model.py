"""The PyTorch reference of Emotion-LLaMA's inference path: encoders + projectors -> media block ->
LLaMA-2 (LoRA merged) -> label distribution from the next-token logits after ``[/INST]``.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
from torch import nn

from ..branches import FEATURES, assemble_media
from ..prompt import label_pieces, prompt_parts
from ..scoring import softmax
from ..spec import ModelSpec
from .audio import build_hubert
from .branches import AudioBranch, EvaBranch, FaceBranch, FaceFrameBranch, VideoBranch
from .llm import build_llama
from .vit import EvaViT, FaceViT, VideoViT


class EmotionLlamaReference(nn.Module):
    """Attribute names follow minigpt_v2 (``llama_proj``, ``feats_llama_proj1``, ...) so that the
    Emotion-LLaMA checkpoint's keys map one to one."""

    def __init__(self, spec: ModelSpec, tokenizer, hubert=None, llama=None):
        super().__init__()
        hidden = spec.llama.hidden
        self.spec, self.tokenizer = spec, tokenizer
        self.visual_encoder = EvaViT(spec.eva)
        self.ln_vision = nn.LayerNorm(spec.eva.dim)
        self.face_encoder = FaceViT(spec.mae)
        self.video_encoder = VideoViT(spec.videomae)
        self.audio_encoder = hubert if hubert is not None else build_hubert(spec.hubert)
        self.llama_proj = nn.Linear(spec.eva.dim * 4, hidden)
        self.cls_tk_llama_proj = nn.Linear(spec.eva.dim, hidden)
        self.feats_llama_proj1 = nn.Linear(spec.feature_dim, hidden)
        self.feats_llama_proj2 = nn.Linear(spec.feature_dim, hidden)
        self.feats_llama_proj3 = nn.Linear(spec.feature_dim, hidden)
        self.llama_model = llama if llama is not None else build_llama(spec.llama)
        self.eval()

    # -- the exported units -------------------------------------------------------------------
    def branches(self) -> dict:
        return {
            "eva": EvaBranch(self.visual_encoder, self.ln_vision, self.llama_proj, self.cls_tk_llama_proj),
            "mae": FaceBranch(self.face_encoder, self.feats_llama_proj1),
            "videomae": VideoBranch(self.video_encoder, self.feats_llama_proj2),
            "hubert": AudioBranch(self.audio_encoder, self.feats_llama_proj3),
        }

    def export_units(self) -> dict:
        """The modules exported to ONNX: as ``branches()`` but MAE per frame (rows averaged by the runtime)."""
        return {**self.branches(), "mae": FaceFrameBranch(self.face_encoder, self.feats_llama_proj1)}

    @torch.no_grad()
    def zero_rows(self) -> np.ndarray:
        """[3, hidden]: the MAE / VideoMAE / HuBERT rows when their 1024-d feature is zeros (the demo's rule)."""
        weight = self.feats_llama_proj1.weight
        zeros = torch.zeros(1, self.spec.feature_dim, device=weight.device, dtype=weight.dtype)
        projs = (self.feats_llama_proj1, self.feats_llama_proj2, self.feats_llama_proj3)
        return torch.cat([p(zeros) for p in projs]).float().cpu().numpy()

    @torch.no_grad()
    def media_block(self, feeds: dict, zeros: tuple = ()) -> np.ndarray:
        """[media_rows, hidden] in the documented order from the branches' feeds (``{branch: {input: array}}``,
        edge_emollama/branches.py). A feature branch listed in ``zeros`` or absent from ``feeds`` gives its zero
        row, as the runtime does for a window without that input."""
        units = self.branches()
        patch_rows, cls_row = (out[0] for out in units["eva"](*self._tensors(feeds["eva"])))
        zero = self.zero_rows()
        rows = [zero[i:i + 1] if b.name in zeros or b.name not in feeds else _numpy(self._window_row(units[b.name], feeds[b.name]))
                for i, b in enumerate(FEATURES)]
        return assemble_media(_numpy(patch_rows), rows, _numpy(cls_row))

    def _window_row(self, unit, feed: dict) -> torch.Tensor:
        """[1, hidden]: the feature row of one window (the batched units give [1, 1, hidden])."""
        row = unit(*self._tensors(feed))
        return row[0] if row.dim() == 3 else row

    def _tensors(self, feed: dict) -> list:
        """A branch's numpy feed as tensors on this model's device and dtype (CPU float32 for tests, CUDA fp16
        for timing), in the order of its inputs."""
        weight = self.llama_proj.weight
        return [torch.from_numpy(np.ascontiguousarray(a)).to(weight.device, weight.dtype) for a in feed.values()]

    # -- the LLM ------------------------------------------------------------------------------
    @torch.no_grad()
    def label_logprobs(self, media_rows: np.ndarray, subtitle: str, layout: str = "inference") -> np.ndarray:
        """Log sequence probability of each label's pieces after the prompt (prompt label order)."""
        parts = prompt_parts(self.tokenizer, self.spec, subtitle, layout)
        out = self.llama_model(inputs_embeds=self._embed(parts, media_rows)[None], use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
        scores = []
        for pieces in label_pieces(self.tokenizer):
            score = first[pieces[0]]
            if len(pieces) > 1:
                cache = copy.deepcopy(out["cache"] if "cache" in out else out["past_key_values"])
                ids = torch.tensor([pieces[:-1]], device=first.device)
                more = self.llama_model(input_ids=ids, **_cache_kwarg(self.llama_model, cache))
                steps = torch.log_softmax(more.logits[0].double(), dim=-1)
                score = score + sum(steps[i, pieces[i + 1]] for i in range(len(pieces) - 1))
            scores.append(float(score))
        return np.asarray(scores)

    def label_distribution(self, media_rows: np.ndarray, subtitle: str, layout: str = "inference") -> np.ndarray:
        return softmax(self.label_logprobs(media_rows, subtitle, layout))

    def _embed(self, parts: list, media_rows: np.ndarray) -> torch.Tensor:
        embed = self.llama_model.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        media = torch.from_numpy(np.ascontiguousarray(media_rows, dtype=np.float32)).to(device, dtype)
        chunks = [embed(torch.tensor(p, device=device)) if isinstance(p, list) else media[p[1]:p[2]] for p in parts]
        return torch.cat(chunks)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


def _cache_kwarg(llama, cache) -> dict:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); pass whichever this version takes."""
    names = inspect.signature(llama.forward).parameters
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}
