"""`edge-emollama bench`: the figures it reports hang together, the runtime's labels match the reference's on
the timed windows, and a failing optional section is reported without losing the others."""
import json

import pytest

from edge_emollama.cli import main
from edge_emollama.config import LlmConfig, RuntimeConfig
from edge_emollama.tools import bench
from edge_emollama.tools.bench import BenchOptions, run_bench


def test_bench_figures_hang_together_and_the_labels_match_the_reference(tiny_artifacts, tmp_path):
    progress = tmp_path / "bench.json"
    runtime = RuntimeConfig(artifacts=str(tiny_artifacts), llm=LlmConfig(quant="F16"))   # the F16 tolerance below
    report = run_bench(BenchOptions(runtime, windows=4, reference=True,
                                    clip=False, progress=str(progress)))
    assert report["errors"] == {}
    latency = report["stage_latency_ms"]
    assert latency["window"]["n"] == 4 and latency["window"]["p95"] >= latency["window"]["p50"] > 0
    assert latency["window"]["p50"] >= latency["llm"]["p50"]
    assert set(report["llm_by_quant_ms"]) == {"F16", "Q8_0"}
    assert report["pipelined"]["published"] == 4 and report["pipelined"]["estimates_per_s"] > 0
    assert report["paced"]["handoff_to_publish_ms"]["n"] == 4
    assert report["runtime"]["encoder_providers"] == {b: "CPUExecutionProvider"
                                                      for b in ("eva", "mae", "videomae", "hubert")}
    agreement = report["reference"]["runtime_vs_reference"]
    assert agreement["windows"] == 4 and agreement["top_label_agreement"] == 1.0 and agreement["kl_max"] < 1e-3
    ratios = report["ratios"]
    assert ratios["throughput_x"] == report["pipelined"]["estimates_per_s"] / report["reference"]["estimates_per_s"]
    assert json.loads(progress.read_text())["complete"] is False   # written after each section, before the end


def test_a_failing_section_is_reported_and_the_other_figures_kept(tiny_artifacts, tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("no such GGUF on this device")

    monkeypatch.setattr(bench, "quant_latency", broken)
    out = tmp_path / "bench.json"
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--windows", "3", "--no-clip", "--json", str(out)]) == 1
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["pipelined"]["published"] == 3
    assert saved["errors"] == {"llm_by_quant_ms": "RuntimeError: no such GGUF on this device"}
    assert "FAILED llm_by_quant_ms: RuntimeError: no such GGUF on this device" in capsys.readouterr().out


def test_the_streams_sweep_scores_each_count_both_ways(tiny_artifacts, capsys):
    report = run_bench(BenchOptions(RuntimeConfig(artifacts=str(tiny_artifacts)), windows=2, clip=False,
                                    streams=(1, 3)))
    assert report["errors"] == {} and [row["streams"] for row in report["streams"]] == [1, 3]
    for row in report["streams"]:
        assert row["batched_decode_calls"] == 1   # the tiny prompt of 3 windows fits one batch
        assert row["estimates_per_s"] == row["streams"] * 1000 / (row["encoders_ms"] + row["llm_one_each_ms"])
        assert row["estimates_per_s_batched"] == row["streams"] * 1000 / (row["encoders_batched_ms"]
                                                                          + row["llm_batched_ms"])
        assert row["estimates_per_s_overlapped"] >= row["estimates_per_s"] > 0
    with pytest.raises(SystemExit) as refused:   # argparse: exit 2 with the message
        main(["bench", "--artifacts", str(tiny_artifacts), "--streams", "0,2"])
    assert refused.value.code == 2 and "stream counts from 1 to 16" in capsys.readouterr().err
