"""The recognition and reasoning prompts as token ids with the media block's place in them.

Both layouts of the original are here:
- ``inference`` (get_context_emb, the published results): the prompt text is split only at ``<VideoHere>``;
  the first segment is tokenized with BOS added although it also starts with a literal ``<s>`` (so the
  sequence starts with two BOS tokens, exactly as LlamaTokenizer(add_special_tokens=True) does), and all
  media rows go there. ``</video> <feature><FeatureHere></feature>`` stays in as ordinary text.
- ``training`` (prompt_wrap): one BOS, the EVA patch rows at ``<VideoHere>``, the 4 other rows at
  ``<FeatureHere>``.
"""
from __future__ import annotations

from .errors import ConfigError
from .spec import (FEATURE_PLACEHOLDER, LABELS, LAYOUTS, RECOGNITION_INSTRUCTION, REASON_INSTRUCTION,
                   VIDEO_PLACEHOLDER, ModelSpec, build_prompt)


def prompt_parts(tokenizer, spec: ModelSpec, subtitle: str, layout: str = "inference", task: str = "emotion") -> list:
    """Token-id lists and ``("media", start, stop)`` row ranges, in sequence order."""
    instruction = RECOGNITION_INSTRUCTION if task == "emotion" else REASON_INSTRUCTION
    text = build_prompt(_clean(subtitle), task=task, instruction=instruction)
    if layout == "inference":
        first, rest = text.split(VIDEO_PLACEHOLDER)
        return [tokenizer.tokenize(first, add_bos=True), ("media", 0, spec.media_rows),
                tokenizer.tokenize(rest, add_bos=False)]
    if layout == "training":
        text = text[len("<s>"):]
        first, rest = text.split(VIDEO_PLACEHOLDER)
        middle, last = rest.split(FEATURE_PLACEHOLDER)
        return [[tokenizer.bos_id] + tokenizer.tokenize(first, add_bos=False),
                ("media", 0, spec.patch_rows), tokenizer.tokenize(middle, add_bos=False),
                ("media", spec.patch_rows, spec.media_rows), tokenizer.tokenize(last, add_bos=False)]
    raise ConfigError(f"unknown prompt layout '{layout}': use one of {LAYOUTS}")


def label_pieces(tokenizer, labels=LABELS) -> list:
    """Each label's token ids as the model would write it after ``[/INST]`` (a leading space piece)."""
    pieces = [tokenizer.tokenize(label, add_bos=False, special=False) for label in labels]
    firsts = [p[0] for p in pieces]
    if len(set(firsts)) != len(firsts):
        raise ConfigError("two labels start with the same token; label scoring needs distinct first pieces")
    return pieces


def _clean(subtitle: str) -> str:
    """Subtitles are spoken text: strip placeholders a transcript could smuggle in."""
    text = " ".join(str(subtitle).split())
    for tag in (VIDEO_PLACEHOLDER, FEATURE_PLACEHOLDER):
        text = text.replace(tag, "")
    return text
