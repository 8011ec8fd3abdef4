"""Another GGUF quantization against an export's F16, timed on this machine (backs the per-device defaults).

    python scripts/quant_compare.py ARTIFACTS OUT.json [QTYPE] [--n-gpu-layers N]

Quantizes ARTIFACTS' F16 GGUF to QTYPE (default Q4_K_M) in a temporary folder, then scores the emotion labels
with each on the same random media rows (the LLM stage's work for one window) and prints and writes p50/p95 of
both, their ratio, and how often the top label agrees. Used where the export left the quantization out to save
time (the GPU benchmark); `edge-emollama bench` times every GGUF an export holds.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_emollama.export.quantize import quantize_gguf
from edge_emollama.manifest import load_artifacts
from edge_emollama.prompt import prompt_parts
from edge_emollama.runtime.llm import LlamaCppScorer
from edge_emollama.scoring import softmax
from edge_emollama.tools.bench import stats
from edge_emollama.vocab import LlamaTokenizer


def time_scorer(path: Path, rows: list, parts: list, pieces: list, n_gpu_layers: int) -> tuple:
    scorer = LlamaCppScorer(path, n_ctx=2048, n_gpu_layers=n_gpu_layers)
    try:
        scorer.label_logprobs(parts, rows[0], pieces)   # warm-up
        times, probabilities = [], []
        for r in rows:
            start = time.perf_counter()
            probabilities.append(softmax(scorer.label_logprobs(parts, r, pieces)))
            times.append((time.perf_counter() - start) * 1e3)
        return stats(times), probabilities
    finally:
        scorer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts")
    parser.add_argument("out")
    parser.add_argument("qtype", nargs="?", default="Q4_K_M")
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--windows", type=int, default=10)
    args = parser.parse_args()
    artifacts = load_artifacts(args.artifacts, verify=False)
    spec = artifacts.spec
    f16 = artifacts.path(format="gguf", quant="F16")
    rng = np.random.default_rng(0)
    rows = [(0.02 * rng.standard_normal((spec.media_rows, spec.llama.hidden))).astype(np.float32)
            for _ in range(args.windows)]
    pieces = [list(p) for p in artifacts.manifest.label_pieces]
    with tempfile.TemporaryDirectory(dir=f16.parent.parent) as tmp:
        start = time.perf_counter()
        quantized = quantize_gguf(f16, Path(tmp) / f"llm.{args.qtype}.gguf", args.qtype)
        quantize_s = time.perf_counter() - start
        parts = prompt_parts(LlamaTokenizer(artifacts.root / "vocab.gguf"), spec, "i really think so",
                             artifacts.manifest.prompt.layout)
        f16_ms, f16_p = time_scorer(f16, rows, parts, pieces, args.n_gpu_layers)
        q_ms, q_p = time_scorer(quantized, rows, parts, pieces, args.n_gpu_layers)
    same = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(f16_p, q_p)])
    report = {"artifacts": args.artifacts, "preset": spec.name, "n_gpu_layers": args.n_gpu_layers,
              "windows": args.windows, "quantize_s": quantize_s, "F16_ms": f16_ms, f"{args.qtype}_ms": q_ms,
              f"{args.qtype}_over_F16": q_ms["p50"] / f16_ms["p50"], "top_label_agreement": float(same)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"LLM stage, {args.windows} windows, n_gpu_layers {args.n_gpu_layers}: F16 p50 {f16_ms['p50']:.1f} ms, "
          f"{args.qtype} p50 {q_ms['p50']:.1f} ms ({report[f'{args.qtype}_over_F16']:.2f}x F16's time); "
          f"top label agreement {same:.0%}; quantizing took {quantize_s:.0f} s")


if __name__ == "__main__":
    main()
