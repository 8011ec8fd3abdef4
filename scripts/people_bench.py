"""Cost per added face and per added source: the runtime on generated clips with 1, 2 and 4 drawn people, and
on two 2-person files at once, each run paced as a live source (windows dropped when behind, newest per person).

    python scripts/people_bench.py --artifacts /tmp/mid --out bench-results/people-mid.json

Prints a table and writes the JSON: per run, estimates/s in all and per person, per-person latency (p50 / p90
of publish time - window end), windows each person missed, and the encoder/LLM stage times per window. Each
several-people run goes twice: each person's window through its own encoder runs and llama_decode (the default),
and the windows that wait together (the people of a window, other sources) through one run per encoder branch
and one llama_decode (``runtime.encoders.batch_windows: 4``, ``runtime.llm.batch_windows: 4``, "people
batched"), side by side.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from edge_emollama.config import ControlConfig, EncoderConfig, LlmConfig, PublishConfig, RuntimeConfig, SourcesConfig
from edge_emollama.manifest import load_artifacts
from edge_emollama.runtime.clock import now_ns
from edge_emollama.runtime.pipeline import Pipeline
from edge_emollama.tools.sample_clip import write_group_clip

RUNS = (("1 person", (1,)), ("2 people", (2,)), ("4 people", (4,)), ("2 sources x 2 people", (2, 2)))


def run(artifacts, clips: list, seconds: float, batch: bool) -> dict:
    config = RuntimeConfig(artifacts=str(artifacts), sources=SourcesConfig(video=[str(c) for c in clips]),
                           encoders=EncoderConfig(batch_windows=4 if batch else 1),
                           llm=LlmConfig(batch_windows=4 if batch else 1),
                           publish=PublishConfig(endpoint="tcp://127.0.0.1:*"),
                           control=ControlConfig(endpoint="tcp://127.0.0.1:*"))
    seen = defaultdict(list)
    stage_ms = defaultdict(list)

    def on_estimate(_fused, item):
        seen[item.stamp.stream].append((now_ns() - item.t1_ns) / 1e6)
        for key in ("encoders_ms", "llm_ms"):
            stage_ms[key].append(item.stamp.timings_ms.get(key, 0.0))

    pipeline = Pipeline(config, load_artifacts(artifacts), on_estimate=on_estimate).start()
    started = now_ns()
    pipeline.wait(timeout_s=seconds + 60)
    elapsed = (now_ns() - started) / 1e9
    tracks = pipeline.publisher.tracker.snapshot()["tracks"]
    pipeline.close()
    pipeline.raise_errors()
    people = {f"{s}/{f}": v for (s, f), v in seen.items() if f is not None}
    latencies = sorted(x for v in people.values() for x in v)
    return {
        "people": len(people), "seconds": round(elapsed, 2),
        "estimates_per_s": round(sum(len(v) for v in people.values()) / elapsed, 3),
        "per_person_per_s": {k: round(len(v) / elapsed, 3) for k, v in people.items()},
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_p90": round(latencies[int(0.9 * (len(latencies) - 1))], 1) if latencies else None,
        "missed_windows": {f"{t['source']}/{t['face_id']}": t["missed_windows"] for t in tracks},
        "encoders_ms_p50": round(statistics.median(stage_ms["encoders_ms"]), 1) if stage_ms["encoders_ms"] else None,
        "llm_ms_p50": round(statistics.median(stage_ms["llm_ms"]), 1) if stage_ms["llm_ms"] else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--out", default="bench-results/people.json")
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    report = {"artifacts": args.artifacts, "preset": load_artifacts(args.artifacts).manifest.preset,
              "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "clip": f"{args.seconds:g} s, 640x360 at 15 fps, drawn people, paced as live", "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, groups in RUNS:
            clips = [write_group_clip(Path(folder) / f"g{len(groups)}-{k}-{n}.mp4", n, args.seconds, voice="synth",
                                      seed=k) for k, n in enumerate(groups)]
            for batch in (False, True) if max(groups) > 1 else (False,):
                report["runs"][name + (", people batched" if batch else "")] = run(args.artifacts, clips,
                                                                                  args.seconds, batch)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    base = report["runs"]["1 person"]["estimates_per_s"]
    print(f"{'run':<40} {'people':>6} {'est/s':>7} {'per person/s':>13} {'latency p50/p90 ms':>19} "
          f"{'enc ms':>7} {'llm ms':>7} {'vs 1':>5}")
    for name, r in report["runs"].items():
        per = statistics.mean(r["per_person_per_s"].values()) if r["per_person_per_s"] else 0.0
        print(f"{name:<40} {r['people']:>6} {r['estimates_per_s']:>7.2f} {per:>13.2f} "
              f"{str(r['latency_ms_p50']) + ' / ' + str(r['latency_ms_p90']):>19} {r['encoders_ms_p50']:>7} "
              f"{r['llm_ms_p50']:>7} {r['estimates_per_s'] / base if base else 0:>5.2f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
