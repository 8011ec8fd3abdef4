"""The LLM stage on llama.cpp's low-level API: token and embedding batches, label scoring, greedy text.

A prompt is a list of parts, each a ``list[int]`` of token ids or a ``("media", start, stop)`` range of
rows of a float32 ``[R, n_embd]`` media block (fed as an embedding batch). The leading token-only parts
stay in the KV cache between calls; a call decodes only from the first token that differs.

``label_logprobs`` decodes a window in one ``llama_decode`` (docs/llm.md): every uncached prompt position goes
as an embedding row (token parts through :class:`TokenEmbeddings`, the model's own ``token_embd.weight``),
and each multi-piece label's continuation rides in the same batch in a branch sequence of its own.
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ConfigError, InputError, MissingDependencyError
from ..lazy import require
from ..scoring import log_softmax
from ..vocab import LlamaTokenizer, quiet_llama_cpp

__all__ = ["LlamaContext", "LlamaCppScorer", "TokenEmbeddings"]

log = logging.getLogger(__name__)

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}      # GGML_TYPE_* of the KV cache
TOKEN_ROWS_KEPT = 4096                          # dequantized token embedding rows cached per scorer
MAX_SEQUENCES = 64                              # llama.cpp's LLAMA_MAX_SEQ


class TokenEmbeddings:
    """Rows of a GGUF's ``token_embd.weight`` (the model's input embedding), dequantized on demand as
    llama.cpp's get_rows does, and cached by token id (the full float32 table of a 7B model is 524 MB)."""

    def __init__(self, gguf_path: str | os.PathLike, n_embd: int):
        self._gguf = require("gguf")
        self._reader = self._gguf.GGUFReader(str(gguf_path))   # memory-mapped; kept alive with the rows
        tensor = next((t for t in self._reader.tensors if t.name == "token_embd.weight"), None)
        if tensor is None:
            raise ArtifactError(f"{gguf_path} has no token_embd.weight tensor: re-export the GGUF")
        self._data, self._type = tensor.data, tensor.tensor_type
        self.n_embd = n_embd
        self._rows: dict[int, np.ndarray] = {}

    def rows(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), n_embd], a fresh array (the caller may keep it while llama.cpp reads it)."""
        missing = sorted({int(t) for t in ids} - self._rows.keys())
        if missing:
            if len(self._rows) + len(missing) > TOKEN_ROWS_KEPT:
                self._rows.clear()
            raw = np.array(self._data[missing])             # copied out of the memory map
            table = np.asarray(self._gguf.quants.dequantize(raw, self._type), dtype=np.float32)
            table = table.reshape(len(missing), -1)
            if table.shape[1] != self.n_embd:
                raise ArtifactError(f"token_embd.weight rows have {table.shape[1]} values, the model "
                                    f"{self.n_embd}: the GGUF is damaged; re-export it")
            self._rows.update((t, table[i].copy()) for i, t in enumerate(missing))
        if not ids:
            return np.empty((0, self.n_embd), np.float32)
        return np.stack([self._rows[int(t)] for t in ids])


class LlamaContext:
    """One llama.cpp model (or another context's) and context, with its token and embedding batches: the
    decode primitives and the vocabulary; :class:`LlamaCppScorer` builds prompts and scores on it.

    Sequence 0 holds the prompt; the others (``max_branches`` label branches for each of ``windows`` prompts)
    exist only during one label scoring (the KV cache is unified so that prompt cells can belong to all of
    them)."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, flash_attn: str = "auto", n_batch: int = 512, kv_type: str = "f16",
                 verbose: bool = False, share_model: "LlamaContext | None" = None, offload: bool = True,
                 max_branches: int = 8, windows: int = 1):
        """``share_model``: a second context on another scorer's weights (which must outlive this one).
        ``offload=False``: everything on the CPU, even in a GPU build (llama.cpp otherwise sends large
        batches of CPU-resident layers to the GPU); export validation uses it to check the weights alone.
        ``max_branches``: how many multi-piece labels ``label_logprobs`` can score in its one decode;
        ``windows``: how many media blocks ``label_logprobs_batch`` scores in one decode (at most
        ``MAX_SEQUENCES // (1 + max_branches)``)."""
        lc = self._lc = require("llama_cpp")
        self._model = self._ctx = None
        if flash_attn not in FLASH_ATTN or kv_type not in KV_TYPES:
            raise ConfigError(f"flash_attn='{flash_attn}', kv_type='{kv_type}': use one of {sorted(FLASH_ATTN)} "
                              f"and one of {sorted(KV_TYPES)}")
        quiet_llama_cpp(verbose)
        self._owns_model = share_model is None
        self._model = (self._load_model(gguf_path, n_gpu_layers if offload else 0) if share_model is None
                       else share_model._model)
        self.max_branches = max_branches
        self.n_seq_max = min(MAX_SEQUENCES, max(1, windows) * (1 + max_branches))
        cparams = self._context_params(n_ctx, n_threads, flash_attn, n_batch, kv_type)
        cparams.op_offload = cparams.offload_kqv = offload
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ArtifactError(f"llama.cpp could not create a context for {gguf_path} (n_ctx={n_ctx})")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.tokenizer = LlamaTokenizer.of_model(self._model)
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_embd = int(lc.llama_model_n_embd_inp(self._model))
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(lc.llama_n_ctx(self._ctx))
        self._n_batch = int(lc.llama_n_batch(self._ctx))
        self._tokens = self._new_batch(0)
        self._embeds = self._new_batch(self.n_embd)
        self._slot_seqs = {id(self._tokens): [(0,)] * self._n_batch, id(self._embeds): [(0,)] * self._n_batch}
        self._path = gguf_path
        self._calls = 0               # llama_decode calls made on this context

    def _load_model(self, gguf_path, n_gpu_layers: int):
        if not Path(gguf_path).is_file():
            raise ArtifactError(f"LLM file {gguf_path} not found: run the export first")
        self._lc.llama_backend_init()
        mparams = self._lc.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        model = self._lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not model:
            raise ArtifactError(f"llama.cpp could not load {gguf_path} (not a GGUF, or an unsupported one)")
        return model

    def _context_params(self, n_ctx: int, n_threads: int | None, flash_attn: str, n_batch: int, kv_type: str):
        params = self._lc.llama_context_default_params()
        threads = n_threads or max(1, min(8, os.cpu_count() or 1))
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_batch, n_ctx)
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True          # prompt cells shared by the label branches (one KV stream)
        params.n_outputs_max = max(params.n_batch, params.n_seq_max)   # llama.cpp reserves one per sequence
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.no_perf = True
        return params

    def _new_batch(self, embd: int):
        """A batch of n_batch slots, all in sequence 0; ``embd`` > 0 makes it an embedding batch."""
        batch = self._lc.llama_batch_init(self._n_batch, embd, 1 + self.max_branches)
        for i in range(self._n_batch):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        return batch

    # --- vocabulary -------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool, special: bool = True) -> list[int]:
        """Token ids of ``text`` (``special``: parse ``<s>`` etc. as control tokens)."""
        return self.tokenizer.tokenize(text, add_bos, special)

    def piece(self, token_id: int) -> str:
        return self.tokenizer.piece(token_id)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` as llama.cpp writes it (BOS/EOS dropped, SentencePiece's leading space removed)."""
        return self.tokenizer.decode(ids, keep_special=False)

    # --- decoding ---------------------------------------------------------------------------------

    def _decode_tokens(self, ids: list[int], pos: int, want_logits: bool) -> None:
        """Decode ``ids`` at positions pos.., in n_batch chunks; logits for the last one if asked."""
        for start in range(0, len(ids), self._n_batch):
            chunk = ids[start:start + self._n_batch]
            b = self._tokens
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.logits[i] = int(t), pos + start + i, 0
            last = start + len(chunk) == len(ids)
            b.logits[len(chunk) - 1] = int(want_logits and last)
            self._run(b, len(chunk))

    def _decode_rows(self, rows: np.ndarray, pos: int, want_logits: bool) -> None:
        """Decode float32 ``rows`` [n, n_embd] as an embedding batch at positions pos.."""
        for start in range(0, len(rows), self._n_batch):
            chunk = np.ascontiguousarray(rows[start:start + self._n_batch], dtype=np.float32)  # alive until decoded
            b = self._embeds
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                b.pos[i], b.logits[i] = pos + start + i, 0
                self._set_seqs(b, i, (0,))
            last = start + len(chunk) == len(rows)
            b.logits[len(chunk) - 1] = int(want_logits and last)
            self._run(b, len(chunk))
            del chunk

    def _set_seqs(self, batch, i: int, seqs: tuple) -> None:
        """Put slot ``i`` of ``batch`` in sequences ``seqs`` (written only when it changes)."""
        held = self._slot_seqs[id(batch)]
        if held[i] != seqs:
            batch.n_seq_id[i] = len(seqs)
            for k, s in enumerate(seqs):
                batch.seq_id[i][k] = s
            held[i] = seqs

    def _run(self, batch, n: int) -> None:
        batch.n_tokens = n
        self._calls += 1
        rc = self._lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise InputError(f"llama_decode failed with code {rc} ({n} positions; n_ctx={self.n_ctx})")

    def _logits(self, i: int) -> np.ndarray:
        """A copy of the logits of output ``i`` of the last decode (-1: the last one)."""
        ptr = self._lc.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        """Free the batches, context and model (idempotent)."""
        lc = self._lc
        if self._ctx:
            lc.llama_batch_free(self._tokens)
            lc.llama_batch_free(self._embeds)
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model and self._owns_model:
            lc.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> "LlamaContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class LlamaCppScorer(LlamaContext):
    """Label scoring and greedy generation on a :class:`LlamaContext`: the prompt prefix kept in the KV cache
    between calls, a window's labels scored in one ``llama_decode`` (docs/llm.md)."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 2048, **context):
        """``context``: :class:`LlamaContext`'s options (threads, GPU layers, flash attention, batch, KV type,
        share_model, offload, max_branches)."""
        super().__init__(gguf_path, n_ctx, **context)
        self._token_rows = None       # TokenEmbeddings, read on the first label_logprobs
        self._cached: list[int] = []  # leading token-only ids now in the KV cache (positions 0..len-1)
        self.n_past = 0               # positions of the last prompt in the cache
        self.reused = 0               # positions kept from the previous call by the last call
        self.decode_calls = 0         # llama_decode calls made by the last label_logprobs

    def _check(self, parts: list, media_rows: np.ndarray | None, extra: int) -> None:
        """InputError for malformed parts, media ranges outside the block, or a prompt beyond n_ctx."""
        total = 0
        for part in parts:
            if isinstance(part, tuple) and len(part) == 3 and part[0] == "media":
                _, start, stop = part
                if media_rows is None or media_rows.ndim != 2 or media_rows.shape[1] != self.n_embd:
                    raise InputError(f"media rows must be float32 [R, {self.n_embd}], got "
                                     f"{None if media_rows is None else media_rows.shape}")
                if not 0 <= start < stop <= len(media_rows):
                    raise InputError(f"media range {start}:{stop} outside the {len(media_rows)} media rows")
                total += stop - start
            elif isinstance(part, list) and all(0 <= int(t) < self.n_vocab for t in part):
                total += len(part)
            else:
                raise InputError(f"a prompt part must be token ids < {self.n_vocab} or ('media', start, stop), "
                                 f"not {part!r:.80}")
        if not parts or (isinstance(parts[-1], list) and not parts[-1]):
            raise InputError("the prompt must end with a non-empty part (its last position gives the logits)")
        if total + extra > self.n_ctx:
            raise InputError(f"prompt of {total} positions (+{extra}) does not fit n_ctx={self.n_ctx}")

    def _reuse_prefix(self, parts: list) -> tuple[list[int], int, list]:
        """Keep the cached leading tokens ``parts`` shares, drop the rest of the cache (every sequence):
        (the leading token ids, how many are kept, the parts still to decode)."""
        lead, n_lead = [], 0
        for part in parts:
            if not isinstance(part, list):
                break
            lead += [int(t) for t in part]
            n_lead += 1
        keep = 0
        for a, b in zip(lead, self._cached):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(lead) - 1 if n_lead == len(parts) else keep)  # always decode the last position
        self._cached = []
        if not self._lc.llama_memory_seq_rm(self._mem, -1, keep, -1):
            self._lc.llama_memory_clear(self._mem, True)
            keep = 0
        return lead, keep, ([lead[keep:]] + parts[n_lead:] if lead[keep:] else parts[n_lead:])

    def _prefill(self, parts: list, media_rows: np.ndarray | None, extra: int = 0) -> np.ndarray:
        """Decode ``parts`` reusing the cached leading tokens; the next-token logits after the last part."""
        media_rows = None if media_rows is None else np.asarray(media_rows)
        self._check(parts, media_rows, extra)
        lead, keep, rest = self._reuse_prefix(parts)
        pos = keep
        for i, part in enumerate(rest):
            last = i == len(rest) - 1
            if isinstance(part, list):
                self._decode_tokens(part, pos, last)
                pos += len(part)
            else:
                self._decode_rows(media_rows[part[1]:part[2]], pos, last)
                pos += part[2] - part[1]
        self._cached, self.n_past, self.reused = lead, pos, keep
        return self._logits(-1)

    # --- public -----------------------------------------------------------------------------------

    def next_logits(self, parts: list, media_rows: np.ndarray | None = None) -> np.ndarray:
        """The float32 next-token logits after the prompt (validation and debugging)."""
        return self._prefill(parts, media_rows)

    def label_logprobs(self, parts: list, media_rows: np.ndarray | None, label_pieces: list[list[int]]) -> np.ndarray:
        """Log sequence probability of each label's pieces after the prompt (float64, one per label), in one
        llama_decode when the uncached prompt plus the branches fit n_batch (``decode_calls`` says how many).

        The uncached prompt positions go as one embedding batch (token parts as their ``token_embd`` rows, the
        values llama.cpp's get_rows gives), in sequences 0..B; label k's pieces but the last follow in
        sequence k (1..B) at positions n.., so they attend to the prompt and themselves only. The branch
        sequences share the prompt's KV cells (a unified cache) and are removed afterwards. Without gguf-py
        (``pip install gguf``) it falls back to :meth:`label_logprobs_sequential`, with a warning."""
        self._check_labels(label_pieces)
        table = self._token_table()
        if table is None:
            return self.label_logprobs_sequential(parts, media_rows, label_pieces)
        branches = [list(p[:-1]) for p in label_pieces if len(p) > 1]
        if len(branches) > self.max_branches:
            raise InputError(f"{len(branches)} labels of several pieces need as many branch sequences; this "
                             f"scorer has {self.max_branches}: create it with max_branches={len(branches)}")
        media_rows = None if media_rows is None else np.asarray(media_rows)
        self._check(parts, media_rows, extra=sum(len(b) for b in branches))
        calls = self._calls
        lead, keep, rest = self._reuse_prefix(parts)
        prompt = np.concatenate([table.rows(p) if isinstance(p, list) else media_rows[p[1]:p[2]] for p in rest])
        logits = self._decode_branched(prompt.astype(np.float32, copy=False), keep, branches, table)
        self._cached, self.n_past, self.reused = lead, keep + len(prompt), keep
        self.decode_calls = self._calls - calls
        return self._chain(log_softmax(logits[0]), logits[1:], label_pieces)

    def _decode_branched(self, prompt: np.ndarray, pos: int, branches: list[list[int]], table) -> list:
        """Decode ``prompt`` rows at pos.. in sequences 0..B and branch k's rows at the positions after them in
        sequence k+1; the logits of the last prompt row, then of every branch row (branch order)."""
        n = pos + len(prompt)
        seqs = tuple(range(1 + len(branches)))
        rows = [prompt] + [table.rows(b) for b in branches]
        rows = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)   # alive until decoded
        positions = list(range(pos, n)) + [n + i for b in branches for i in range(len(b))]
        members = [seqs] * len(prompt) + [(k + 1,) for k, b in enumerate(branches) for _ in b]
        wanted = [len(prompt) - 1] + list(range(len(prompt), len(rows)))
        for s in seqs[1:]:
            self._lc.llama_memory_seq_cp(self._mem, 0, s, -1, -1)   # the kept prefix, shared cells
        try:
            return self._decode_rows_in(rows, positions, members, wanted)
        finally:
            for s in seqs[1:]:
                self._lc.llama_memory_seq_rm(self._mem, s, -1, -1)

    def _decode_rows_in(self, rows: np.ndarray, positions: list[int], members: list[tuple],
                        wanted: list[int]) -> list:
        """Decode embedding ``rows`` at ``positions`` in sequences ``members`` (n_batch rows a call); the
        logits of the rows in ``wanted``, read after the call that computed them."""
        out, want, b = {}, set(wanted), self._embeds
        for start in range(0, len(rows), self._n_batch):
            chunk = rows[start:start + self._n_batch]
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                b.pos[i], b.logits[i] = positions[start + i], int(start + i in want)
                self._set_seqs(b, i, members[start + i])
            self._run(b, len(chunk))
            out.update((j, self._logits(j - start)) for j in want if start <= j < start + len(chunk))
        return [out[j] for j in wanted]

    def label_logprobs_batch(self, parts: list, media_blocks: list, label_pieces: list[list[int]]) -> list:
        """:meth:`label_logprobs` for several media blocks after the same prompt (the people of a window, or
        windows of several streams), in one llama_decode when they fit n_batch: the cached prefix is shared,
        each block's prompt rows and label branches go in sequences of their own. Falls back to one
        :meth:`label_logprobs` per block when the sequences or the KV cells do not suffice (or gguf-py is
        missing)."""
        self._check_labels(label_pieces)
        table = self._token_table()
        branches = [list(p[:-1]) for p in label_pieces if len(p) > 1]
        per = 1 + len(branches)
        blocks = [np.asarray(b) for b in media_blocks]
        for block in blocks:
            self._check(parts, block, extra=sum(len(b) for b in branches))
        if len(blocks) > 1 and (table is None or len(branches) > self.max_branches or per * 2 > self.n_seq_max):
            return [self.label_logprobs(parts, block, label_pieces) for block in blocks]
        group = self.n_seq_max // per
        if len(blocks) > group:
            return [out for k in range(0, len(blocks), group)
                    for out in self.label_logprobs_batch(parts, blocks[k:k + group], label_pieces)]
        calls = self._calls
        lead, keep, rest = self._reuse_prefix(parts)
        prompts = [np.concatenate([table.rows(p) if isinstance(p, list) else block[p[1]:p[2]] for p in rest])
                   .astype(np.float32, copy=False) for block in blocks]
        cells = keep + len(blocks) * (len(prompts[0]) + sum(len(b) for b in branches))
        if cells > self.n_ctx:   # the KV cache cannot hold every person at once
            return [self.label_logprobs(parts, block, label_pieces) for block in blocks]
        logits = self._decode_batch(prompts, keep, branches, table)
        self._cached, self.n_past, self.reused = lead, keep + len(prompts[0]), keep
        self.decode_calls = self._calls - calls
        return [self._chain(log_softmax(person[0]), person[1:], label_pieces) for person in logits]

    def _decode_batch(self, prompts: list, pos: int, branches: list[list[int]], table) -> list:
        """Each prompt's rows at pos.. in its sequences p*(1+B)..p*(1+B)+B, its branch k in sequence
        p*(1+B)+1+k; per prompt, the logits of its last row then of its branch rows. Person 0's prompt stays
        in sequence 0 (the cache of the next call starts from its kept prefix)."""
        per, rows, positions, members, wanted = 1 + len(branches), [], [], [], []
        branch_rows = [table.rows(b) for b in branches]
        n = pos + len(prompts[0])
        for p, prompt in enumerate(prompts):
            base, start = p * per, sum(len(r) for r in rows)
            rows += [prompt] + branch_rows
            positions += list(range(pos, n)) + [n + i for b in branches for i in range(len(b))]
            members += [tuple(range(base, base + per))] * len(prompt)
            members += [(base + 1 + k,) for k, b in enumerate(branches) for _ in b]
            wanted.append([start + len(prompt) - 1] + list(range(start + len(prompt),
                                                                 start + len(prompt) + sum(map(len, branches)))))
        seqs = range(1, len(prompts) * per)
        for s in seqs:
            self._lc.llama_memory_seq_cp(self._mem, 0, s, -1, -1)   # the kept prefix, shared cells
        try:
            flat = self._decode_rows_in(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32), positions,
                                        members, [j for person in wanted for j in person])
        finally:
            for s in seqs:
                self._lc.llama_memory_seq_rm(self._mem, s, -1, -1)
        out, k = [], 0
        for person in wanted:
            out.append(flat[k:k + len(person)])
            k += len(person)
        return out

    @staticmethod
    def _chain(first: np.ndarray, branch_logits: list, label_pieces: list[list[int]]) -> np.ndarray:
        """Chain rule: first-piece log-probs after the prompt plus each later piece's after its branch row."""
        out, rows = np.empty(len(label_pieces), dtype=np.float64), iter(branch_logits)
        for k, pieces in enumerate(label_pieces):
            out[k] = first[pieces[0]]
            for nxt in pieces[1:]:
                out[k] += log_softmax(next(rows))[nxt]
        return out

    def _check_labels(self, label_pieces: list[list[int]]) -> None:
        if not label_pieces or any(not p or max(p) >= self.n_vocab or min(p) < 0 for p in label_pieces):
            raise InputError(f"every label needs at least one token piece, each < {self.n_vocab}")

    def _token_table(self) -> "TokenEmbeddings | None":
        """The model's token embedding rows; None (with one warning) when gguf-py is not installed."""
        if self._token_rows is None:
            try:
                self._token_rows = TokenEmbeddings(self._path, self.n_embd)
            except MissingDependencyError as exc:
                log.warning("label scoring falls back to one llama_decode per step (%s); install gguf-py "
                            "(pip install gguf) for one llama_decode per window", exc)
                self._token_rows = False
        return self._token_rows or None

    def label_logprobs_sequential(self, parts: list, media_rows: np.ndarray | None,
                                  label_pieces: list[list[int]]) -> np.ndarray:
        """The same log-probabilities the step-by-step way (the reference path): the prompt's token and
        embedding parts as separate decodes, then one decode per multi-piece label."""
        self._check_labels(label_pieces)
        calls = self._calls
        longest = max(len(p) for p in label_pieces)
        first = log_softmax(self._prefill(parts, media_rows, extra=longest - 1))
        out = np.empty(len(label_pieces), dtype=np.float64)
        for k, pieces in enumerate(label_pieces):
            out[k] = first[pieces[0]]
            if len(pieces) > 1:
                self._decode_all(pieces[:-1], self.n_past)
                for i, nxt in enumerate(pieces[1:]):
                    out[k] += log_softmax(self._logits(i))[nxt]
                self._lc.llama_memory_seq_rm(self._mem, 0, self.n_past, -1)
        self.decode_calls = self._calls - calls
        return out

    def _decode_all(self, ids: list[int], pos: int) -> None:
        """Decode a few tokens (< n_batch) with logits for every one of them."""
        b = self._tokens
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.logits[i] = int(t), pos + i, 1
        self._run(b, len(ids))

    def generate(self, parts: list, media_rows: np.ndarray | None, max_tokens: int, stop_on_eos: bool = True) -> str:
        """Greedy continuation of the prompt, up to ``max_tokens`` tokens, as text."""
        logits = self._prefill(parts, media_rows, extra=max_tokens)
        out: list[int] = []
        for step in range(max_tokens):
            token = int(np.argmax(logits))
            if stop_on_eos and self._lc.llama_vocab_is_eog(self._vocab, token):
                break
            out.append(token)
            if step + 1 < max_tokens:
                self._decode_tokens([token], self.n_past + step, True)
                logits = self._logits(-1)
        return self.detokenize(out)
