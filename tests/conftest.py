"""Shared fixtures: tiny models with seeded random weights, files written in the original formats."""
from __future__ import annotations

from pathlib import Path

import pytest

REAL_VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def real_vocab() -> Path:
    """LLaMA-2's real vocabulary (vocab-only GGUF) from the project's shared data, if this checkout has it."""
    for candidate in (REAL_VOCAB, Path(__file__).resolve().parents[1] / "shared" / "data" / REAL_VOCAB.name):
        if candidate.is_file():
            return candidate
    pytest.skip(f"LLaMA-2 vocabulary not found at {REAL_VOCAB} (it ships in the project's shared/data)")


@pytest.fixture(scope="session")
def tiny_tok():
    from edge_emollama.vocab import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_reference(tiny_tok):
    from edge_emollama.reference.synthetic import build_random
    from edge_emollama.spec import TINY

    return build_random(TINY, tiny_tok, seed=11)
