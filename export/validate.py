"""Parity of every artifact with the PyTorch reference, on inputs drawn fresh for each run.

Tolerances (docs/verification.md):
- ONNX encoders: max relative error = max|onnx - torch| / max|torch| over each output, at most the branch's
  declared tolerance (edge_emollama/branches.py: fp32 1e-4, fp16 1e-2).
- GGUF LLM: label distributions from llama.cpp (media rows injected as an embedding batch) against the
  reference's on random windows: F16 the same top label on every decisive window and KL(ref || gguf) < 1e-3
  on every window; Q8_0 the same top label on at least 99 % of decisive windows; other quantizations reported,
  not gated. A window is decisive when the reference's top two labels are at least NEAR_TIE apart: below
  that, any small numeric difference (another BLAS, another quantization) may swap them, and random weights
  make many such ties. Flips at near-ties are counted and listed, not gated.
"""
from __future__ import annotations

import logging

import numpy as np

from ..branches import BRANCHES
from ..errors import EdgeEmollamaError
from ..lazy import require
from ..prompt import label_pieces, prompt_parts
from ..runtime.encoders import choose_providers
from ..runtime.llm import LlamaCppScorer
from ..scoring import kl_divergence, softmax

log = logging.getLogger(__name__)
GATES = {"F16": {"agreement": 1.0, "kl": 1e-3}, "Q8_0": {"agreement": 0.99, "kl": None}}
NEAR_TIE = 0.05   # reference top-2 probability margin below which a window is not decisive
WORDS = ("i", "really", "think", "that", "is", "so", "good", "today", "you", "know", "not", "what", "why",
         "oh", "wow", "sorry", "hello", "people", "feel", "bad", "great", "okay", "thank", "no", "yes", "day")


class ValidationError(EdgeEmollamaError):
    """An artifact computes a different function from the reference (beyond the stated tolerance)."""


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def parity_providers(device) -> list:
    """Where the reference runs on CUDA and onnxruntime has CUDA, the check runs there (TF32 off: the fp32
    limit is below its rounding); otherwise on the CPU."""
    if device.type == "cuda" and "CUDAExecutionProvider" in choose_providers(["CUDAExecutionProvider"]):
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def encoder_parity(reference, spec, branch: str, precision: str, path, rng, trials: int) -> dict:
    torch = require("torch")
    ort = require("onnxruntime")
    module = reference.export_units()[branch]
    device = next(module.parameters()).device
    wanted = parity_providers(device)
    first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
    session = ort.InferenceSession(str(path), providers=wanted)
    if session.get_providers()[0] != first:
        log.warning("%s is checked on %s: onnxruntime could not run it on %s (its message above); the runtime "
                    "would fall back the same way", path.name, session.get_providers()[0], first)
    worst, shapes, io = 0.0, [], BRANCHES[branch]
    for _ in range(trials):
        inputs = io.example_inputs(spec, rng, frames=int(rng.integers(1, 17)), seconds=float(rng.uniform(0.5, 3)),
                                   batch=int(rng.integers(1, 4)) if io.batched else 1)
        got = session.run(None, inputs)
        with torch.no_grad():
            want = module(*(torch.from_numpy(inputs[n]).to(device) for n in io.input_names))
        want = want if isinstance(want, tuple) else (want,)
        worst = max([worst] + [relative_error(g, w.float().cpu().numpy()) for g, w in zip(got, want)])
        shapes.append({k: list(v.shape) for k, v in inputs.items()})
    limit = io.tolerance[precision]
    return {"artifact": str(path.name), "branch": branch, "precision": precision, "trials": trials,
            "provider": session.get_providers()[0], "input_shapes": shapes, "max_rel_err": worst, "limit": limit,
            "passed": worst <= limit}


def random_window(reference, spec, rng, zeros: tuple) -> tuple:
    """Media rows of a random window through the reference encoders, and a random subtitle."""
    feeds = {name: branch.example_inputs(spec, rng, frames=int(rng.integers(1, 17)), seconds=float(rng.uniform(0.5, 3)))
             for name, branch in BRANCHES.items()}
    subtitle = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
    return reference.media_block(feeds, zeros=zeros), subtitle


def llm_parity(reference, spec, tokenizer, ggufs: dict, rng, windows: int, layout: str, zeros: tuple,
               n_threads: int | None = None) -> list:
    """Label distributions of each GGUF (name -> path) against the reference on ``windows`` random windows."""
    pieces = label_pieces(tokenizer)
    # flash attention off, an f32 KV cache, on the CPU: the check measures the weight format alone (the
    # runtime's faster defaults add about 3e-3 x logit std; tests/test_pipeline.py bounds the runtime's own KL;
    # a GPU's fp16 matrix products are measured by `edge-emollama bench`)
    scorers = {name: LlamaCppScorer(path, n_ctx=_context(spec), n_threads=n_threads, flash_attn="off", kv_type="f32",
                                    offload=False) for name, path in ggufs.items()}
    stats = {name: {"agree": 0, "decisive": 0, "agree_decisive": 0, "kl": [], "flip_margins": []} for name in ggufs}
    try:
        for _ in range(windows):
            rows, subtitle = random_window(reference, spec, rng, zeros)
            want = reference.label_distribution(rows, subtitle, layout)
            parts = prompt_parts(tokenizer, spec, subtitle, layout)
            margin = float(np.diff(np.sort(want)[-2:])[0])   # how decisive the reference is
            for name, scorer in scorers.items():
                got = softmax(scorer.label_logprobs(parts, rows, pieces))
                same = bool(np.argmax(got) == np.argmax(want))
                row = stats[name]
                row["agree"] += same
                row["decisive"] += margin >= NEAR_TIE
                row["agree_decisive"] += same and margin >= NEAR_TIE
                if not same:
                    row["flip_margins"].append(margin)
                row["kl"].append(kl_divergence(want, got))
    finally:
        for scorer in scorers.values():
            scorer.close()
    return [_llm_row(name, ggufs[name], s, windows) for name, s in stats.items()]


def _llm_row(name: str, path, s: dict, windows: int) -> dict:
    """``top_label_agreement`` (gated) is over the decisive windows; ``top_label_agreement_all`` over all."""
    agreement = s["agree_decisive"] / s["decisive"] if s["decisive"] else 1.0
    gate = GATES.get(name)
    passed = None
    if gate:
        passed = agreement >= gate["agreement"] and (gate["kl"] is None or max(s["kl"]) < gate["kl"])
    return {"artifact": str(path.name), "quant": name, "windows": windows, "decisive_windows": s["decisive"],
            "near_tie_margin": NEAR_TIE, "top_label_agreement": agreement,
            "top_label_agreement_all": s["agree"] / windows, "kl_max": max(s["kl"]),
            "kl_mean": float(np.mean(s["kl"])), "gate": gate, "passed": passed,
            "flip_reference_margins": s["flip_margins"]}


def _context(spec) -> int:
    return min(spec.llama.context, 1024 if spec.media_rows < 64 else 2048)


def raise_on_failure(rows: list, what: str) -> None:
    failed = [r for r in rows if r.get("passed") is False]
    if failed:
        details = "; ".join(f"{r['artifact']}: {_figures(r)}" for r in failed)
        raise ValidationError(f"{what} parity failed: {details}. The export was not published. A flip where the "
                              f"reference's top two labels were {NEAR_TIE} or more apart means the artifact computes a "
                              "different function (please report it). Export without the failing format (--quant, "
                              "--formats) to proceed.")


def _limit(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _figures(row: dict) -> str:
    if "max_rel_err" in row:
        return f"max rel err {row['max_rel_err']:.2e} > {row['limit']:.0e}"
    flips = row.get("flip_reference_margins") or [0.0]
    return (f"top-label agreement {row['top_label_agreement']:.2%} of {row['decisive_windows']} decisive windows, "
            f"KL max {row['kl_max']:.2e}, labels flipped where the reference's top two were up to {max(flips):.3f} "
            f"apart")


def format_table(report: dict) -> str:
    lines = [f"parity report (seed {report['seed']}):",
             f"{'artifact':38} {'check':28} {'result':>16} {'limit':>10}  ok"]
    for r in report.get("encoders", []):
        lines.append(f"{r['artifact']:38} {'max rel err, ' + str(r['trials']) + ' draws':28} "
                     f"{r['max_rel_err']:16.2e} {r['limit']:10.0e}  {'yes' if r['passed'] else 'NO'}")
    for r in report.get("llm", []):
        gate = r["gate"] or {}
        ok = {True: "yes", False: "NO", None: "(reported)"}[r["passed"]]
        decisive = f"top label, {r['decisive_windows']}/{r['windows']} decisive"
        lines.append(f"{r['artifact']:38} {decisive:28} "
                     f"{r['top_label_agreement']:16.2%} {_limit(gate.get('agreement')):>10}  {ok}")
        kl_limit = f"{gate['kl']:10.0e}" if gate.get("kl") else f"{'-':>10}"
        if r["flip_reference_margins"]:
            flips = f"{len(r['flip_reference_margins'])}, max {max(r['flip_reference_margins']):.3f}"
            lines.append(f"{'':38} {'flips (ref top-2 margin)':28} {flips:>16}")
        lines.append(f"{'':38} {'KL(ref||gguf) max / mean':28} {r['kl_max']:9.1e}/{r['kl_mean']:6.0e} "
                     f"{kl_limit}  {ok if gate.get('kl') else ''}")
    return "\n".join(lines)
