"""The reference path timed per window: eager PyTorch encoders + projectors, then the label by greedy
decoding as the original does (``generate``, ``do_sample=False``), batch 1."""
from __future__ import annotations

import time

import torch

from ..branches import window_feeds
from ..prompt import prompt_parts


@torch.no_grad()
def time_reference(reference, windows: list, subtitle: str, decode_tokens: int = 4) -> list:
    """Per window: {"encoders_ms", "llm_ms", "window_ms"}; ``windows`` are the runtime's WindowItems,
    preprocessed inside the timed span as the runtime's are."""
    parts = prompt_parts(reference.tokenizer, reference.spec, subtitle)
    device = next(reference.parameters()).device
    rows = []
    for window in windows:
        start = time.perf_counter()
        media = reference.media_block(window_feeds(window, reference.spec))
        _sync(device)
        encoded = time.perf_counter()
        embeds = reference._embed(parts, media)[None].to(device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        reference.llama_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                       max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False,
                                       pad_token_id=0)
        _sync(device)
        done = time.perf_counter()
        rows.append({"encoders_ms": (encoded - start) * 1e3, "llm_ms": (done - encoded) * 1e3,
                     "window_ms": (done - start) * 1e3})
    return rows


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
