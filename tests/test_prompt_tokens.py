"""How the recognition prompt and the labels tokenize with LLaMA-2's real vocabulary."""
import hashlib
import re

import pytest

from edge_emollama.prompt import label_pieces, prompt_parts
from edge_emollama.spec import EMOTION_LLAMA, LABELS, TINY, build_prompt
from edge_emollama.export.gguf_writer import read_gguf_vocab
from edge_emollama.vocab import LlamaTokenizer, tiny_vocab


@pytest.fixture(scope="module")
def llama2(real_vocab):
    return LlamaTokenizer(real_vocab)


def test_prompt_text_is_exactly_the_originals():
    text = build_prompt("I am fine")
    assert text == ("<s>[INST] <video><VideoHere></video> <feature><FeatureHere></feature> The person in video "
                    "says: I am fine.  [emotion] Please determine which emotion label in the video represents: "
                    "happy, sad, neutral, angry, worried, surprise, fear, contempt, doubt.  [/INST]")


def test_recognition_prompt_starts_with_two_bos_then_inst(llama2):
    first, media, rest = prompt_parts(llama2, EMOTION_LLAMA, "I am fine")
    # LlamaTokenizer(add_special_tokens=True) adds BOS and also parses the literal "<s>": 1, 1.
    # "[INST]" is 518 25580 29962 in LLaMA-2 (the chat template's well-known ids).
    assert first[:5] == [1, 1, 518, 25580, 29962]
    assert [llama2.piece(t) for t in first[2:]] == [" [", "INST", "]", " <", "video", ">"]
    assert media == ("media", 0, 260)
    assert 1 not in rest and rest[-4:] == llama2.tokenize(" [/INST]", add_bos=False)[-4:]
    assert llama2.piece(rest[0]) == " </"   # the second segment gets SentencePiece's leading space


def test_label_pieces_with_the_real_vocabulary(llama2):
    pieces = label_pieces(llama2)
    text = {label: [llama2.piece(t) for t in p] for label, p in zip(LABELS, pieces)}
    assert text["worried"] == [" wor", "ried"] and text["contempt"] == [" cont", "empt"]
    assert all(len(p) == 1 for label, p in zip(LABELS, pieces) if label not in ("worried", "contempt"))
    assert len({p[0] for p in pieces}) == 9


def test_real_vocab_reads_as_32000_llama_pieces(real_vocab):
    vocab = read_gguf_vocab(real_vocab)
    assert len(vocab) == 32000 and vocab.tokens[1] == "<s>" and vocab.bos_id == 1


def test_real_vocab_copy_matches_its_readme_sha256(real_vocab):
    """The repository's copy is the file tests/data/README.md describes (the digest is read from the README)."""
    readme = (real_vocab.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(f"## {real_vocab.name}"):]
    documented = re.search(r"sha256: `([0-9a-f]{64})`", section).group(1)
    assert hashlib.sha256(real_vocab.read_bytes()).hexdigest() == documented


def test_tiny_vocabulary_mirrors_the_real_splits(tiny_tok):
    pieces = label_pieces(tiny_tok)
    text = {label: [tiny_tok.piece(t) for t in p] for label, p in zip(LABELS, pieces)}
    assert text["worried"] == [" wor", "ried"] and text["contempt"] == [" cont", "empt"]
    assert text["happy"] == [" happy"]
    assert len(tiny_vocab()) == TINY.llama.vocab


def test_tiny_tokenizer_round_trips_any_text(tiny_tok):
    text = "Ünïcode, digits 123 and words it knows: happy doubt"
    ids = tiny_tok.tokenize(text, add_bos=False, special=False)
    assert tiny_tok.decode(ids).strip() == text
