"""The vocabulary type, the tiny preset's built-in vocabulary, and llama.cpp's tokenizer over any GGUF's
vocabulary (the same tokenizer the runtime uses, so the reference and the runtime can never tokenize
differently). Reading LLaMA-2's ``tokenizer.model`` and writing vocabularies into GGUF files is the export's
(``export/gguf_writer.py``).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .lazy import require

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's word-start marker


@dataclass
class Vocab:
    tokens: list
    scores: list
    types: list
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


# Words the tiny vocabulary knows whole: the prompt, the labels, and everyday speech for sample clips.
_TINY_TEXT = (
    "[INST] <video></video> <feature></feature> The person in video says: . [/INST] [emotion] [reason] "
    "Please determine which emotion label the represents: happy, sad, neutral, angry, surprise, fear, doubt. "
    "analyze all clues and reason out emotional of "
    "i you he she it we they am is are was were be been have has had do does did not no yes a an to "
    "for on at by with from this that what when where why how so but or if then than very really just "
    "hello hi good great bad well today day time people know think feel want like love hate can will "
    "would could should really sorry thank thanks please okay oh wow what's don't can't i'm it's "
    "face voice smile frown tone facial expression expressions vocal looks sounds because seems"
)
# LLaMA-2 splits these two labels into two pieces; the tiny vocabulary does the same on purpose,
# so that the multi-piece path of label scoring runs in every test.
_SPLIT_WORDS = {"worried": ("wor", "ried"), "contempt": ("cont", "empt")}


def _prefixes(word: str) -> list:
    return [word[:i] for i in range(2, len(word) + 1)]


def tiny_vocab() -> Vocab:
    """The tiny preset's vocabulary: SentencePiece-style pieces with byte fallback, built in code."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces = [SPACE] + [chr(c) for c in range(33, 127)]
    for word in re.findall(r"[\w']+|[^\w\s]+", _TINY_TEXT):
        pieces += _prefixes(SPACE + word) + _prefixes(word)
    for first, rest in _SPLIT_WORDS.values():
        pieces += _prefixes(SPACE + first) + _prefixes(rest)
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(NORMAL)
    # Longer pieces score higher, so merges run to the longest known piece (ties: earlier piece wins).
    scores = [0.0] * 259 + [len(t) - i * 1e-6 for i, t in enumerate(tokens[259:])]
    return Vocab(tokens=tokens, scores=scores, types=types)


def quiet_llama_cpp(verbose: bool = False) -> None:
    """llama-cpp-python routes llama.cpp's log through its own module-level callback and this logger
    (no Python callback of ours: one that gets collected crashes the process). Its level table predates
    ggml's current numbering (warnings arrive as ERROR), so quiet means CRITICAL; our own errors say
    what failed."""
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


class LlamaTokenizer:
    """llama.cpp's tokenizer: the runtime's and the reference's, so the two never tokenize differently.

    ``LlamaTokenizer(path)`` loads only the vocabulary of a GGUF (no weights, no context);
    ``LlamaTokenizer.of_model(model)`` uses the vocabulary of a model already loaded by llama.cpp."""

    def __init__(self, gguf_path: str | os.PathLike | None = None, *, _model=None):
        self._lc = require("llama_cpp")
        quiet_llama_cpp()
        self._owned = None
        if _model is None:
            if not Path(gguf_path).is_file():
                raise CheckpointError(f"vocabulary file {gguf_path} not found")
            params = self._lc.llama_model_default_params()
            params.vocab_only = True
            _model = self._owned = self._lc.llama_model_load_from_file(str(gguf_path).encode(), params)
            if not _model:
                raise CheckpointError(f"llama.cpp could not read the vocabulary of {gguf_path}: not a LLaMA GGUF")
        self.path = None if gguf_path is None else Path(gguf_path)
        self._vocab = self._lc.llama_model_get_vocab(_model)

    @classmethod
    def of_model(cls, model) -> "LlamaTokenizer":
        return cls(_model=model)

    def tokenize(self, text: str, add_bos: bool, special: bool = True) -> list:
        """Token ids of ``text`` (``special``: parse ``<s>`` etc. as control tokens)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self._lc.llama_token * size)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def piece(self, token_id: int) -> str:
        """The text of one token (control tokens rendered, invalid UTF-8 replaced)."""
        return self._text(lambda buf, size: self._lc.llama_token_to_piece(self._vocab, int(token_id), buf, size,
                                                                           0, True))

    def decode(self, ids: list, keep_special: bool = True) -> str:
        """Text of ``ids``; ``keep_special=False`` drops BOS/EOS and SentencePiece's leading space."""
        arr = (self._lc.llama_token * max(1, len(ids)))(*[int(t) for t in ids])
        return self._text(lambda buf, size: self._lc.llama_detokenize(self._vocab, arr, len(ids), buf, size,
                                                                       not keep_special, keep_special))

    @staticmethod
    def _text(fill) -> str:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = fill(buf, size)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n

    @property
    def n_vocab(self) -> int:
        return int(self._lc.llama_vocab_n_tokens(self._vocab))

    @property
    def bos_id(self) -> int:
        return int(self._lc.llama_vocab_bos(self._vocab))

    @property
    def eos_id(self) -> int:
        return int(self._lc.llama_vocab_eos(self._vocab))

    def close(self) -> None:
        if self._owned is not None:
            self._lc.llama_model_free(self._owned)
            self._owned = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
