"""Two exports' encoders side by side (CPU by default): time per branch and how far their outputs differ.

    python scripts/encoder_compare.py /tmp/mid /tmp/mid-fused --out bench-results/encoders-fused-mid.json

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
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_emollama.branches import BRANCHES
from edge_emollama.manifest import load_artifacts


def session(artifacts, branch: str, precision: str, threads: int, provider: str):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    path = artifacts.path(format="onnx", branch=branch, precision=precision)
    return ort.InferenceSession(str(path), options, providers=[provider, "CPUExecutionProvider"])


def timed(sess, feed: dict) -> tuple:
    start = time.perf_counter()
    out = sess.run(None, feed)
    return (time.perf_counter() - start) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--provider", default="CPUExecutionProvider", help="e.g. CUDAExecutionProvider")
    parser.add_argument("--out", default="bench-results/encoders-compare.json")
    args = parser.parse_args()
    a, b = load_artifacts(args.before), load_artifacts(args.after)
    spec, rng = a.spec, np.random.default_rng()
    report = {"before": args.before, "after": args.after, "precision": args.precision, "runs": args.runs,
              "threads": args.threads, "provider": args.provider, "preset": a.manifest.preset, "branches": {}}
    for name, branch in BRANCHES.items():
        feed = branch.example_inputs(spec, rng, frames=16, seconds=4.0)
        sessions = tuple(session(x, name, args.precision, args.threads, args.provider) for x in (a, b))
        outs = [timed(s, feed)[1] for s in sessions]   # warm-up, and the outputs compared
        times = ([], [])
        for _ in range(args.runs):
            for k, s in enumerate(sessions):
                times[k].append(timed(s, feed)[0])
        scale = max(float(np.abs(o).max()) for o in outs[0])
        diff = max(float(np.abs(x - y).max()) for x, y in zip(*outs))
        p50 = [statistics.median(t) for t in times]
        report["branches"][name] = {"before_ms": round(p50[0], 2), "after_ms": round(p50[1], 2),
                                    "speedup": round(p50[0] / p50[1], 3), "max_abs_diff": diff,
                                    "relative_diff": diff / scale if scale else diff}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'branch':<10} {'before ms':>10} {'after ms':>10} {'speedup':>8} {'max diff / scale':>17}")
    for name, r in report["branches"].items():
        print(f"{name:<10} {r['before_ms']:>10.2f} {r['after_ms']:>10.2f} {r['speedup']:>7.2f}x "
              f"{r['relative_diff']:>17.2e}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
