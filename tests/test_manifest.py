"""The manifest as a typed contract: read once, verified, obeyed by the runtime; damage is one clear error."""
import json
import logging
import os
import shutil

import pytest

from edge_emollama.config import WindowConfig
from edge_emollama.errors import ArtifactError
from edge_emollama.manifest import MANIFEST, VERIFIED, Manifest, load_artifacts
from edge_emollama.runtime.windows import WindowPlan
from edge_emollama.spec import TINY


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, folder)
    return folder


def _edit(folder, change):
    data = json.loads((folder / MANIFEST).read_text())
    data = change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_the_manifest_round_trips_through_its_json_form(tiny_artifacts):
    manifest = load_artifacts(tiny_artifacts).manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.spec == TINY and manifest.label_pieces and all(manifest.label_pieces)
    assert {a.format for a in manifest.artifacts} == {"face-detector", "onnx", "gguf"} and manifest.extra_files


@pytest.mark.parametrize("damage, named", [
    (lambda d: [], "holds list"),
    (lambda d: {k: v for k, v in d.items() if k != "window"}, "no 'window'"),
    (lambda d: {**d, "window": {**d["window"], "hop": d["window"].pop("hop_s")}}, "'window' is malformed"),
    (lambda d: {**d, "spec": {**d["spec"], "eva": "big"}}, "'spec' is malformed"),
    (lambda d: {**d, "label_pieces": [[]] * 9}, "'label_pieces' is malformed"),
    (lambda d: {**d, "version": 99}, "v99"),
])
def test_a_damaged_manifest_is_one_clear_error(copy, damage, named):
    _edit(copy, damage)
    with pytest.raises(ArtifactError, match=named) as info:
        load_artifacts(copy)
    assert "re-export" in str(info.value)


def test_a_missing_folder_is_said_to_be_missing(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifacts(tmp_path / "nowhere")


def test_content_edited_in_place_is_caught_even_with_its_times_reset(copy):
    load_artifacts(copy)                          # fills the verification cache
    target = copy / "onnx" / "eva.onnx"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF                 # same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))   # mtime as it was: only ctime moved
    with pytest.raises(ArtifactError, match="eva.onnx differs"):
        load_artifacts(copy)


def test_a_wrong_hash_in_the_manifest_is_caught_although_the_cache_vouches_for_the_file(copy):
    load_artifacts(copy)
    assert (copy / VERIFIED).is_file()

    def wrong(d):
        d["artifacts"][0]["sha256"] = "0" * 64
        return d
    _edit(copy, wrong)
    with pytest.raises(ArtifactError, match="differs from the file that was exported"):
        load_artifacts(copy)


def test_the_runtime_takes_its_window_from_the_manifest_and_logs_an_override(tiny_artifacts, caplog):
    manifest = load_artifacts(tiny_artifacts).manifest
    plan = WindowPlan.from_manifest(manifest)
    assert (plan.window_s, plan.hop_s, plan.frame_rule) == (manifest.window.window_s, manifest.window.hop_s,
                                                            manifest.window.eva_frame_rule)
    assert (plan.face_size, plan.videomae_frames, plan.sample_rate) == (TINY.mae.image_size, TINY.videomae.frames,
                                                                        TINY.hubert.sample_rate)
    with caplog.at_level(logging.WARNING):
        plan = WindowPlan.from_manifest(manifest, WindowConfig(hop_s=0.25))
    assert plan.hop_s == 0.25 and plan.window_s == manifest.window.window_s
    assert "runtime.windows.hop_s = 0.25 overrides the exported 0.5" in caplog.text


def test_a_runtime_value_that_contradicts_the_export_is_an_error_naming_both(tiny_artifacts):
    from edge_emollama.config import LlmConfig
    from edge_emollama.runtime.stages import LlmStage

    with pytest.raises(ArtifactError, match=r"(?s)quant.*Q4_K_M.*it has:.*gguf Q8_0"):
        LlmStage(load_artifacts(tiny_artifacts), LlmConfig(quant="Q4_K_M"))
