"""The PyTorch reference reproduces Emotion-LLaMA's inference path (shapes, order, label scoring)."""
import numpy as np
import pytest
import torch

from edge_emollama.branches import BRANCHES, MAE
from edge_emollama.prompt import label_pieces, prompt_parts
from edge_emollama.reference.vit import resize_pos_embed
from edge_emollama.spec import EMOTION_LLAMA, TINY


def _inputs(rng, frames=5, seconds=1.2):
    """Every branch's feed ({branch: {input: array}}), drawn fresh."""
    return {name: b.example_inputs(TINY, rng, frames=frames, seconds=seconds) for name, b in BRANCHES.items()}


def test_real_shapes_match_the_paper():
    assert EMOTION_LLAMA.patch_rows == 256 and EMOTION_LLAMA.media_rows == 260
    assert EMOTION_LLAMA.eva.num_patches == 1024 and EMOTION_LLAMA.videomae.num_patches == 1568
    assert EMOTION_LLAMA.eva.mlp_dim == int(1408 * 4.3637) and EMOTION_LLAMA.lora.scale == 0.25


def test_media_block_order_and_patch_grouping(tiny_reference):
    rng = np.random.default_rng()
    inputs = _inputs(rng)
    ref = tiny_reference
    rows = ref.media_block(inputs)
    assert rows.shape == (TINY.media_rows, TINY.llama.hidden)
    with torch.no_grad():
        embeds = ref.ln_vision(ref.visual_encoder(torch.from_numpy(inputs["eva"]["pixels"])))[0]
        patches = embeds[1:]
        group = torch.cat([patches[4 * 1 + i] for i in range(4)])   # the second group of 4 consecutive patches
        np.testing.assert_allclose(rows[1], ref.llama_proj(group).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rows[-1], ref.cls_tk_llama_proj(embeds[0]).numpy(), rtol=1e-5, atol=1e-5)
        face = ref.feats_llama_proj1(ref.face_encoder(torch.from_numpy(inputs["mae"]["faces"])).mean(0))
        np.testing.assert_allclose(rows[TINY.patch_rows], face.numpy(), rtol=1e-5, atol=1e-5)


def test_zero_features_feed_the_projector_bias(tiny_reference):
    rows = tiny_reference.media_block(_inputs(np.random.default_rng()), zeros=("mae", "videomae", "hubert"))
    start = TINY.patch_rows
    np.testing.assert_allclose(rows[start], tiny_reference.feats_llama_proj1.bias.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(rows[start + 2], tiny_reference.feats_llama_proj3.bias.detach().numpy(), rtol=1e-6)
    absent = tiny_reference.media_block({"eva": _inputs(np.random.default_rng())["eva"]})   # no face, no audio
    np.testing.assert_allclose(absent[start:start + 3], tiny_reference.zero_rows(), rtol=1e-6)


def test_face_branch_averages_over_any_number_of_frames(tiny_reference):
    rng = np.random.default_rng()
    faces = torch.from_numpy(MAE.example_inputs(TINY, rng, frames=6)["faces"])
    unit = tiny_reference.branches()["mae"]
    with torch.no_grad():
        whole = unit(faces)
        halves = (unit(faces[:3]) + unit(faces[3:])) / 2   # projector is affine, so means commute
    torch.testing.assert_close(whole, halves, rtol=1e-4, atol=1e-5)


def test_pos_embed_resize_keeps_cls_and_is_identity_at_same_grid():
    table = torch.randn(1, 17, 8)
    assert torch.equal(resize_pos_embed(table, 4), table)
    bigger = resize_pos_embed(table, 8)
    assert bigger.shape == (1, 65, 8) and torch.equal(bigger[:, :1], table[:, :1])


def test_label_distribution_sums_to_one_and_multi_piece_labels_are_exact(tiny_reference, tiny_tok):
    rng = np.random.default_rng()
    rows = tiny_reference.media_block(_inputs(rng))
    logprobs = tiny_reference.label_logprobs(rows, "i really think so")
    probs = np.exp(logprobs - logprobs.max())
    probs /= probs.sum()
    assert abs(tiny_reference.label_distribution(rows, "i really think so").sum() - 1) < 1e-12
    # brute force: run the whole sequence + label pieces without a cache, chain-rule the pieces
    parts = prompt_parts(tiny_tok, TINY, "i really think so")
    prefix = tiny_reference._embed(parts, rows)
    embed = tiny_reference.llama_model.get_input_embeddings()
    for label, pieces in enumerate(label_pieces(tiny_tok)):
        seq = torch.cat([prefix, embed(torch.tensor(pieces[:-1]))]) if len(pieces) > 1 else prefix
        with torch.no_grad():
            logits = tiny_reference.llama_model(inputs_embeds=seq[None]).logits[0].double()
        steps = torch.log_softmax(logits[-len(pieces):], dim=-1)
        brute = sum(steps[i, p].item() for i, p in enumerate(pieces))
        assert abs(brute - logprobs[label]) < 1e-4
    assert max(len(p) for p in label_pieces(tiny_tok)) == 2


def test_label_choice_depends_on_the_media(tiny_reference):
    rng = np.random.default_rng(1)
    tops = {int(np.argmax(tiny_reference.label_distribution(tiny_reference.media_block(_inputs(rng)), "hello")))
            for _ in range(12)}
    assert len(tops) >= 2, "random windows should not all give the same label (weights too flat)"


def test_training_layout_splits_at_both_placeholders(tiny_tok):
    parts = prompt_parts(tiny_tok, TINY, "hello", layout="training")
    media = [p for p in parts if not isinstance(p, list)]
    assert media == [("media", 0, TINY.patch_rows), ("media", TINY.patch_rows, TINY.media_rows)]
    assert parts[0][0] == tiny_tok.bos_id and parts[0][1] != tiny_tok.bos_id
    inference = prompt_parts(tiny_tok, TINY, "hello")
    assert inference[0][:2] == [tiny_tok.bos_id, tiny_tok.bos_id]
    with pytest.raises(Exception, match="layout"):
        prompt_parts(tiny_tok, TINY, "hello", layout="other")


def test_videomae_row_is_the_mean_of_the_last_block_without_a_final_norm(tiny_reference):
    """The extraction's VideoMAE (vit_large_patch16_224(), use_mean_pooling=True: norm is an Identity, fc_norm
    never applied): the feature is the plain mean of the last block's tokens. Recomputed here block by block."""
    ref = tiny_reference
    clip = torch.from_numpy(BRANCHES["videomae"].example_inputs(TINY, np.random.default_rng())["clip"])
    with torch.no_grad():
        video = ref.video_encoder
        tokens = video.patch_embed.proj(clip).flatten(2).transpose(1, 2) + video.pos_embed
        for block in video.blocks:
            tokens = block(tokens)
        want = ref.feats_llama_proj2(tokens.mean(dim=1))
        got = ref.branches()["videomae"](clip)[:, 0]
    assert not hasattr(video, "norm") and tokens.shape[1] == TINY.videomae.num_patches
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
