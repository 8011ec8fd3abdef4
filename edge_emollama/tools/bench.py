"""``edge-emollama bench``: per-stage latency, pipelined throughput and the full clip run, side by side with
the PyTorch reference on the same inputs in the same process (``--reference``).

What is measured (all on synthetic windows of the preset's shapes, drawn from a fixed seed):
- stage latency: preprocessing, each encoder, the encoders together, the LLM stage; one window at a time;
- window latency: encoders + LLM of one window (what a single window costs, p50/p95);
- pipelined throughput: N windows pushed through the encode -> llm -> publish stages as fast as they go
  (the encoders of window n+1 overlap the LLM of window n): estimates per second;
- clip run: the whole runtime on the generated sample clip (decode, faces, windows, stages, publish),
  as fast as possible (estimates/s) and in real time (capture-to-publish latency p50/p95);
- reference: eager PyTorch encoders + projectors and the label by greedy decoding (4 tokens, as the
  original's ``generate``), sequential, so its estimates per second are 1 / window latency;
- streams (``--streams 1,2,4,8``): N concurrent streams, a window of each per round through the encoders (one
  window per run, and all N in one: the batch axis), then the LLM scores the N windows one llama_decode each
  and all in one (``runtime.llm.batch_windows``), side by side: the estimates per second each way.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..branches import window_feeds
from ..config import ControlConfig, ReasoningConfig, RuntimeConfig, SourcesConfig
from ..errors import ArtifactError
from ..manifest import load_artifacts, tool_versions
from ..runtime.clock import now_ns
from ..runtime.device import device_class
from ..runtime.items import EndOfInput, synthetic_window
from ..runtime.link import LinkOptions, Producer
from ..runtime.pipeline import Pipeline
from ..runtime.stages import EncoderStage, LlmStage
from ..runtime.windows import WindowPlan
from ..scoring import kl_divergence
from ..spec import ALIGNED_FACE_SIZE, ModelSpec
from ..vocab import LlamaTokenizer
from .sample_clip import write_sample_clip

log = logging.getLogger(__name__)
PACED_HOP_S = 0.5   # the default hop: one window handed over every 0.5 s in the paced run


@dataclass
class BenchOptions:
    runtime: RuntimeConfig          # what is benchmarked: the runtime as configured (runtime.artifacts, encoders, llm)
    windows: int = 20
    reference: bool = False
    clip: bool = True
    sweep: bool = False
    progress: str | None = None   # the JSON is rewritten here after each section ("complete": false until the end)
    streams: tuple = ()           # stream counts for the streams sweep (empty: none)
    subtitle: str = "i really think so"


def synthetic_windows(spec: ModelSpec, rng: np.random.Generator, count: int, window_s: float = 2.0,
                      hop_s: float = 0.5, fps: float = 20.0) -> list:
    """Windows as the scheduler sends them, cut from one synthetic stream: a 640x480 frame, a face crop per
    frame (consecutive windows share frames, as live ones do), 16 VideoMAE crops, audio."""
    per_window, per_hop = max(1, int(round(window_s * fps))), max(1, int(round(hop_s * fps)))
    size = ALIGNED_FACE_SIZE
    bank = rng.integers(0, 255, (per_window + per_hop * (count - 1), size, size, 3), dtype=np.uint8)
    start, items = now_ns(), []
    for i in range(count):
        first = i * per_hop
        times = start + ((first + np.arange(per_window)) * 1e9 / fps).astype(np.int64)
        items.append(synthetic_window(spec, rng, index=i, t1_ns=int(times[-1]), window_s=window_s,
                                      crops=bank[first:first + per_window], frame_times_ns=times))
    return items


def stats(values: list) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "mean": float(array.mean()), "n": int(array.size)}


def stage_latency(encoders: EncoderStage, llm: LlmStage, items: list, subtitle: str,
                  probabilities: list | None = None) -> dict:
    """Per-stage p50/p95 over ``items``; the label distributions are appended to ``probabilities`` if given."""
    per_stage: dict = {}
    for item in items:
        rows, timings = encoders(item)
        distribution, llm_ms = llm(rows, subtitle)
        if probabilities is not None:
            probabilities.append(distribution)
        timings = {k.removesuffix("_ms"): v for k, v in timings.items()}
        timings["llm"] = llm_ms
        timings["window"] = timings["encoders"] + llm_ms
        for key, value in timings.items():
            per_stage.setdefault(key, []).append(value)
    return {k: stats(v) for k, v in per_stage.items()}


def pipelined_throughput(options: BenchOptions, items: list, interval_s: float = 0.0) -> dict:
    """N windows through encode -> llm -> publish threads linked by ZeroMQ, losing none, and each window's
    latency from being handed to the encode stage to being published. ``interval_s`` 0: as fast as they go
    (throughput; latency then includes queueing); else one window per interval, as a live source hands
    them over (the hop), which gives the live latency without capture, decoding and face detection."""
    handed, latencies = {}, []
    pipeline = Pipeline(_runtime(options, stages=["encode", "llm", "publish"]), lossless=True,
                        on_estimate=lambda fused, item: latencies.append((now_ns() - handed[item.index]) / 1e6))
    producer = Producer(LinkOptions(pipeline.links["windows"], sndhwm=2))
    pipeline.start()
    start = time.perf_counter()
    for i, item in enumerate(items):
        if interval_s:
            time.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
        item.stamp.sent_ns = handed[item.index] = now_ns()
        while not producer.send(item, block_s=0.5):
            pipeline.raise_errors()
    producer.send(EndOfInput(), block_s=5.0)
    pipeline.wait(timeout_s=600)
    seconds = time.perf_counter() - start
    producer.close()
    pipeline.close()
    pipeline.raise_errors()
    return {"windows": len(items), "published": pipeline.published, "seconds": seconds,
            "estimates_per_s": pipeline.published / seconds,
            "handoff_to_publish_ms": stats(latencies) if latencies else None}


def _runtime(options: BenchOptions, **changes) -> RuntimeConfig:
    """The runtime as benchmarked (its encoders, llm and window settings), without reasoning, on free loopback
    ports; ``changes`` replace top-level fields (stages, sources)."""
    return dataclasses.replace(options.runtime, reasoning=ReasoningConfig(enabled=False), links={},
                               publish=dataclasses.replace(options.runtime.publish, endpoint="tcp://127.0.0.1:*"),
                               control=ControlConfig(endpoint="tcp://127.0.0.1:*"), **changes)


def clip_run(options: BenchOptions, seconds: float = 8.0) -> dict:
    """The whole runtime on the generated sample clip: as fast as possible, then in real time."""
    clip = write_sample_clip(Path(tempfile.mkdtemp(prefix="edge-emollama-bench-")) / "clip.mp4", seconds=seconds)
    result = {"clip_s": seconds}
    for mode, realtime in (("fast", False), ("realtime", True)):
        latencies = []
        runtime = _runtime(options, sources=SourcesConfig(video=str(clip), realtime=realtime))
        pipeline = Pipeline(runtime, on_estimate=lambda fused, item: latencies.append((now_ns() - item.t1_ns) / 1e6))
        pipeline.start()
        start = time.perf_counter()
        pipeline.wait(timeout_s=600)
        elapsed = time.perf_counter() - start
        pipeline.close()
        pipeline.raise_errors()
        expected = int((seconds - pipeline.plan.window_s) / pipeline.plan.hop_s) + 1
        result[mode] = {"published": pipeline.published, "windows_in_clip": expected, "seconds": elapsed,
                        "estimates_per_s": pipeline.published / elapsed,
                        "capture_to_publish_ms": stats(latencies) if latencies and realtime else None}
    return result


def reference_timings(options: BenchOptions, artifacts, items: list, runtime_probabilities: list = ()) -> dict:
    from ..reference.synthetic import build_random
    from ..reference.timing import time_reference

    spec = artifacts.spec
    tokenizer = LlamaTokenizer(artifacts.root / "vocab.gguf")
    source = artifacts.manifest.source
    if source.get("seed") is None:
        raise ArtifactError(f"{artifacts.root} holds a user's checkpoints: --reference rebuilds the reference "
                            "from the seed of random-weight exports only (use --preset, or --random-weights)")
    drawn_on = source.get("drawn_on", "cpu")
    if drawn_on == "cuda":
        _check_gpu_room(artifacts.root, spec)
    reference = _on_gpu(build_random(spec, tokenizer, seed=source["seed"], device=drawn_on))
    time_reference(reference, items[:1], options.subtitle)   # warm-up
    rows = time_reference(reference, items, options.subtitle)
    summary = {k: stats([r[k] for r in rows]) for k in rows[0]}
    summary["estimates_per_s"] = 1000.0 / summary["window_ms"]["mean"]
    if runtime_probabilities:
        summary["runtime_vs_reference"] = agreement(reference, spec, items, runtime_probabilities, options.subtitle,
                                                    artifacts.manifest.prompt.layout)
    return summary


def agreement(reference, spec: ModelSpec, items: list, probabilities: list, subtitle: str, layout: str) -> dict:
    """The runtime's label distributions (as configured: e.g. fp16 ONNX + F16 GGUF on a GPU) against the reference
    as timed (fp16 eager on a GPU) on the same windows: top-label agreement and KL(reference || runtime)."""
    same, kl = 0, []
    for item, got in zip(items, probabilities):
        want = reference.label_distribution(reference.media_block(window_feeds(item, spec)), subtitle, layout)
        same += int(np.argmax(want) == np.argmax(got))
        kl.append(kl_divergence(want, got))
    return {"windows": len(kl), "top_label_agreement": same / len(kl), "kl_mean": float(np.mean(kl)),
            "kl_max": float(np.max(kl))}


def _check_gpu_room(artifacts: str, spec: ModelSpec) -> None:
    """Weights drawn on CUDA can only be drawn again there, in fp32 (then halved for timing)."""
    import torch

    from ..export.sources import reference_bytes

    if not torch.cuda.is_available():
        raise ArtifactError(f"{artifacts} was exported with weights drawn on CUDA; the reference can only be "
                            "rebuilt from its seed on a GPU (or re-export on this machine)")
    free, needed = torch.cuda.mem_get_info()[0], reference_bytes(spec)
    if free < 1.1 * needed:
        raise ArtifactError(f"--reference draws the fp32 reference on the GPU: about {needed / 1e9:.0f} GB, and "
                            f"{free / 1e9:.0f} GB are free; run it on a larger GPU or leave out --reference")


def _on_gpu(reference):
    """fp16 on CUDA when there is a GPU (the reference's measured configuration, spec section 6)."""
    import torch

    return reference.half().cuda() if torch.cuda.is_available() else reference


def quant_latency(options: BenchOptions, artifacts, encoders: EncoderStage, items: list) -> dict:
    """The LLM stage per exported GGUF on the same media rows (backs the per-device default)."""
    rows = [encoders(item)[0] for item in items[:max(3, len(items) // 2)]]
    result = {}
    for quant in sorted(artifacts.manifest.exported("quant", format="gguf")):
        llm = LlmStage(artifacts, dataclasses.replace(options.runtime.llm, quant=quant))
        llm.warmup()
        result[quant] = stats([llm(r, options.subtitle)[1] for r in rows])
        llm.close()
    return result


def scaling(options: BenchOptions, spec: ModelSpec, encoders: EncoderStage, llm: LlmStage) -> list:
    """Window latency against window length (face frames at 20 fps, audio seconds)."""
    rng = np.random.default_rng(1)
    table = []
    for window_s in (1.0, 2.0, 3.0, 4.0):
        items = synthetic_windows(spec, rng, max(4, options.windows // 3), window_s=window_s)
        lat = stage_latency(encoders, llm, items, options.subtitle)
        table.append({"window_s": window_s, "face_frames": int(window_s * 20), "audio_s": window_s,
                      "encoders_ms": lat["encoders"]["p50"], "encoder_mae_ms": lat["encoder_mae"]["p50"],
                      "encoder_hubert_ms": lat["encoder_hubert"]["p50"], "llm_ms": lat["llm"]["p50"],
                      "window_ms": lat["window"]["p50"],
                      "pipelined_estimates_per_s": 1000.0 / max(lat["encoders"]["p50"], lat["llm"]["p50"]),
                      "min_hop_s": max(lat["encoders"]["p50"], lat["llm"]["p50"]) / 1000.0})
    return table


def streams_sweep(options: BenchOptions, artifacts, encoders: EncoderStage, rounds: int = 4) -> list:
    """For each stream count N: per round, one window of each of N streams (their own content, their own
    source name) through the encoders one window per run and all N in one (``EncoderStage.encode``: the batch
    axis), then the LLM on the N windows one decode each and in one batched decode. ``estimates_per_s``: N /
    (encoders + LLM) per round, the stages one after the other (as they share the cores of a CPU);
    ``*_batched``: both stages batched; ``*_overlapped``: N / the slower stage, the bound with the stages on
    separate units."""
    spec, rng, table = artifacts.spec, np.random.default_rng(2), []
    llm = LlmStage(artifacts, dataclasses.replace(options.runtime.llm, batch_windows=max(options.streams)))
    llm.warmup()
    try:
        for count in options.streams:
            each_streams, batch_streams = (_named_streams(spec, rng, count, rounds, prefix) for prefix in ("one", "all"))
            enc, enc_batched, each, batched, calls = [], [], [], [], 0
            for r in range(rounds):
                start = time.perf_counter()
                rows = [encoders(windows[r])[0] for windows in each_streams]
                enc.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                encoders.encode([windows[r] for windows in batch_streams])
                enc_batched.append((time.perf_counter() - start) * 1000)
                each.append(sum(llm(block, options.subtitle)[1] for block in rows))
                batched.append(llm.score_batch(rows, options.subtitle)[1])
                calls = llm.decode_calls
            e, eb, one, many = (float(np.median(v)) for v in (enc, enc_batched, each, batched))
            table.append({"streams": count, "encoders_ms": e, "encoders_batched_ms": eb, "llm_one_each_ms": one,
                          "llm_batched_ms": many, "batched_decode_calls": calls,
                          "estimates_per_s": count * 1000 / (e + one),
                          "estimates_per_s_batched": count * 1000 / (eb + many),
                          "estimates_per_s_overlapped": count * 1000 / max(e, one),
                          "estimates_per_s_batched_overlapped": count * 1000 / max(eb, many)})
    finally:
        llm.close()
    return table


def _named_streams(spec: ModelSpec, rng: np.random.Generator, count: int, rounds: int, prefix: str) -> list:
    """``count`` synthetic streams of ``rounds`` windows each, named ``<prefix><k>`` (no cache is shared)."""
    streams = [synthetic_windows(spec, rng, rounds) for _ in range(count)]
    for k, windows in enumerate(streams):
        for window in windows:
            window.stamp.source = f"{prefix}{k}"
    return streams


def run_bench(options: BenchOptions) -> dict:
    artifacts = load_artifacts(options.runtime.artifacts)
    spec = artifacts.spec
    rng = np.random.default_rng(0)
    plan = WindowPlan.from_manifest(artifacts.manifest, options.runtime.windows)
    seen_s = max(plan.context_s.values(), default=plan.window_s)   # the frames and audio the encoders see
    items = synthetic_windows(spec, rng, options.windows, window_s=seen_s, hop_s=plan.hop_s)
    encoders = EncoderStage(artifacts, options.runtime.encoders)
    llm = LlmStage(artifacts, options.runtime.llm)
    encoders.warmup()
    llm.warmup()
    gpu_loaded, probabilities = _gpu_memory_mb(), []
    report = {"preset": spec.name, "artifacts": str(artifacts.root), "device_class": device_class(),
              "machine": _machine(), "tools": tool_versions(), "windows": options.windows,
              "encoders_see_s": seen_s,
              "runtime": {"precision": encoders.encoders.precision, "quant": llm.quant,
                          "threads": options.runtime.encoders.threads, "n_gpu_layers": options.runtime.llm.n_gpu_layers,
                          "providers": list(encoders.encoders.providers),
                          "encoder_providers": dict(encoders.encoders.session_providers)},
              "stage_latency_ms": stage_latency(encoders, llm, items, options.subtitle, probabilities),
              "errors": {}}
    # steady state: consecutive windows share (W - H) / W of their frames, whose MAE rows are reused
    report["mae_frames_reused"] = encoders.frames_reused
    report["llm_decode_calls_per_window"] = llm.decode_calls   # the last (steady-state) window's
    report["gpu_memory_runtime_mb"] = gpu_loaded
    _section(report, "llm_by_quant_ms", lambda: quant_latency(options, artifacts, encoders, items), options.progress)
    if options.sweep:
        _section(report, "scaling", lambda: scaling(options, spec, encoders, llm), options.progress)
    if options.streams:
        _section(report, "streams", lambda: streams_sweep(options, artifacts, encoders), options.progress)
    encoders.close()
    llm.close()
    report["pipelined"] = pipelined_throughput(options, items)
    _section(report, "paced", lambda: pipelined_throughput(options, items[:12], interval_s=PACED_HOP_S),
             options.progress)
    if options.clip:
        _section(report, "clip", lambda: clip_run(options), options.progress)
    if options.reference and _section(report, "reference",
                                      lambda: reference_timings(options, artifacts, items, probabilities),
                                      options.progress):
        report["ratios"] = _ratios(report)
    report["peak_ram_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["gpu_memory_end_mb"] = _gpu_memory_mb()
    if options.reference:
        from ..reference.timing import peak_gpu_bytes

        gpu = peak_gpu_bytes()
        report["reference_peak_gpu_mb"] = None if gpu is None else gpu / 2**20
    return report


def _section(report: dict, name: str, measure, progress: str | None = None) -> bool:
    """An optional figure: a failure is recorded under report["errors"] (and makes the command exit 1)
    instead of losing the figures already taken, which matters on a machine lent for minutes."""
    ok = True
    try:
        report[name] = measure()
    except Exception as exc:   # noqa: BLE001 - reported, not swallowed
        log.exception("bench section %s failed", name)
        report["errors"][name] = f"{type(exc).__name__}: {exc}"
        ok = False
    if progress:
        write_report({**report, "complete": False}, Path(progress))
    return ok


def _ratios(report: dict) -> dict:
    ref, lat = report["reference"], report["stage_latency_ms"]
    return {"window_latency_x": ref["window_ms"]["p50"] / lat["window"]["p50"],
            "encoders_latency_x": ref["encoders_ms"]["p50"] / lat["encoders"]["p50"],
            "llm_latency_x": ref["llm_ms"]["p50"] / lat["llm"]["p50"],
            "throughput_x": report["pipelined"]["estimates_per_s"] / ref["estimates_per_s"]}


def _machine() -> dict:
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "system": platform.system()}


def _gpu_memory_mb() -> float | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10)
    return float(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def format_report(report: dict) -> str:
    lines = [f"edge-emollama bench: preset {report['preset']}, device class {report['device_class']}, "
             f"{report['machine']['cores']} cores, {report['windows']} windows",
             f"{'stage':24} {'p50 ms':>10} {'p95 ms':>10}"]
    for name, s in report["stage_latency_ms"].items():
        lines.append(f"{name:24} {s['p50']:10.2f} {s['p95']:10.2f}")
    for quant, s in report.get("llm_by_quant_ms", {}).items():
        lines.append(f"{'llm ' + quant:24} {s['p50']:10.2f} {s['p95']:10.2f}")
    p = report["pipelined"]
    handoff = p.get("handoff_to_publish_ms")
    handoff_text = f", hand-off to publish p50 {handoff['p50']:.1f} ms p95 {handoff['p95']:.1f} ms" if handoff else ""
    lines.append(f"pipelined (encode|llm|publish threads): {p['estimates_per_s']:.2f} estimates/s "
                 f"({p['published']} windows in {p['seconds']:.2f} s){handoff_text}")
    paced = (report.get("paced") or {}).get("handoff_to_publish_ms")
    if paced:
        lines.append(f"paced (a window every {PACED_HOP_S} s): hand-off to publish p50 {paced['p50']:.1f} ms "
                     f"p95 {paced['p95']:.1f} ms")
    for mode in ("fast", "realtime"):
        c = report.get("clip", {}).get(mode)
        if c:
            lat = c["capture_to_publish_ms"]
            lat_text = f", capture-to-publish p50 {lat['p50']:.0f} ms p95 {lat['p95']:.0f} ms" if lat else ""
            lines.append(f"clip {mode:8}: {c['published']}/{c['windows_in_clip']} windows, "
                         f"{c['estimates_per_s']:.2f} estimates/s{lat_text}")
    if "reference" in report:
        r, x = report["reference"], report["ratios"]
        lines.append(f"reference (PyTorch eager, greedy label): window p50 {r['window_ms']['p50']:.2f} ms, "
                     f"{r['estimates_per_s']:.2f} estimates/s")
        lines.append(f"ratios: window latency {x['window_latency_x']:.2f}x, encoders {x['encoders_latency_x']:.2f}x, "
                     f"llm {x['llm_latency_x']:.2f}x, sustained throughput {x['throughput_x']:.2f}x")
        a = r.get("runtime_vs_reference")
        if a:
            lines.append(f"runtime vs reference labels: top label {a['top_label_agreement']:.0%} of {a['windows']} "
                         f"windows, KL mean {a['kl_mean']:.1e} max {a['kl_max']:.1e}")
    for row in report.get("scaling", []):
        lines.append(f"scaling W={row['window_s']:.0f}s: frames {row['face_frames']}, window {row['window_ms']:.1f} ms, "
                     f"bound {row['pipelined_estimates_per_s']:.1f}/s with stages on separate units, "
                     f"min hop {row['min_hop_s']:.3f} s")
    for row in report.get("streams", []):
        lines.append(f"streams {row['streams']}: encoders one window per run {row['encoders_ms']:.1f} ms / batched "
                     f"{row['encoders_batched_ms']:.1f} ms, LLM one decode each "
                     f"{row['llm_one_each_ms']:.1f} ms / batched {row['llm_batched_ms']:.1f} ms "
                     f"({row['batched_decode_calls']} call): {row['estimates_per_s']:.2f} / "
                     f"{row['estimates_per_s_batched']:.2f} estimates/s")
    gpu = report.get("gpu_memory_runtime_mb")
    lines.append(f"peak RAM {report['peak_ram_mb']:.0f} MB, GPU memory with the runtime loaded "
                 f"{'n/a (no GPU)' if gpu is None else f'{gpu:.0f} MB'}")
    for name, error in report.get("errors", {}).items():
        lines.append(f"FAILED {name}: {error}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"complete": True, **report}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, path)
    if report.get("scaling"):
        path.with_suffix(".svg").write_text(scaling_svg(report["scaling"], report["preset"]))


def scaling_svg(rows: list, preset: str) -> str:
    """A small line chart: window latency and pipelined estimates/s against window length."""
    width, height, pad = 480, 300, 50
    xs = [r["window_s"] for r in rows]
    series = (("window_ms", "window latency (ms)", "#c0392b"), ("pipelined_estimates_per_s", "estimates/s", "#2471a3"))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{pad}" y="20">edge-emollama {preset}: cost against window length (s)</text>']
    for key, label, colour in series:
        ys = [r[key] for r in rows]
        top = max(ys) * 1.1 or 1
        points = " ".join(f"{pad + (x - xs[0]) / (xs[-1] - xs[0] or 1) * (width - 2 * pad):.1f},"
                          f"{height - pad - y / top * (height - 2 * pad):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - pad - 150}" y="{40 + 14 * series.index((key, label, colour))}" '
                     f'fill="{colour}">{label} (max {max(ys):.1f})</text>')
    for x in xs:
        px = pad + (x - xs[0]) / (xs[-1] - xs[0] or 1) * (width - 2 * pad)
        parts.append(f'<text x="{px:.0f}" y="{height - pad + 16}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>')
    return "\n".join(parts + ["</svg>"])
