"""LLaMA weights <-> GGUF: write a HF-named float32 state dict as a llama.cpp GGUF, and read one back.

The writer does what llama.cpp's ``convert_hf_to_gguf.py`` does for LLaMA (tensor renaming and the Q/K
row permutation that turns HF's rotate-half RoPE layout into llama.cpp's), without importing torch.
The reader dequantizes any GGUF type gguf-py knows and undoes the permutation, so a GGUF (for example
SmolLM2's) can be loaded into a transformers ``LlamaForCausalLM``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, OutputError
from ..lazy import require
from ..progress import Progress
from ..spec import LlamaSpec
from ..vocab import Vocab

__all__ = ["write_llama_gguf", "write_vocab_gguf", "read_llama_gguf", "read_gguf_vocab", "tensor_names", "FTYPES"]

FTYPES = ("f32", "f16")
METADATA_PREFIX = "edge_emollama."
_LAYER = {  # HF name inside model.layers.N -> llama.cpp name inside blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def tensor_names(spec: LlamaSpec) -> dict[str, str]:
    """HF name -> llama.cpp name of every tensor of a LLaMA with ``spec.layers`` blocks."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for n in range(spec.layers):
        for hf, cpp in _LAYER.items():
            names[f"model.layers.{n}.{hf}.weight"] = f"blk.{n}.{cpp}.weight"
    return names


def _shapes(spec: LlamaSpec, n_vocab: int) -> dict[str, tuple]:
    """HF name -> expected numpy shape ([out, in] for matrices)."""
    d, head = spec.hidden, spec.hidden // spec.heads
    q, kv = spec.heads * head, spec.kv_heads * head
    per_layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                 "self_attn.o_proj": (d, q), "mlp.gate_proj": (spec.ffn, d), "mlp.up_proj": (spec.ffn, d),
                 "mlp.down_proj": (d, spec.ffn), "input_layernorm": (d,), "post_attention_layernorm": (d,)}
    shapes = {"model.embed_tokens.weight": (n_vocab, d), "model.norm.weight": (d,), "lm_head.weight": (n_vocab, d)}
    for n in range(spec.layers):
        shapes.update({f"model.layers.{n}.{k}.weight": v for k, v in per_layer.items()})
    return shapes


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved order (convert_hf_to_gguf LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``_permute``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _n_head_for(hf_name: str, spec: LlamaSpec) -> int | None:
    """Heads to permute by: q_proj by heads, k_proj by kv_heads, anything else not at all."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return spec.heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return spec.kv_heads
    return None


def _check_state(state_dict: dict, spec: LlamaSpec, n_vocab: int) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen tensor."""
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads or (spec.hidden // spec.heads) % 2:
        raise ConfigError(f"LlamaSpec {spec}: hidden must split into an even head size and heads into kv_heads")
    if spec.vocab not in (0, n_vocab):
        raise ConfigError(f"LlamaSpec.vocab={spec.vocab} but the vocabulary has {n_vocab} tokens")
    shapes = _shapes(spec, n_vocab)
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    wrong = [f"{k}: {tuple(np.shape(v))} instead of {shapes[k]}" for k, v in state_dict.items()
             if k in shapes and tuple(np.shape(v)) != shapes[k]]
    problems = [f"{what} {items}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise CheckpointError("LLaMA weights do not match the architecture: " + "; ".join(problems))


def add_vocab_metadata(writer, vocab: Vocab) -> None:
    """Write ``vocab`` into an open gguf.GGUFWriter as a llama (SentencePiece) tokenizer."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def add_llama_hparams(writer, spec, n_vocab: int) -> None:
    """The ``llama.*`` hyper-parameters of ``spec`` (a LlamaSpec) into an open gguf.GGUFWriter."""
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_layer_norm_rms_eps(spec.eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.hidden // spec.heads)
    writer.add_vocab_size(n_vocab)


def write_vocab_gguf(vocab: Vocab, path: str | os.PathLike) -> Path:
    """A vocab-only GGUF that ``llama_cpp.Llama(path, vocab_only=True)`` loads (written atomically)."""
    gguf = require("gguf")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("edge-emollama vocabulary")
    # placeholder hyper-parameters: llama.cpp reads them even for vocab_only
    add_llama_hparams(writer, LlamaSpec(hidden=64, layers=1, heads=4, kv_heads=4, ffn=128, vocab=len(vocab)),
                      len(vocab))
    add_vocab_metadata(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _add_hparams(writer, spec: LlamaSpec, n_vocab: int, ftype: str) -> None:
    gguf = require("gguf")
    add_llama_hparams(writer, spec, n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if ftype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _add_metadata(writer, metadata: dict) -> None:
    """Every key under ``edge_emollama.``; str/bool/int/float as such, anything else as JSON text."""
    gguf = require("gguf")
    types = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.INT64,
             float: gguf.GGUFValueType.FLOAT64, str: gguf.GGUFValueType.STRING}
    for key, value in metadata.items():
        value = value.item() if isinstance(value, np.generic) else value
        vtype = types.get(type(value))
        if vtype is None:
            value, vtype = json.dumps(value, sort_keys=True, default=str), gguf.GGUFValueType.STRING
        writer.add_key_value(METADATA_PREFIX + str(key), value, vtype)


def no_bar(total, label: str, unit: str = "it") -> Progress:
    """A progress bar that shows nothing (the default of the writers' ``bar``)."""
    return Progress(total, label, unit, enabled=False)


class _Written:
    """Where the bytes of the tensors GGUFWriter writes are counted: ``bar`` (a Progress), once it is set."""

    def __init__(self):
        self.bar, self.total = None, 0

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


class _Reported(np.ndarray):
    """A tensor (a view, no copy) that counts its bytes when GGUFWriter writes it (``tofile``, once each)."""

    written = None   # the _Written of its file

    def tofile(self, fid, *args, **kwargs):
        np.asarray(self).tofile(fid, *args, **kwargs)
        if self.written is not None:
            self.written.update(self.nbytes)


def _reported(tensor: np.ndarray, written: _Written) -> np.ndarray:
    view = tensor.view(_Reported)
    view.written = written
    written.total += tensor.nbytes
    return view


def write_llama_gguf(path: str | os.PathLike, state_dict: dict, spec: LlamaSpec, vocab: Vocab,
                     metadata: dict, ftype: str = "f16", bar=no_bar) -> Path:
    """Write HF-named float32 LLaMA weights as a llama.cpp GGUF (norms f32, matrices ``ftype``), atomically.

    Tied embeddings (``lm_head.weight`` sharing memory with ``model.embed_tokens.weight``, as a tied HF
    model's state dict has them) are written once, without ``output.weight``, as llama.cpp expects.
    ``bar(total, label, unit)`` gives the progress bars: tensors converted, then bytes written.
    """
    gguf = require("gguf")
    if ftype not in FTYPES:
        raise ConfigError(f"unknown GGUF ftype '{ftype}': use one of {FTYPES} (quantize afterwards)")
    _check_state(state_dict, spec, len(vocab))
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(str(metadata.get("name", "edge-emollama llama")))
        _add_hparams(writer, spec, len(vocab), ftype)
        add_vocab_metadata(writer, vocab)
        _add_metadata(writer, metadata)
        tied = np.shares_memory(state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"])
        names = {hf: cpp for hf, cpp in tensor_names(spec).items() if not (tied and hf == "lm_head.weight")}
        written = _Written()
        with bar(len(names), "converting", "tensors") as converted:
            for hf, cpp in names.items():
                w = np.asarray(state_dict[hf], dtype=np.float32)
                n_head = _n_head_for(hf, spec)
                w = _permute(w, n_head) if n_head else w
                dtype = np.float16 if ftype == "f16" and w.ndim == 2 else np.float32
                writer.add_tensor(cpp, _reported(np.ascontiguousarray(w, dtype=dtype), written))
                converted.update(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        with bar(written.total, "writing", "B") as bytes_bar:
            written.bar = bytes_bar
            writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _field(reader, key: str, default=None):
    item = reader.fields.get(key)
    if item is None:
        if default is None:
            raise CheckpointError(f"{reader.data.filename}: GGUF key '{key}' missing; not a LLaMA GGUF")
        return default
    return item.contents()


def _short(value: float) -> float:
    """The shortest decimal that a stored float32 came from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _spec_from_reader(reader, n_vocab: int) -> LlamaSpec:
    """The LlamaSpec of an open GGUF (llama.* keys)."""
    if _field(reader, "general.architecture") != "llama":
        raise CheckpointError(f"{reader.data.filename} is a '{_field(reader, 'general.architecture')}' GGUF, "
                              "not 'llama'")
    heads = int(_field(reader, "llama.attention.head_count"))
    spec = LlamaSpec(hidden=int(_field(reader, "llama.embedding_length")),
                     layers=int(_field(reader, "llama.block_count")), heads=heads,
                     kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
                     ffn=int(_field(reader, "llama.feed_forward_length")), vocab=n_vocab,
                     eps=_short(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
                     rope_theta=_short(_field(reader, "llama.rope.freq_base", 10000.0)),
                     context=int(_field(reader, "llama.context_length")))
    rope_dims = int(_field(reader, "llama.rope.dimension_count", spec.hidden // heads))
    if rope_dims != spec.hidden // heads:
        raise CheckpointError(f"{reader.data.filename}: partial RoPE ({rope_dims} of {spec.hidden // heads} dims) "
                              "is not supported")
    return spec


def read_gguf_vocab(path: str | os.PathLike) -> Vocab:
    """The vocabulary of a GGUF file (e.g. LLaMA-2's vocab-only GGUF)."""
    return _vocab_from_reader(require("gguf").GGUFReader(str(path)))


def _vocab_from_reader(reader) -> Vocab:
    """The vocabulary of an open GGUF; scores default to 0 (BPE vocabularies have none)."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    return Vocab(tokens=list(tokens), scores=[float(s) for s in scores], types=[int(t) for t in types],
                 bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
                 eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
                 unk_id=int(_field(reader, "tokenizer.ggml.unknown_token_id", 0)))


def read_llama_gguf(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], LlamaSpec, Vocab]:
    """Dequantized float32 weights in HF names (Q/K permutation undone), the LlamaSpec and the Vocab.

    A GGUF without ``output.weight`` (tied embeddings) gets ``lm_head.weight`` = the token embeddings.
    """
    gguf = require("gguf")
    if not Path(path).is_file():
        raise CheckpointError(f"GGUF file {path} not found")
    reader = gguf.GGUFReader(str(path))
    vocab = _vocab_from_reader(reader)
    spec = _spec_from_reader(reader, len(vocab))
    to_hf = {cpp: hf for hf, cpp in tensor_names(spec).items()}
    unknown = sorted(t.name for t in reader.tensors if t.name not in to_hf)
    if unknown:
        raise CheckpointError(f"{path}: tensors this LLaMA reader does not know: {unknown}")
    state = {}
    for t in reader.tensors:
        hf = to_hf[t.name]
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # copy: detach from file
        n_head = _n_head_for(hf, spec)
        state[hf] = _unpermute(w, n_head) if n_head else w
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    _check_state(state, spec, len(vocab))
    return state, spec, vocab
