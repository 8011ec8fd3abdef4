"""optimum against our exporter on one export: HuBERT exported, optimized and fp16 by optimum, int8 of every encoder.

    python scripts/optimum_compare.py ARTIFACTS [--hubert-dir DIR --checkpoint Emoation_LLaMA.pth]
                                      [--out bench-results/optimum-mid.json] [--runs 10] [--seed N] [--work DIR]

ARTIFACTS: an export (``edge-emollama export``). Its HuBERT source: ``--hubert-dir`` (the user's Hugging Face
directory, e.g. chinese-hubert-large/) with ``--checkpoint`` for the projector; for a seeded random export, the
reference is rebuilt from the manifest (preset spec, seed, CPU draw) and its HuBERT saved with save_pretrained.
Parity is max|x - ours fp32| / max|ours fp32| on fresh random inputs (seed printed and recorded); timings are p50
of ``--runs`` alternating CPU runs. Needs optimum's environment (``make optimum-env``; docs/optimum.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from edge_emollama.branches import BRANCHES, TOLERANCES
from edge_emollama.errors import ConfigError, EdgeEmollamaError
from edge_emollama.export import optimum_tools as ot
from edge_emollama.manifest import load_artifacts


def hubert_source(artifacts, args, work: Path) -> tuple:
    """(HuBERT HF directory, projector (weight, bias)) for the export."""
    if args.hubert_dir:
        if not args.checkpoint:
            raise ConfigError("--hubert-dir needs --checkpoint (the Emotion-LLaMA checkpoint, for feats_llama_proj3)")
        return Path(args.hubert_dir), ot.projector_from_checkpoint(args.checkpoint)
    source = artifacts.manifest.source
    if source.get("weights") != "seeded random" or source.get("drawn_on", "cpu") != "cpu":
        raise ConfigError(f"{artifacts.root} was not exported from CPU-drawn seeded random weights ({source}): pass "
                          "--hubert-dir DIR and --checkpoint FILE (the user's HuBERT folder and Emotion-LLaMA file)")
    from edge_emollama.reference.synthetic import build_random

    reference = build_random(artifacts.spec, None, seed=int(source["seed"]))
    hf_dir = work / "hf-hubert"
    reference.audio_encoder.save_pretrained(hf_dir)
    return hf_dir, ot.hubert_projector(reference)


def hubert_variants(artifacts, hf_dir: Path, projector: tuple, work: Path, seed: int, runs: int) -> dict:
    """optimum's HuBERT exported, optimized and fp16, ours fp32 and int8: parity against ours fp32, CPU time."""
    spec, ours = artifacts.spec, artifacts.path(format="onnx", branch="hubert", precision="fp32")
    exported = ot.export_hubert(hf_dir, work / "optimum-hubert")
    optimized = ot.optimize_hubert(work / "optimum-hubert", work / "optimum-hubert-optimized")
    half = ot.optimize_hubert(work / "optimum-hubert", work / "optimum-hubert-fp16", fp16=True)
    files = {"optimum export fp32": exported, "ORTOptimizer O2": optimized, "ORTOptimizer O2 fp16": half}
    rows = {name: {**ot.hubert_parity(r["file"], ours, projector, spec, seed=seed), "file": r["file"],
                   "precision": "fp16" if "fp16" in name else "fp32", **{k: r[k] for k in ("registered", "fused")
                                                                          if k in r}}
            for name, r in files.items()}
    seconds = artifacts.manifest.window.window_s
    pcm = BRANCHES["hubert"].example_inputs(spec, np.random.default_rng(seed), seconds=seconds)["pcm"]
    sessions = {name: ot.session(row["file"]) for name, row in rows.items()}
    ours_sess = ot.session(ours)
    runners = {"ours fp32": lambda: ours_sess.run(None, {"pcm": pcm})}
    runners.update({name: (lambda s=s: ot.optimum_hubert_row(s, pcm, projector)) for name, s in sessions.items()})
    times = ot.cpu_times(runners, runs)
    rows = {"ours fp32": {"rel_err": 0.0, "precision": "fp32", "file": str(ours)}, **rows}
    for name, row in rows.items():
        row.update(times[name], audio_s=seconds, passes=row["rel_err"] <= TOLERANCES[row["precision"]])
        if Path(row["file"]).is_relative_to(work):   # the work folder is temporary unless --work is given
            row["file"] = str(Path(row["file"]).relative_to(work))
    return {"versions": {k: exported[k] for k in ("transformers", "optimum", "optimum_onnx")}, "variants": rows}


INT8_VARIANTS = {"int8": None}
HUBERT_VARIANTS = {"int8": None, "int8 matmul-only": ["MatMul"]}   # ConvInteger is slow on CPU


def int8_branches(artifacts, work: Path, seed: int, runs: int) -> dict:
    """ORTQuantizer dynamic int8 of our four encoder files (HuBERT also with its MatMuls only): parity against
    fp32, CPU time of each against fp32 in one alternating set."""
    rows = {}
    for branch in BRANCHES:
        variants = HUBERT_VARIANTS if branch == "hubert" else INT8_VARIANTS
        for name, row in int8_rows(artifacts, branch, work / "int8", seed, runs, variants).items():
            rows[branch if name == "int8" else f"{branch} {name.removeprefix('int8 ')}"] = row
    return rows


def int8_rows(artifacts, branch: str, out: Path, seed: int, runs: int, variants: dict) -> dict:
    spec, target = artifacts.spec, ot.quantization_target()
    fp32 = artifacts.path(format="onnx", branch=branch, precision="fp32")
    made = {name: ot.quantize_int8(fp32, out / f"{branch}-{name.replace(' ', '-')}", target, operators)
            for name, operators in variants.items()}
    feed = BRANCHES[branch].example_inputs(spec, np.random.default_rng(seed))
    sessions = {"fp32": ot.session(fp32), **{name: ot.session(q["file"]) for name, q in made.items()}}
    times = ot.cpu_times({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, runs)
    rows = {}
    for name, quantized in made.items():
        parity = ot.branch_parity(quantized["file"], fp32, branch, spec, seed=seed)
        rows[name] = {"target": target, "operators": quantized["operators"], "rel_err": parity["rel_err"],
                      "fp32_ms": times["fp32"]["p50_ms"], "int8_ms": times[name]["p50_ms"],
                      "speedup": times["fp32"]["p50_ms"] / times[name]["p50_ms"],
                      "passes_fp16_gate": parity["rel_err"] <= TOLERANCES["fp16"],
                      "passes_loose_gate": parity["rel_err"] <= ot.INT8_TOLERANCE,
                      "input_shapes": {k: list(v.shape) for k, v in feed.items()},
                      "plain_path": quantized["plain_path"], "file": str(Path(quantized["file"]).relative_to(out))}
    return rows


def table(report: dict) -> str:
    lines = [f"HuBERT ({report['preset']}, {report['hubert']['variants']['ours fp32']['audio_s']} s audio), "
             f"rel err vs ours fp32, p50 of {report['runs']} alternating CPU runs:",
             f"  {'variant':24s} {'rel err':>10s} {'gate':>6s} {'p50 ms':>9s}"]
    for name, row in report["hubert"]["variants"].items():
        gate = f"{TOLERANCES[row['precision']]:.0e}"
        lines.append(f"  {name:24s} {row['rel_err']:10.2e} {gate:>6s} {row['p50_ms']:9.2f}"
                     f"{'' if row['passes'] else '  FAILS'}")
    lines += [f"int8 (ORTQuantizer dynamic, {report['int8_target']}) vs our fp32:",
              f"  {'branch':20s} {'rel err':>10s} {'fp32 ms':>9s} {'int8 ms':>9s} {'speedup':>8s}"]
    for branch, row in report["int8"].items():
        lines.append(f"  {branch:20s} {row['rel_err']:10.2e} {row['fp32_ms']:9.2f} {row['int8_ms']:9.2f} "
                     f"{row['speedup']:7.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts")
    parser.add_argument("--hubert-dir", help="the user's Hugging Face HuBERT directory (chinese-hubert-large/)")
    parser.add_argument("--checkpoint", help="the Emotion-LLaMA checkpoint, for HuBERT's projector")
    parser.add_argument("--out", default="bench-results/optimum-mid.json")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, help="input seed (default: fresh, recorded)")
    parser.add_argument("--work", help="keep the files written here (default: a temporary folder)")
    args = parser.parse_args()
    artifacts = load_artifacts(args.artifacts)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="optimum-") as tmp:
        work = Path(args.work or tmp)
        hf_dir, projector = hubert_source(artifacts, args, work)
        report = {"load_average_before": os.getloadavg(), "artifacts": str(artifacts.root),
                  "preset": artifacts.spec.name, "seed": seed, "runs": args.runs,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}, no GPU",
                  "int8_target": ot.quantization_target(), "int8_loose_tolerance": ot.INT8_TOLERANCE,
                  "hubert": hubert_variants(artifacts, hf_dir, projector, work, seed, args.runs),
                  "int8": int8_branches(artifacts, work, seed, args.runs)}
    report["load_average_after"] = os.getloadavg()   # 2 shared vCPUs: other work shows in the times
    print(table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written {args.out} (seed {seed})")


def _cpu_name() -> str:
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
    except OSError:
        return platform.processor() or "unknown CPU"
    return names[0] if names else "unknown CPU"


if __name__ == "__main__":
    try:
        main()
    except EdgeEmollamaError as exc:   # one message naming the thing and the fix, no traceback
        raise SystemExit(f"optimum_compare: {exc}") from None
