"""Loading the files a user has: every tensor accounted for, one clear error per problem."""
import numpy as np
import pytest
import torch

from edge_emollama.checkpoints import LORA_PREFIX, load_state
from edge_emollama.errors import CheckpointError
from edge_emollama.reference.loading import load_reference
from edge_emollama.reference.synthetic import build_random, write_checkpoints
from edge_emollama.spec import TINY


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_tok):
    folder = tmp_path_factory.mktemp("ckpt")
    return write_checkpoints(TINY, tiny_tok, folder, seed=5)


def test_files_load_to_the_same_model_with_lora_merged(written, tiny_tok):
    loaded = load_reference(TINY, written, tiny_tok).state_dict()
    expected = build_random(TINY, tiny_tok, seed=5).state_dict()
    assert loaded.keys() == expected.keys()
    worst = max((loaded[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst == 0.0
    base = torch.load(written.emotion_llama, weights_only=True)["model"]
    assert any(k.startswith(LORA_PREFIX) and k.endswith("q_proj.lora_A.weight") for k in base)


def _rewrite(written, tmp_path, edit):
    state = torch.load(written.emotion_llama, weights_only=True)
    edit(state["model"])
    path = tmp_path / "Emoation_LLaMA.pth"
    torch.save(state, path)
    return path


def test_renamed_lora_keys_are_listed_not_ignored(written, tmp_path, tiny_tok):
    def rename(model):
        key = f"{LORA_PREFIX}1.self_attn.v_proj.lora_B.weight"
        model[key.replace("lora_B", "lora_up")] = model.pop(key)
    written_copy = type(written)(**vars(written))
    written_copy.emotion_llama = _rewrite(written, tmp_path, rename)
    with pytest.raises(CheckpointError) as err:
        load_reference(TINY, written_copy, tiny_tok)
    text = str(err.value)
    assert "missing (1)" in text and "v_proj.lora_B.weight" in text
    assert "unexpected (1)" in text and "lora_up" in text


def test_wrong_shape_and_missing_projector_are_listed(written, tmp_path, tiny_tok):
    def damage(model):
        model["llama_proj.weight"] = torch.zeros(3, 3)
        del model["feats_llama_proj2.bias"]
    written_copy = type(written)(**vars(written))
    written_copy.emotion_llama = _rewrite(written, tmp_path, damage)
    with pytest.raises(CheckpointError, match=r"(?s)missing \(1\): feats_llama_proj2.bias.*wrong shape.*llama_proj"):
        load_reference(TINY, written_copy, tiny_tok)


def test_peft_default_adapter_names_are_accepted(written, tmp_path, tiny_tok):
    def rename_all(model):
        for key in [k for k in model if k.startswith(LORA_PREFIX)]:
            model[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = model.pop(key)
    written_copy = type(written)(**vars(written))
    written_copy.emotion_llama = _rewrite(written, tmp_path, rename_all)
    merged = load_reference(TINY, written_copy, tiny_tok).llama_model
    # the adapters under PEFT's names were merged: W = W_base + (alpha / r) B A, layer by layer
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(written.llama_dir), torch_dtype=torch.float32)
    state = torch.load(written.emotion_llama, weights_only=True)["model"]
    scale = TINY.lora.alpha / TINY.lora.r
    for layer in range(TINY.llama.layers):
        for target in ("q_proj", "v_proj"):
            stem = f"{LORA_PREFIX}{layer}.self_attn.{target}"
            a, b = state[f"{stem}.lora_A.weight"].double(), state[f"{stem}.lora_B.weight"].double()
            want = getattr(base.model.layers[layer].self_attn, target).weight.double() + scale * b @ a
            got = getattr(merged.model.layers[layer].self_attn, target).weight.double()
            assert scale * (b @ a).abs().max() > 1e-3        # the adapter changes the weight measurably
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_corrupt_and_missing_files_name_the_file_and_fix(written, tmp_path):
    broken = tmp_path / "eva_vit_g.pth"
    broken.write_bytes(written.eva.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"eva_vit_g.pth could not be read.*download it again"):
        load_state(broken, "EVA ViT-g")
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "absent.pth", "EVA ViT-g")


def test_missing_files_are_listed_together_with_the_fix(written, tiny_tok, tmp_path):
    paths = type(written)(**vars(written))
    paths.eva = tmp_path / "nope.pth"
    paths.hubert_dir = tmp_path / "no-hubert"
    with pytest.raises(CheckpointError, match=r"(?s)eva: .*nope.pth.*hubert_dir.*--checkpoints"):
        load_reference(TINY, paths, tiny_tok)


def test_zero_features_need_no_mae_or_videomae_files(written, tiny_tok, tmp_path):
    paths = type(written)(**vars(written))
    paths.mae = paths.videomae = tmp_path / "absent.pth"
    model = load_reference(TINY, paths, tiny_tok, zeros=("mae", "videomae"))
    assert np.isfinite(model.zero_rows()).all()


def test_videomae_pretraining_keys_are_declared_not_silently_dropped(written, tmp_path, tiny_tok):
    state = torch.load(written.videomae, weights_only=True)
    state["model"]["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
    path = tmp_path / "videomae.pth"
    torch.save(state, path)
    paths = type(written)(**vars(written))
    paths.videomae = path
    with pytest.raises(CheckpointError, match="unexpected.*relative_position_bias_table"):
        load_reference(TINY, paths, tiny_tok)
