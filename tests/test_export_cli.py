"""`edge-emollama export` end to end on the tiny preset: artifacts, parity report, manifest, atomicity."""
import json
import shutil

import pytest

from edge_emollama.cli import main
from edge_emollama.errors import ArtifactError
from edge_emollama.manifest import load_artifacts


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "tiny"
    assert main(["export", "--preset", "tiny", "--out", str(out), "--validate"]) == 0
    return out


def test_export_writes_every_format_and_a_verified_manifest(tiny_export):
    artifacts = load_artifacts(tiny_export)
    kinds = {(e.format, e.branch, e.precision, e.quant) for e in artifacts.manifest.artifacts}
    for branch in ("eva", "mae", "videomae", "hubert"):
        assert ("onnx", branch, "fp32", None) in kinds and ("onnx", branch, "fp16", None) in kinds
    assert {q for f, _, _, q in kinds if f == "gguf"} == {"F16", "Q8_0", "Q4_K_M"}
    manifest = artifacts.manifest
    assert manifest.labels[0] == "happy" and manifest.prompt.layout == "inference"
    assert manifest.media.rows == 8 and manifest.features.mae == "real"
    assert manifest.spec == artifacts.spec and manifest.spec.name == "tiny" and manifest.window.hop_s == 0.5
    assert "tensorrt" in manifest.skipped_formats and "pip install" in manifest.skipped_formats["tensorrt"]
    assert not list(tiny_export.parent.glob(".tiny.partial-*"))


def test_validation_report_meets_the_stated_tolerances(tiny_export):
    report = json.loads((tiny_export / "validation.json").read_text())
    assert len(report["encoders"]) == 8 and all(r["passed"] for r in report["encoders"])
    rows = {r["quant"]: r for r in report["llm"]}
    assert rows["F16"]["windows"] == 100 and rows["F16"]["top_label_agreement"] == 1.0
    assert rows["F16"]["decisive_windows"] >= 80   # the gates see most windows (near-ties: top two < 0.05 apart)
    assert rows["F16"]["kl_max"] < 1e-3
    assert rows["Q8_0"]["top_label_agreement"] >= 0.99
    assert "Q4_K_M" in rows


def test_tampered_artifact_is_refused(tiny_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    target = copy / "onnx" / "mae.onnx"
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="mae.onnx differs.*re-export"):
        load_artifacts(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a finished export"):
        load_artifacts(copy)


def test_verified_files_are_hashed_again_only_when_they_change(tiny_export, tmp_path, monkeypatch):
    from edge_emollama import manifest as artifacts

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    load_artifacts(copy)
    assert (copy / artifacts.VERIFIED).is_file()
    hashed, real = [], artifacts.sha256
    monkeypatch.setattr(artifacts, "sha256", lambda path, *a: hashed.append(path) or real(path, *a))
    load_artifacts(copy)
    assert hashed == []    # size and modification time as recorded: not hashed again (the full size is ~25 GB)
    target = copy / "onnx" / "mae.onnx"
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))   # same size, new content
    with pytest.raises(ArtifactError, match="mae.onnx differs.*re-export"):
        load_artifacts(copy)
    assert target in hashed


def test_failed_export_leaves_nothing_that_looks_finished(tmp_path, monkeypatch, capsys):
    from edge_emollama.export import formats

    def broken(ctx):
        raise OSError(28, "No space left on device")

    fmts = tuple(f if f.name != "gguf" else formats.ExportFormat(f.name, f.writes, f.needs, f.requires, broken,
                                                                  f.install) for f in formats.FORMATS)
    monkeypatch.setattr(formats, "FORMATS", fmts)
    out = tmp_path / "tiny"
    assert main(["export", "--preset", "tiny", "--out", str(out), "--formats", "onnx", "gguf"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_requests_get_one_clear_error(tmp_path, capsys):
    assert main(["export", "--preset", "tiny", "--out", str(tmp_path / "t"), "--formats", "tensorrt"]) == 2
    assert "pip install tensorrt" in capsys.readouterr().err
    assert main(["export", "--preset", "tinny", "--out", str(tmp_path / "t")]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err
    assert main(["export", "--preset", "emotion-llama", "--out", str(tmp_path / "e")]) == 2
    assert "--checkpoints" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--preset", "tiny", "--out", str(blocker / "sub"), "--formats", "onnx"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_too_little_disk_space_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from edge_emollama.export import pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "tiny"
    assert main(["export", "--preset", "tiny", "--out", str(out), "--formats", "onnx", "gguf"]) == 2
    assert "the export needs about" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_space_estimate_covers_the_full_size_formats(tmp_path):
    """The emotion-llama estimate (built on the meta device: no memory) for ONNX fp32 + fp16 and F16 + Q4_K_M:
    what the H200 export wrote (23.5 GB without Q4_K_M) plus Q4_K_M's ~4 GB, with margin, under a 64 GB disk."""
    import torch

    from edge_emollama.config import load_config
    from edge_emollama.export.context import ExportContext
    from edge_emollama.export.formats import plan
    from edge_emollama.export.pipeline import space_needed
    from edge_emollama.reference.model import EmotionLlamaReference
    from edge_emollama.spec import EMOTION_LLAMA
    from edge_emollama.export.gguf_writer import write_vocab_gguf
    from edge_emollama.vocab import LlamaTokenizer, tiny_vocab

    tokenizer = LlamaTokenizer(write_vocab_gguf(tiny_vocab(), tmp_path / "vocab.gguf"))
    with torch.device("meta"):
        reference = EmotionLlamaReference(EMOTION_LLAMA, tokenizer)
    cfg = load_config(overrides={"export.quant": ["Q4_K_M"]})
    formats, _ = plan(["onnx", "onnx-fp16", "gguf"])
    needed = space_needed(ExportContext(cfg, EMOTION_LLAMA, reference, None, None, None, {}), formats)
    assert 28e9 < needed < 45e9
    from edge_emollama.export.sources import reference_bytes

    assert reference_bytes(EMOTION_LLAMA) == 4 * sum(p.numel() for p in reference.parameters())   # ~35 GB


def test_an_export_removes_the_staging_folders_killed_exports_left(tmp_path, caplog):
    """Abandoned: the writer process recorded in the name is gone, or (no PID, older exports) nothing changed
    for a minute. Kept: a running writer's folder however old (a concurrent export), a recent one without PID."""
    import os
    import subprocess
    import sys
    import time

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    minutes_ago = time.time() - 120

    def staging(suffix: str, old: bool = False):
        folder = tmp_path / f".tiny.partial-{suffix}"
        (folder / "onnx").mkdir(parents=True)
        (folder / "onnx" / "eva.onnx").write_bytes(b"half written")
        if old:
            for path in (folder / "onnx" / "eva.onnx", folder / "onnx", folder):
                os.utime(path, (minutes_ago, minutes_ago))
        return folder

    dead_writer, old_without_pid = staging(f"{gone}-k1ll3d"), staging("a8x2_q", old=True)
    running_writer, recent_without_pid = staging(f"{os.getpid()}-busy", old=True), staging("zz91kq")
    other = tmp_path / ".tinier.partial-1-x"   # another output's folder
    other.mkdir()
    caplog.set_level("INFO", logger="edge_emollama.export")
    out = tmp_path / "tiny"
    assert main(["export", "--preset", "tiny", "--out", str(out), "--formats", "onnx"]) == 0
    assert not dead_writer.exists() and not old_without_pid.exists()
    assert running_writer.is_dir() and recent_without_pid.is_dir() and other.is_dir()
    assert f"process {gone}, is gone" in caplog.text and "untouched for 1" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".tinier.partial-1-x", running_writer.name, recent_without_pid.name, "tiny"])


@pytest.mark.parametrize("name, command", [
    ("emotion-llama", "export --preset emotion-llama --checkpoints DIR --out {root}"),
    ("Emotion_LLaMA-7b", "export --preset emotion-llama --checkpoints DIR --out {root}"),
    ("checkpoints", "export --preset emotion-llama --checkpoints {root}'"),
    ("tiny", "export --preset tiny --out {root}'"),
    ("bench-mid", "export --preset mid --out {root}'"),
])
def test_a_missing_artifact_folder_is_said_missing_with_the_export_its_name_calls_for(tmp_path, name, command):
    root = tmp_path / name
    with pytest.raises(ArtifactError) as info:
        load_artifacts(root)
    message = str(info.value)
    assert f"artifact folder {root} is missing (it does not exist)" in message
    assert command.format(root=root) in message
    if name != "tiny" and name != "bench-mid":
        assert "--preset tiny" not in message


def test_a_folder_of_another_name_gets_the_full_export_and_tiny_to_try(tmp_path):
    with pytest.raises(ArtifactError) as info:
        load_artifacts(tmp_path / "robot")
    message = str(info.value)
    assert "--preset emotion-llama --checkpoints DIR" in message and "--preset tiny" in message


def test_an_unexported_folder_gets_the_export_its_name_calls_for(tmp_path):
    (tmp_path / "emotion-llama").mkdir()
    with pytest.raises(ArtifactError, match="not a finished export") as info:
        load_artifacts(tmp_path / "emotion-llama")
    assert "--preset emotion-llama --checkpoints DIR" in str(info.value) and "--preset tiny" not in str(info.value)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(ArtifactError, match=r"not a finished export.*--preset tiny --out"):
        load_artifacts(tmp_path / "tiny")


def test_a_checkpoints_folder_given_as_artifacts_is_told_to_be_exported(tmp_path):
    folder = tmp_path / "weights"
    (folder / "Llama-2-7b-chat-hf").mkdir(parents=True)
    (folder / "eva_vit_g.pth").write_bytes(b"")
    with pytest.raises(ArtifactError, match="holds checkpoints, not an export") as info:
        load_artifacts(folder)
    assert f"edge-emollama export --preset emotion-llama --checkpoints {folder}'" in str(info.value)
