"""Two exports' encoders side by side (CPU by default): time per branch and how far their outputs differ.

    python scripts/encoder_compare.py /tmp/mid /tmp/mid-fused --out bench-results/encoders-fused-mid.json
    python scripts/encoder_compare.py /tmp/mid --variants plain,io_binding,cuda_graphs,batch4 \
        --provider CUDAExecutionProvider --out bench-results/encoder-variants.json

With ``--variants``, one export's encoders run in several ways (runtime/binding.py), the variants alternating,
each against the plain run's outputs: ``plain`` (session.run), ``io_binding``, ``cuda_graphs`` (CUDA provider
only: skipped with a note elsewhere) and ``batch4`` (EVA, VideoMAE and HuBERT with 4 windows in one run, where the file
has a batch axis; its ms per window is the run's / 4).

Both folders must be exports of the same preset and seed (the same weights), e.g. before and after a change to
the export form. Each branch runs on the same fresh random input (window shapes: 16 face frames, 4 s of
audio), the two sessions alternating, ``--runs`` times each after a warm-up; prints p50 ms per branch and the
ratio, and the largest output difference relative to the outputs' scale.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_emollama.branches import BRANCHES
from edge_emollama.manifest import load_artifacts
from edge_emollama.runtime.binding import BoundRunner, GraphRunner, PlainRunner

VARIANTS = ("plain", "io_binding", "cuda_graphs", "batch4")
BATCH = 4
BATCHED = tuple(name for name, b in BRANCHES.items() if b.batched)   # batch4: branches with a batch axis
WARMUP = 3                      # runs per variant before timing (a CUDA graph is captured in its second)


def session(artifacts, branch: str, precision: str, threads: int, provider: str, cuda_graphs: bool = False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    path = artifacts.path(format="onnx", branch=branch, precision=precision)
    first = (provider, {"enable_cuda_graph": "1"}) if cuda_graphs else provider
    fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=[first, *fallback])


def timed(run, feed: dict) -> tuple:
    """(ms, outputs) of ``run(feed)``."""
    start = time.perf_counter()
    out = run(feed)
    return (time.perf_counter() - start) * 1000, out


def relative_diff(outputs: list, reference: list) -> float:
    """max |output - reference| / max |reference| over all outputs (flattened: a batch of windows compares with
    the windows' outputs one after another)."""
    got = np.concatenate([np.asarray(o, np.float64).ravel() for o in outputs])
    want = np.concatenate([np.asarray(o, np.float64).ravel() for o in reference])
    if got.shape != want.shape:
        raise ValueError(f"{got.size} output values against {want.size} of the reference")
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    return diff / scale if scale else diff


def variant_jobs(artifacts, name: str, args, variants: list) -> tuple:
    """({variant: (run, feed, reference outputs, windows per run)}, {variant: note of why it is skipped})."""
    branch, rng = BRANCHES[name], np.random.default_rng()
    plain_session = session(artifacts, name, args.precision, args.threads, args.provider)
    plain = PlainRunner(plain_session)
    feed = branch.example_inputs(artifacts.spec, rng, frames=16, seconds=4.0)
    reference = plain.run(feed)
    jobs, skipped = {}, {}
    for variant in variants:
        if variant == "plain":
            jobs[variant] = (plain.run, feed, reference, 1)
        elif variant == "io_binding":
            jobs[variant] = (BoundRunner(plain_session).run, feed, reference, 1)
        elif variant == "cuda_graphs":
            if args.provider != "CUDAExecutionProvider":
                skipped[variant] = f"CUDA graphs need --provider CUDAExecutionProvider (not {args.provider})"
                continue
            graphs = session(artifacts, name, args.precision, args.threads, args.provider, cuda_graphs=True)
            jobs[variant] = (GraphRunner(graphs, name).run, feed, reference, 1)
        elif variant == "batch4":
            if name not in BATCHED:
                skipped[variant] = f"batch4 is for {', '.join(BATCHED)} (MAE's frames axis is its batch)"
            else:
                windows = [branch.example_inputs(artifacts.spec, rng, frames=16, seconds=4.0) for _ in range(BATCH)]
                batch = {key: np.concatenate([w[key] for w in windows]) for key in feed}
                expected = [np.concatenate(parts) for parts in zip(*(plain.run(w) for w in windows))]
                jobs[variant] = (plain.run, batch, expected, BATCH)
    return jobs, skipped


def timed_runs(jobs: dict, runs: int) -> tuple:
    """({variant: [ms]}, {variant: outputs of its last warm-up}) with the variants alternating."""
    outputs = {}
    for variant, (run, feed, _, _) in jobs.items():
        for _ in range(WARMUP):
            outputs[variant] = run(feed)
    times = {variant: [] for variant in jobs}
    for _ in range(runs):
        for variant, (run, feed, _, _) in jobs.items():
            times[variant].append(timed(run, feed)[0])
    return times, outputs


def branch_variants(artifacts, name: str, args, variants: list) -> dict:
    jobs, skipped = variant_jobs(artifacts, name, args, variants)
    times, outputs = timed_runs(jobs, args.runs)
    report = {variant: {"skipped": note} for variant, note in skipped.items()}
    plain_ms = statistics.median(times["plain"]) if "plain" in times else None
    for variant, (_, _, reference, windows) in jobs.items():
        p50 = statistics.median(times[variant])
        entry = {"p50_ms": round(p50, 3), "windows_per_run": windows, "ms_per_window": round(p50 / windows, 3),
                 "relative_diff_to_plain": relative_diff(outputs[variant], reference)}
        if plain_ms:
            entry["speedup_per_window"] = round(plain_ms / (p50 / windows), 3)
        report[variant] = entry
    return {variant: report[variant] for variant in variants}


def compare_variants(args) -> None:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: {unknown} unknown; use some of {','.join(VARIANTS)}")
    art = load_artifacts(args.before)
    report = {"export": args.before, "precision": args.precision, "runs": args.runs, "threads": args.threads,
              "provider": args.provider, "ort": ort.__version__, "preset": art.manifest.preset, "variants": variants,
              "window": "16 face frames, 4 s of audio; batch4: 4 such windows in one run", "branches": {}}
    for name in BRANCHES:
        try:
            report["branches"][name] = branch_variants(art, name, args, variants)
        except Exception as exc:   # noqa: BLE001 - the other branches' figures are still wanted; traceback kept
            traceback.print_exc()
            report["branches"][name] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        write(report, args.out)
    print_variants(report, variants)
    print(f"written: {args.out}")


def print_variants(report: dict, variants: list) -> None:
    print(f"{'branch':<10} {'variant':<12} {'p50 ms':>9} {'ms/window':>10} {'speedup':>8} {'diff / scale':>13}")
    for name, entries in report["branches"].items():
        if "failed" in entries:
            print(f"{name:<10} failed: {entries['failed']}")
            continue
        for variant in variants:
            r = entries[variant]
            if "skipped" in r:
                print(f"{name:<10} {variant:<12} skipped: {r['skipped']}")
                continue
            print(f"{name:<10} {variant:<12} {r['p50_ms']:>9.2f} {r['ms_per_window']:>10.2f} "
                  f"{r.get('speedup_per_window', 1.0):>7.2f}x {r['relative_diff_to_plain']:>13.2e}")


def write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def compare_exports(args) -> None:
    a, b = load_artifacts(args.before), load_artifacts(args.after)
    spec, rng = a.spec, np.random.default_rng()
    report = {"before": args.before, "after": args.after, "precision": args.precision, "runs": args.runs,
              "threads": args.threads, "provider": args.provider, "preset": a.manifest.preset, "branches": {}}
    for name, branch in BRANCHES.items():
        feed = branch.example_inputs(spec, rng, frames=16, seconds=4.0)
        runs = [PlainRunner(session(x, name, args.precision, args.threads, args.provider)).run for x in (a, b)]
        outs = [timed(run, feed)[1] for run in runs]   # warm-up, and the outputs compared
        times = ([], [])
        for _ in range(args.runs):
            for k, run in enumerate(runs):
                times[k].append(timed(run, feed)[0])
        scale = max(float(np.abs(o).max()) for o in outs[0])
        diff = max(float(np.abs(x - y).max()) for x, y in zip(*outs))
        p50 = [statistics.median(t) for t in times]
        report["branches"][name] = {"before_ms": round(p50[0], 2), "after_ms": round(p50[1], 2),
                                    "speedup": round(p50[0] / p50[1], 3), "max_abs_diff": diff,
                                    "relative_diff": diff / scale if scale else diff}
        write(report, args.out)
    print(f"{'branch':<10} {'before ms':>10} {'after ms':>10} {'speedup':>8} {'max diff / scale':>17}")
    for name, r in report["branches"].items():
        print(f"{name:<10} {r['before_ms']:>10.2f} {r['after_ms']:>10.2f} {r['speedup']:>7.2f}x "
              f"{r['relative_diff']:>17.2e}")
    print(f"written: {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="an export folder (with --variants, the only one)")
    parser.add_argument("after", nargs="?", help="the export compared with it (without --variants)")
    parser.add_argument("--variants", help=f"compare ways of running one export: some of {','.join(VARIANTS)}")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--provider", default="CPUExecutionProvider", help="e.g. CUDAExecutionProvider")
    parser.add_argument("--out", default="bench-results/encoders-compare.json")
    args = parser.parse_args()
    if args.variants and args.after:
        parser.error("--variants compares within one export: give one folder")
    if not args.variants and not args.after:
        parser.error("give two export folders, or one with --variants")
    compare_variants(args) if args.variants else compare_exports(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
