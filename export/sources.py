"""Where the export's reference model comes from: a user's checkpoints, or seeded random weights."""
from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoints import CheckpointPaths
from ..config import Config
from ..errors import ConfigError
from ..spec import ModelSpec
from ..lazy import require
from ..vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, LlamaTokenizer, Vocab, tiny_vocab
from .gguf_writer import write_vocab_gguf


log = logging.getLogger(__name__)


def load_model(cfg: Config, spec: ModelSpec, staging: Path, random_weights: bool) -> tuple:
    """(reference, tokenizer, vocab, provenance) for the configured preset, on ``export.device``."""
    device = export_device(cfg.export.device, spec)
    reference, tokenizer, vocab, provenance = _load(cfg, spec, staging, random_weights, device)
    return reference.to(device), tokenizer, vocab, provenance


def reference_bytes(spec: ModelSpec) -> int:
    """The fp32 reference's parameter bytes (counted on the meta device: nothing is allocated)."""
    import torch

    from ..reference.model import EmotionLlamaReference

    with torch.device("meta"):
        return 4 * sum(p.numel() for p in EmotionLlamaReference(spec, None).parameters())


def export_device(device: str, spec: ModelSpec | None = None) -> str:
    """``auto``: CUDA when torch sees a GPU with room for the fp32 reference (the 7B checks take minutes per
    window on a CPU; the full-size reference needs ~36 GB), else the CPU. On CUDA, TF32 is switched off: the
    fp32 parity limit (1e-4) is below TF32's rounding."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and spec is not None:
            free, _ = torch.cuda.mem_get_info()
            needed = int(1.2 * reference_bytes(spec))
            if free < needed:
                log.warning("the GPU has %.1f GB free and the fp32 reference needs about %.1f GB: exporting on "
                            "the CPU (slow at full size; set export.device to choose)", free / 1e9, needed / 1e9)
                device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("export.device is cuda but torch sees no GPU: install a CUDA build of torch or use cpu")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def _load(cfg: Config, spec: ModelSpec, staging: Path, random_weights: bool, device: str) -> tuple:
    from ..reference.loading import load_reference
    from ..reference.synthetic import build_random

    zeros = cfg.model.features.zeros()
    if spec.tokenizer == "tiny" or random_weights:
        vocab = tiny_vocab() if spec.tokenizer == "tiny" else _random_vocab_for(spec)
        tokenizer = _tokenizer(vocab, staging)
        reference = build_random(spec, tokenizer, seed=cfg.export.seed, device=device)
        return reference, tokenizer, vocab, {"weights": "seeded random", "seed": cfg.export.seed,
                                             "drawn_on": device}
    paths = checkpoint_paths(cfg)
    vocab = vocab_from_sentencepiece(paths.llama_dir / "tokenizer.model")
    tokenizer = _tokenizer(vocab, staging)
    reference = load_reference(spec, paths, tokenizer, zeros=zeros)
    sources = {k: str(v) for k, v in vars(paths).items() if v is not None}
    return reference, tokenizer, vocab, {"weights": "user checkpoints", "checkpoints": sources}


def checkpoint_paths(cfg: Config) -> CheckpointPaths:
    c = cfg.export.checkpoints
    explicit = {k: getattr(c, k) for k in ("llama_dir", "emotion_llama", "eva", "hubert_dir", "mae", "videomae")}
    if c.folder is None and not all(v for k, v in explicit.items() if k not in ("mae", "videomae")):
        raise ConfigError("the emotion-llama preset needs checkpoints: pass --checkpoints DIR (standard file names, "
                          "docs/checkpoints.md) or set export.checkpoints.* in config.yaml; or --random-weights "
                          "to export random weights for speed measurements")
    return CheckpointPaths.in_folder(c.folder or ".", **explicit)


def _tokenizer(vocab, staging: Path) -> LlamaTokenizer:
    return LlamaTokenizer(write_vocab_gguf(vocab, staging / "vocab.gguf"))


def _random_vocab_for(spec: ModelSpec):
    """Random weights at full shape still need a 32000-entry vocabulary: the tiny pieces, padded."""
    vocab = tiny_vocab()
    pad = spec.llama.vocab - len(vocab)
    vocab.tokens += [f"<unused{i}>" for i in range(pad)]
    vocab.scores += [-1e9] * pad
    vocab.types += [5] * pad
    return vocab


def vocab_from_sentencepiece(path: str | os.PathLike) -> Vocab:
    """Read LLaMA-2's ``tokenizer.model`` the way llama.cpp's converter does."""
    spm = require("sentencepiece")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tokenizer file {path} not found: point --checkpoints at the Llama-2-7b-chat-hf "
                              "directory, which holds tokenizer.model")
    proc = spm.SentencePieceProcessor()
    proc.LoadFromFile(str(path))
    tokens, scores, types = [], [], []
    for i in range(proc.vocab_size()):
        tokens.append(proc.IdToPiece(i))
        scores.append(proc.GetScore(i))
        kind = NORMAL
        if proc.IsUnknown(i):
            kind = UNKNOWN
        elif proc.IsControl(i):
            kind = CONTROL
        elif proc.IsUnused(i):
            kind = UNUSED
        elif proc.IsByte(i):
            kind = BYTE
        types.append(kind)
    return Vocab(tokens, scores, types, bos_id=proc.bos_id(), eos_id=proc.eos_id(), unk_id=proc.unk_id())
