"""What each ``edge-emollama`` command does (the parsers are cli.py's): ``command(args, cfg) -> exit status``.
``args.settings`` holds the configuration keys the command line set.

Every command gets the configuration with the command line's overrides already applied; the exporter, the
bench and the sample clip are imported only by the commands that use them (they need torch or PyAV).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .client import explain, listen
from .config import Config, RuntimeConfig
from .errors import ConfigError, InputError
from .manifest import MANIFEST, VERSION, Artifacts, load_artifacts
from .progress import Progress
from .protocol import ALL
from .security import ClientKeys, load_client_keys, write_keys
from .runtime.pipeline import Pipeline

log = logging.getLogger("edge_emollama")
UNTRAINED = ("NOTE: the tiny preset has seeded random weights: it is untrained, so its labels say nothing about "
             "the person. Export the emotion-llama preset from your checkpoints for real estimates.")


def cmd_export(args, cfg: Config) -> int:
    from .export.pipeline import export

    if _given(args, "model.preset") and not _given(args, "export.out"):
        cfg.export.out = f"artifacts/{cfg.model.preset}"
    out = export(cfg, validate=args.validate, random_weights=args.random_weights)
    print(f"artifacts written to {out}")
    return 0


def _given(args, key: str) -> bool:
    """Whether the command line set configuration key ``key`` (cli.py records them as ``args.settings``)."""
    return key in getattr(args, "settings", {})


def print_estimate(fused, item) -> None:
    presence = item.presence
    source, face_id = item.stamp.stream
    who = f"{source}/{'scene' if face_id is None else f'face-{face_id}'}"
    audio = "audio" if presence.audio else "no audio"
    top = sorted(zip(fused.smoothed, fused.labels), reverse=True)[:3]
    print(f"window {item.index:4d} {who} [{audio}] {fused.dominant:9s} " +
          "  ".join(f"{label} {p:.2f}" for p, label in top), flush=True)


class _FileProgress:
    """The windows of a file run done so far, as a progress bar (runtime sources that are files only)."""

    def __init__(self):
        self.bar, self._done = None, {}   # source -> windows done (its newest index + 1)

    def start(self, pipeline: Pipeline, runtime: RuntimeConfig, enabled: bool) -> None:
        if pipeline.capture is None or not enabled:
            return
        total = pipeline.capture.file_windows(pipeline.plan.window_s, pipeline.plan.hop_s)
        if total is not None:
            names = ", ".join(Path(v).name for v in runtime.sources.video)
            self.bar = Progress(total, f"run {names}", "windows").start()

    def __call__(self, item) -> None:
        if self.bar is None:
            return
        source, done = item.stamp.source, item.index + 1
        if done > self._done.get(source, 0):
            self.bar.update(done - self._done.get(source, 0))
            self._done[source] = done

    def close(self, failed: bool) -> None:
        if self.bar is not None:
            self.bar.close(failed=failed)


def run_pipeline(runtime: RuntimeConfig, artifacts: Artifacts, *, quiet: bool = False,
                 max_windows: int | None = None) -> int:
    """Start, wait for the end of the input or a signal, stop cleanly. A second signal exits at once.
    Files show a progress bar on stderr when the estimates are not printed to a terminal (--quiet, or stdout
    redirected)."""
    progress = _FileProgress()

    def on_estimate(fused, item):
        if not quiet:
            print_estimate(fused, item)
        progress(item)

    pipeline = Pipeline(runtime, artifacts, on_estimate=on_estimate, max_windows=max_windows)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            os._exit(128 + signum)
        stopping.set()
        print(f"\nstopping (signal {signum}); a second signal exits at once", file=sys.stderr, flush=True)
        pipeline.stop_event.set()

    # SIGHUP (a closed terminal, a supervisor's reload) stops cleanly too, with the final status
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        pipeline.start()
        log.info("publishing on %s, control on %s", pipeline.publisher.endpoint if pipeline.publisher else "-",
                 runtime.control.endpoint)
        progress.start(pipeline, runtime, enabled=quiet or not sys.stdout.isatty())
        while not pipeline.wait(timeout_s=0.5):
            if pipeline.stop_event.is_set():
                break
        pipeline.stop()
        progress.close(failed=bool(pipeline.errors) or stopping.is_set())
        pipeline.raise_errors()
        log.info("stopped after %d estimates", pipeline.published)
        return 0
    finally:
        pipeline.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def sources_of(args, runtime: RuntimeConfig):
    """The sources to open: as configured, and a camera given on the command line brings the default
    microphone unless --no-mic (or --mic) says otherwise."""
    sources = runtime.sources
    if sources.camera and sources.microphone is None and not args.no_mic and _given(
            args, "runtime.sources.camera"):
        sources = dataclasses.replace(sources, microphone="default")
    return sources


def cmd_run(args, cfg: Config) -> int:
    runtime = cfg.runtime
    runtime.sources = sources = sources_of(args, runtime)
    if "capture" in runtime.stages and not sources.any:
        raise InputError("no source: give --camera 0, --mic or --video FILE (or try 'edge-emollama demo')")
    artifacts = load_artifacts(runtime.artifacts)
    if artifacts.manifest.preset == "tiny":
        print(UNTRAINED, file=sys.stderr)
    return run_pipeline(runtime, artifacts, quiet=args.quiet, max_windows=args.max_windows)


def client_keys(args, cfg: Config) -> ClientKeys | None:
    """The CURVE keys of --curve DIR --client NAME (both or neither), or None."""
    folder, name = cfg.runtime.security.curve, args.client
    if folder is None and name is None:
        return None
    if folder is None or name is None:
        raise ConfigError("--curve DIR and --client NAME go together: DIR holds server.key and "
                          "clients/NAME.key_secret (from: edge-emollama keys DIR --client NAME)")
    return load_client_keys(folder, name)


def cmd_listen(args, cfg: Config) -> int:
    """Exit status: 0 fine, 1 some message did not validate, 2 nothing arrived before the timeout."""
    keys = client_keys(args, cfg)
    result = listen(cfg.runtime.publish.endpoint, args.count, args.timeout, topics=tuple(args.topic or (ALL,)),
                    show_status=args.status, keys=keys, as_json=args.json)
    if result.invalid:
        return 1
    if result.messages == 0:
        print(f"nothing arrived from {cfg.runtime.publish.endpoint}: is the runtime running there"
              + (", and is this client's key in its DIR/clients/?" if keys else
                 " (a runtime started with --curve sends only to --curve DIR --client NAME)?"), file=sys.stderr)
        return 2
    return 0


def cmd_explain(args, cfg: Config) -> int:
    print(explain(cfg.runtime.control.endpoint, cfg.runtime.publish.endpoint, args.subtitle, args.timeout,
                  keys=client_keys(args, cfg), person=_person(args.person)))
    return 0


def _person(text: str | None) -> tuple | None:
    """``hall/face-1`` -> ("hall", 1); ``hall/scene`` -> ("hall", None); None -> None."""
    if text is None:
        return None
    source, _, who = text.partition("/")
    if who == "scene":
        return source, None
    if who.startswith("face-") and who[5:].isdigit():
        return source, int(who[5:])
    raise InputError(f"--person {text!r}: use SOURCE/face-ID or SOURCE/scene, e.g. hall/face-1 (the topic's "
                     "last two parts)")


def cmd_keys(args, cfg: Config) -> int:
    folder = Path(args.folder)
    kept = (folder / "server.key_secret").exists()
    for path in write_keys(folder, args.client):
        print(f"wrote {path}")
    if kept:
        print(f"kept the existing server key pair in {folder}")
    print(f"run the robot with: edge-emollama run --curve {folder} ...; give each client {folder}/server.key and "
          f"its clients/NAME.key_secret (then: edge-emollama listen --curve DIR --client NAME)")
    return 0


def cmd_eval(args, cfg: Config) -> int:
    from .tools.evaluate import EvalOptions, evaluate, format_summary

    report = evaluate(EvalOptions(runtime=cfg.runtime, clips=args.clips, labels=args.labels, json=args.json,
                                  png=args.png, limit=args.limit))
    print(format_summary(report))
    return 0


def cmd_report(args, cfg: Config) -> int:
    from .tools.report import write_report

    out = write_report(args.session, args.out, utc=args.utc)
    print(f"report written to {out}")
    return 0


def _older_tiny_export(folder: Path) -> bool:
    """A tiny export with seeded random weights whose manifest an older version wrote (the demo redoes it)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and data.get("preset") == "tiny" and data.get("version") != VERSION
            and (data.get("source") or {}).get("weights") == "seeded random")


def cmd_demo(args, cfg: Config) -> int:
    """The tiny export on a generated clip in real time, with a header, the estimates, and what to try next."""
    from .tools.sample_clip import write_sample_clip

    folder = Path(args.artifacts)
    stale = _older_tiny_export(folder)
    if stale or not (folder / MANIFEST).is_file():
        if not stale and (folder.exists() or "tiny" not in folder.name):   # never write a tiny export elsewhere
            load_artifacts(folder)                           # says what the folder is and which export it needs
        from .export.pipeline import export

        log.info("%s at %s: exporting the tiny preset first (about 20 s)",
                 "a tiny export of an older version" if stale else "no export", args.artifacts)
        cfg.model.preset, cfg.export.out = "tiny", args.artifacts
        export(cfg, validate=False)
    clip = Path(args.clip or f"artifacts/sample-clip-{args.seconds:g}s.mp4")
    if not clip.is_file():
        clip.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing a %g s sample clip (a drawn face and a voice) to %s", args.seconds, clip)
        write_sample_clip(clip, seconds=args.seconds)
    runtime = cfg.runtime
    runtime.artifacts, runtime.sources.video = args.artifacts, [str(clip)]
    print(_demo_header(runtime, clip), file=sys.stderr, flush=True)
    code = run_pipeline(runtime, load_artifacts(args.artifacts))
    print(_demo_next_steps(runtime), file=sys.stderr)
    return code


def _demo_header(runtime: RuntimeConfig, clip: Path) -> str:
    return "\n".join([
        "edge-emollama demo: the tiny preset on a generated clip, in real time (Ctrl-C stops)", UNTRAINED,
        f"  clip       {clip}", f"  estimates  {runtime.publish.endpoint}   (in another terminal: "
        f"edge-emollama listen {runtime.publish.endpoint})",
        f"  control    {runtime.control.endpoint}   (edge-emollama explain --control {runtime.control.endpoint}:"
        " the tiny model's words are as meaningless as its labels)",
        "  columns    window [face, audio] dominant-label  top-3 smoothed probabilities", ""])


def _demo_next_steps(runtime: RuntimeConfig) -> str:
    return "\n".join(["", "next:",
                      "  edge-emollama run --video YOUR.mp4 --record session.jsonl   then   edge-emollama report "
                      "session.jsonl",
                      "  edge-emollama run --camera 0                                 your camera and microphone",
                      "  edge-emollama export --preset emotion-llama --checkpoints DIR   real estimates "
                      "(docs/checkpoints.md)"])


def cmd_bench(args, cfg: Config) -> int:
    from .tools.bench import BenchOptions, format_report, run_bench, write_report

    preset = args.preset or cfg.model.preset
    folder = args.artifacts or _existing_export(preset) or f"artifacts/bench-{preset}"
    if not args.artifacts and not (Path(folder) / MANIFEST).is_file():
        from .export.pipeline import export

        cfg.model.preset, cfg.export.out = args.preset or cfg.model.preset, folder
        export(cfg, validate=False, random_weights=args.random_weights)
    cfg.runtime.artifacts = folder
    options = BenchOptions(runtime=cfg.runtime, windows=args.windows, reference=args.reference,
                           clip=not args.no_clip, sweep=args.sweep, progress=args.json, streams=args.streams)
    report = run_bench(options)
    print(format_report(report))
    out = Path(args.json or f"artifacts/bench-{report['preset']}.json")   # bench-results/ holds the kept figures
    write_report(report, out)
    print(f"figures written to {out}")
    return 1 if report["errors"] else 0


def _existing_export(preset: str) -> str | None:
    """artifacts/PRESET when it holds an export of that preset (the bench then does not export again)."""
    folder = Path("artifacts") / preset
    try:
        return str(folder) if load_artifacts(folder, verify=False).manifest.preset == preset else None
    except EdgeEmollamaError:
        return None


COMMANDS = {"export": cmd_export, "run": cmd_run, "listen": cmd_listen, "explain": cmd_explain,
            "eval": cmd_eval, "report": cmd_report, "demo": cmd_demo, "bench": cmd_bench, "keys": cmd_keys}
