"""The runtime's commands: run, listen, explain, demo (wired into edge_emollama.cli)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import Config
from .errors import InputError

log = logging.getLogger("edge_emollama")
UNTRAINED = ("NOTE: the tiny preset has seeded random weights: it is untrained, so its labels say nothing about "
             "the person. Export the emotion-llama preset from your checkpoints for real estimates.")


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="camera/microphone/file -> emotion estimates on ZeroMQ")
    src = p.add_argument_group("sources (at least one)")
    src.add_argument("--camera", help="camera index, /dev/videoN or stream URL")
    src.add_argument("--mic", nargs="?", const="default",
                     help="microphone (PyAudio index or name; default input); with --camera the default input is "
                          "used unless --no-mic")
    src.add_argument("--no-mic", action="store_true", help="with --camera: video only")
    src.add_argument("--video", help="a video file with its audio track")
    src.add_argument("--fast", action="store_true", help="file: as fast as possible, no window dropped")
    src.add_argument("--no-audio", action="store_true", help="file: ignore its audio track (video only)")
    src.add_argument("--no-video", action="store_true", help="file: ignore its video track (audio only)")
    p.add_argument("--artifacts", help="exported folder (default: runtime.artifacts)")
    p.add_argument("--publish", help="PUB endpoint (default: runtime.publish)")
    p.add_argument("--control", help="control endpoint (default: runtime.control)")
    p.add_argument("--subtitle", help="transcript line fed to the prompt")
    p.add_argument("--max-windows", type=int, help="stop after this many windows")
    p.add_argument("--stages", help="run only these stages here, e.g. capture,encode (default: all: "
                                    "capture,encode,llm,publish)")
    p.add_argument("--link", action="append", default=[], metavar="NAME=ENDPOINT",
                   help="stage link endpoint (windows, rows, scores), e.g. rows=tcp://0.0.0.0:6001; the producing "
                        "side binds, the consuming side connects (repeatable)")
    p.add_argument("--quiet", action="store_true", help="do not print estimates")


def run_options(args, cfg: Config):
    from .runtime.control import ControlOptions
    from .runtime.device import resolve
    from .runtime.fusion import FusionOptions
    from .runtime.pipeline import RunOptions
    from .runtime.publish import PublisherOptions
    from .runtime.sources import FileOptions
    from .runtime.windows import WindowOptions
    from .spec import get_preset

    r = cfg.runtime
    artifacts = args.artifacts or r.artifacts
    spec = get_preset(_manifest_preset(artifacts))
    return RunOptions(
        artifacts=artifacts, camera=args.camera, microphone=_microphone(args), video=args.video,
        realtime=not args.fast,
        file=FileOptions(video=not args.no_video, audio=not args.no_audio),
        subtitle=args.subtitle if args.subtitle is not None else r.subtitle, providers=r.providers,
        threads=r.threads, quant=resolve("quant", r.quant, _exported_quants(artifacts)),
        precision=resolve("precision", r.precision),
        n_gpu_layers=resolve("n_gpu_layers", "auto" if r.n_gpu_layers is None else r.n_gpu_layers),
        window=WindowOptions.for_spec(spec, window_s=r.window_s, hop_s=r.hop_s, frame_rule=cfg.model.frame_rule),
        fusion=FusionOptions(method=r.smoothing, time_constant_s=r.time_constant_s,
                             switch_margin=r.hysteresis_margin, switch_windows=r.hysteresis_windows),
        publisher=PublisherOptions(endpoint=args.publish or r.publish, sndhwm=r.sndhwm),
        control=ControlOptions(endpoint=args.control or r.control), reasoning=r.reasoning,
        reason_tokens=r.reason_tokens, max_windows=args.max_windows, **_stage_options(args),
        on_estimate=None if args.quiet else print_estimate)


def _microphone(args) -> str | None:
    """--mic as given; with a camera and no --mic, the default input unless --no-mic."""
    if args.mic is not None:
        return args.mic
    return "default" if args.camera is not None and not args.no_mic else None


def _stage_options(args) -> dict:
    from .runtime.pipeline import LINKS

    options = {}
    if getattr(args, "stages", None):
        options["stages"] = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    links = {}
    for spec in getattr(args, "link", []) or []:
        name, _, endpoint = spec.partition("=")
        if name not in LINKS or not endpoint:
            raise InputError(f"--link {spec}: use NAME=ENDPOINT with NAME one of {', '.join(LINKS)}")
        links[name] = endpoint
    options["links"] = links
    return options


def _exported_quants(folder: str) -> set:
    from .runtime.artifacts import load_artifacts

    return {e["quant"] for e in load_artifacts(folder, verify=False).entries(format="gguf")}


def _manifest_preset(folder: str) -> str:
    from .runtime.artifacts import load_artifacts

    return load_artifacts(folder, verify=False).preset


def print_estimate(fused, item) -> None:
    face = "face" if item["presence"]["face"]["present"] else "no face"
    audio = "audio" if item["presence"]["audio"]["present"] else "no audio"
    top = sorted(zip(fused.smoothed, fused.labels), reverse=True)[:3]
    print(f"window {item['index']:4d} [{face}, {audio}] {fused.dominant:9s} " +
          "  ".join(f"{label} {p:.2f}" for p, label in top), flush=True)


def run_pipeline(options, announce: str = "") -> int:
    """Start, wait for the end of the input or a signal, stop cleanly. A second signal exits at once."""
    from .runtime.pipeline import Pipeline

    pipeline = Pipeline(options)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            os._exit(128 + signum)
        stopping.set()
        print(f"\nstopping (signal {signum}); a second signal exits at once", file=sys.stderr, flush=True)
        pipeline.stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipeline.start()
        log.info("publishing on %s, control on %s%s", pipeline.publisher.endpoint if pipeline.publisher else "-",
                 options.control.endpoint, announce)
        while not pipeline.wait(timeout_s=0.5):
            if pipeline.stop_event.is_set():
                break
        pipeline.stop()
        pipeline.raise_errors()
        log.info("stopped after %d estimates", pipeline.published)
        return 0
    finally:
        pipeline.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def cmd_run(args, cfg: Config) -> int:
    capture = not args.stages or "capture" in args.stages
    if capture and not (args.camera or args.mic or args.video):
        raise InputError("no source: give --camera 0, --mic or --video FILE (or try 'edge-emollama demo')")
    options = run_options(args, cfg)
    if _manifest_preset(options.artifacts) == "tiny":
        print(UNTRAINED, file=sys.stderr)
    return run_pipeline(options)


def add_listen_parser(sub) -> None:
    p = sub.add_parser("listen", help="subscribe, validate against the schema, print")
    p.add_argument("endpoint", nargs="?", help="publisher endpoint (default: runtime.publish)")
    p.add_argument("-n", "--count", type=int, help="stop after this many estimates")
    p.add_argument("-t", "--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--status", action="store_true", help="also print the ~1 Hz status messages")


def cmd_listen(args, cfg: Config) -> int:
    from .runtime.listen import main as listen_main

    argv = [args.endpoint or cfg.runtime.publish]
    argv += ["--count", str(args.count)] if args.count else []
    argv += ["--timeout", str(args.timeout)] if args.timeout else []
    argv += ["--status"] if args.status else []
    return listen_main(argv)


def add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="ask a running runtime for the [reason] explanation of the latest window")
    p.add_argument("--control", help="control endpoint (default: runtime.control)")
    p.add_argument("--subtitle", help="transcript line to reason with")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the text")


def cmd_explain(args, cfg: Config) -> int:
    """Subscribe to the reason topic first (PUB/SUB drops what is sent before the subscription), then ask."""
    import json
    import time

    from .lazy import require
    from .runtime.control import request
    from .runtime.publish import TOPICS

    zmq = require("zmq")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, TOPICS["reason"])
    sub.connect(cfg.runtime.publish)
    try:
        time.sleep(0.3)
        ask = {"verb": "explain", **({"subtitle": args.subtitle} if args.subtitle else {})}
        reply = request(args.control or cfg.runtime.control, ask, timeout_s=5.0)
        result = reply.get("result") or {}
        if not reply.get("ok") or not result.get("request_id"):
            raise InputError(f"explain refused: {reply.get('error') or result.get('message')}")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if sub.poll(200):
                _, _, payload = sub.recv_multipart()
                payload = json.loads(payload)
                if payload.get("request_id") == result["request_id"] and payload.get("final"):
                    print(payload["text"])
                    return 0
        raise InputError(f"no explanation arrived within {args.timeout} s (request {result['request_id']})")
    finally:
        sub.close(0)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="no camera, microphone, GPU or checkpoints: tiny preset on a generated clip")
    p.add_argument("--artifacts", default="artifacts/tiny", help="where the tiny export lives (made if missing)")
    p.add_argument("--clip", default="artifacts/sample-clip.mp4", help="sample clip (generated if missing)")


def cmd_demo(args, cfg: Config) -> int:
    from .runtime.artifacts import MANIFEST
    from .runtime.sample_clip import write_sample_clip

    if not (Path(args.artifacts) / MANIFEST).is_file():
        from .export.pipeline import export

        log.info("no export at %s: exporting the tiny preset first (about 20 s)", args.artifacts)
        cfg.model.preset, cfg.export.out = "tiny", args.artifacts
        export(cfg, validate=False)
    if not Path(args.clip).is_file():
        Path(args.clip).parent.mkdir(parents=True, exist_ok=True)
        write_sample_clip(args.clip)
        log.info("wrote the sample clip %s (a drawn face and a voice)", args.clip)
    run_args = argparse_namespace(artifacts=args.artifacts, video=args.clip)
    print(UNTRAINED, file=sys.stderr)
    announce = f"; watch with: edge-emollama listen {cfg.runtime.publish}"
    return run_pipeline(run_options(run_args, cfg), announce)


def argparse_namespace(**values):
    import argparse

    defaults = dict(camera=None, mic=None, no_mic=False, video=None, fast=False, no_audio=False, no_video=False,
                    artifacts=None, publish=None, control=None, subtitle=None, max_windows=None, quiet=False,
                    stages=None, link=[])
    return argparse.Namespace(**{**defaults, **values})


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="per-stage latency, throughput, clip run; --reference side by side")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--preset", help="tiny | mid | emotion-llama: export into artifacts/bench-PRESET if missing")
    where.add_argument("--artifacts", help="an exported folder")
    p.add_argument("--random-weights", action="store_true", help="emotion-llama shapes with random weights")
    p.add_argument("--reference", action="store_true", help="also time the PyTorch reference on the same inputs")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="cost against window length (table + SVG plot)")
    p.add_argument("--no-clip", action="store_true", help="skip the whole-runtime clip runs")
    p.add_argument("--json", help="where to write the figures (default bench-results/bench-PRESET.json)")


def cmd_bench(args, cfg: Config) -> int:
    from .runtime.artifacts import MANIFEST
    from .runtime.bench import BenchOptions, format_report, run_bench, write_report
    from .runtime.device import resolve

    folder = args.artifacts or f"artifacts/bench-{args.preset or cfg.model.preset}"
    if not args.artifacts and not (Path(folder) / MANIFEST).is_file():
        from .export.pipeline import export

        cfg.model.preset, cfg.export.out = args.preset or cfg.model.preset, folder
        export(cfg, validate=False, random_weights=args.random_weights)
    r = cfg.runtime
    options = BenchOptions(artifacts=folder, windows=args.windows, reference=args.reference, threads=r.threads,
                           precision=resolve("precision", r.precision),
                           quant=resolve("quant", r.quant, _exported_quants(folder)),
                           n_gpu_layers=resolve("n_gpu_layers", "auto" if r.n_gpu_layers is None else r.n_gpu_layers),
                           providers=tuple(r.providers), clip=not args.no_clip, sweep=args.sweep,
                           progress=args.json)
    report = run_bench(options)
    print(format_report(report))
    out = Path(args.json or f"bench-results/bench-{report['preset']}.json")
    write_report(report, out)
    print(f"figures written to {out}")
    return 1 if report["errors"] else 0
