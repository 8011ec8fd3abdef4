"""The ``edge-emollama`` command: every parser is built here; the commands themselves are in commands.py.

- Global options (``--config``, ``-v``, ``--log``) are accepted before or after the subcommand.
- An option that sets configuration names its key where it is declared (:func:`_setting`); the parsed values
  become ``load_config`` overrides, so a flag and a config.yaml key can never mean different things.
- Exit status: 0 done, 2 bad input (one line naming the thing and the fix), 1 an internal error (a bug: its
  traceback under ``-v`` and in the ``--log`` file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import commands
from .config import load_config
from .errors import EdgeEmollamaError

log = logging.getLogger("edge_emollama")
SETTING = "setting:"     # dest prefix of the options that set a configuration key
_HANDLERS: list = []     # the log handlers main() installed (replaced on the next call)


def _setting(parser, *flags, key, **kwargs):
    """An option whose value overrides the configuration key ``key`` (a tuple sets several to one value)."""
    keys = key if isinstance(key, tuple) else (key,)
    dest = SETTING + ",".join(keys)
    if not flags[0].startswith("-"):   # a positional: its name is its dest
        kwargs.setdefault("metavar", flags[0].upper())
        return parser.add_argument(dest, **kwargs)
    kwargs.setdefault("dest", dest)
    if kwargs.get("action") not in ("store_true", "store_false", "store_const"):
        kwargs.setdefault("metavar", flags[-1].lstrip("-").upper().replace("-", "_"))
    return parser.add_argument(*flags, **kwargs)


def _links(text: str) -> tuple:
    name, _, endpoint = text.partition("=")
    if not name or not endpoint:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=ENDPOINT, e.g. rows=tcp://127.0.0.1:6001")
    return name, endpoint


def _counts(text: str) -> tuple:
    try:
        counts = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give stream counts from 1 to 16, e.g. 1,2,4,8")
    return counts


def _stage_list(text: str) -> list:
    return [s.strip() for s in text.split(",") if s.strip()]


def _endpoints(p, publish: bool = True, control: bool = True) -> None:
    if publish:
        _setting(p, "--publish", key="runtime.publish.endpoint", help="PUB endpoint (default: runtime.publish.endpoint)")
    if control:
        _setting(p, "--control", key="runtime.control.endpoint",
                 help="control endpoint (default: runtime.control.endpoint)")


def _serve_securely(p) -> None:
    """The bind policy of a command that serves sockets (docs/security.md)."""
    _setting(p, "--curve", key="runtime.security.curve", metavar="DIR",
             help="encrypt with CURVE and accept only the client keys in DIR/clients/ (from: edge-emollama keys DIR)")
    _setting(p, "--insecure", key="runtime.security.insecure", action="store_const", const=True,
             help="allow binding beyond loopback without CURVE (unencrypted: trusted networks only)")


def _connect_securely(p) -> None:
    """The keys a client connects with."""
    _setting(p, "--curve", key="runtime.security.curve", metavar="DIR",
             help="connect with CURVE: DIR holds server.key and clients/NAME.key_secret")
    p.add_argument("--client", metavar="NAME", help="with --curve: the client key pair DIR/clients/NAME.key_secret")


def _export_parser(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="checkpoints -> ONNX / TensorRT / GGUF artifacts + manifest")
    _setting(p, "--preset", key="model.preset", help="tiny | mid | emotion-llama (default: model.preset)")
    _setting(p, "--checkpoints", key="export.checkpoints.folder",
             help="folder with the user's checkpoint files (docs/checkpoints.md)")
    _setting(p, "--out", key="export.out", help="output folder (default: export.out, or artifacts/PRESET)")
    _setting(p, "--formats", key="export.formats", nargs="+", help="onnx onnx-fp16 tensorrt gguf, or auto (default)")
    _setting(p, "--quant", key="export.quant", nargs="*", help="GGUF quantizations besides F16 (default: Q8_0 Q4_K_M)")
    _setting(p, "--features", key=("model.features.mae", "model.features.videomae"), choices=("real", "zeros"),
             help="MAE and VideoMAE features real or zeros")
    _setting(p, "--seed", key="export.validation.seed", type=int,
             help="validation seed (default: fresh each run, recorded in the report)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (speed checks, no checkpoints)")
    p.add_argument("--validate", action="store_true", help="full parity report (100 windows) saved beside the manifest")


def _run_parser(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help="camera/microphone/file -> emotion estimates on ZeroMQ")
    src = p.add_argument_group("sources (at least one)")
    _setting(src, "--camera", key="runtime.sources.camera", action="append", metavar="[NAME=]CAMERA",
             help="camera index, /dev/videoN or stream URL; repeat for several cameras, each a source named NAME "
                  "(default: camera<index>, video<N>, camera)")
    _setting(src, "--mic", key="runtime.sources.microphone", nargs="?", const="default",
             help="microphone (PyAudio index or name; default input); with --camera the default input is used "
                  "unless --no-mic")
    src.add_argument("--no-mic", action="store_true", help="with --camera: video only")
    _setting(src, "--video", key="runtime.sources.video", action="append", metavar="[NAME=]FILE",
             help="a video file with its audio track; repeat for several files, each a source named NAME "
                  "(default: the file's stem)")
    _setting(src, "--fast", key="runtime.sources.realtime", action="store_const", const=False,
             help="file: as fast as possible, no window dropped")
    _setting(src, "--no-audio", key="runtime.file.audio", action="store_const", const=False,
             help="file: ignore its audio track (video only)")
    _setting(src, "--no-video", key="runtime.file.video", action="store_const", const=False,
             help="file: ignore its video track (audio only)")
    _setting(p, "--artifacts", key="runtime.artifacts", help="exported folder (default: runtime.artifacts)")
    _endpoints(p)
    _setting(p, "--subtitle", key="runtime.subtitle", help="a fixed transcript line for the prompt (overrides --asr)")
    _setting(p, "--asr", key="runtime.asr.model",
             help="speech recognition for the prompt: bundled (the asr extra's Whisper model), a faster-whisper "
                  "model directory or name (default: runtime.asr.model, off)")
    _setting(p, "--stages", key="runtime.stages", type=_stage_list,
             help="run only these stages here, e.g. capture,encode (default: capture,encode,llm,publish)")
    p.add_argument("--link", action="append", type=_links, default=[], metavar="NAME=ENDPOINT",
                   help="stage link endpoint (windows, rows, scores), e.g. rows=tcp://127.0.0.1:6001; the producing "
                        "side binds, the consuming side connects (repeatable)")
    _serve_securely(p)
    out = p.add_argument_group("outputs besides the PUB socket (docs/outputs.md)")
    _setting(out, "--record", key="runtime.outputs.record", metavar="FILE",
             help="record every message to FILE, one JSON object a line (FILE.partial until the run ends)")
    _setting(out, "--lsl", key="runtime.outputs.lsl", action="store_const", const=True,
             help='a Lab Streaming Layer outlet of type "Emotion" (pip install -e ".[lsl]")')
    _setting(out, "--psi", key="runtime.outputs.psi", metavar="ENDPOINT",
             help="a second PUB socket in \\psi's two-frame format, e.g. tcp://127.0.0.1:5557")
    _setting(out, "--annotate", key="runtime.outputs.annotate", metavar="FILE",
             help="write the video with face boxes, ids and label bars to FILE (.mp4 or .avi; one file per source)")
    _setting(out, "--preview", key="runtime.outputs.preview", action="store_const", const=True,
             help="show the annotated video in a window (needs a display and opencv-python, not -headless)")
    p.add_argument("--max-windows", type=int, help="stop after this many windows")
    p.add_argument("--quiet", action="store_true", help="do not print estimates")


def _listen_parser(sub, common) -> None:
    p = sub.add_parser("listen", parents=[common], help="subscribe, validate against the schema, print")
    _setting(p, "endpoint", key="runtime.publish.endpoint", nargs="?", default=None,
             help="publisher endpoint (default: runtime.publish.endpoint)")
    p.add_argument("-n", "--count", type=int, help="stop after this many estimates")
    p.add_argument("-t", "--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--status", action="store_true", help="also print the ~1 Hz status messages")
    p.add_argument("--topic", action="append", help="subscribe to this topic prefix (repeatable; default all of v1)")
    p.add_argument("--json", action="store_true",
                   help='print each message as one JSON object a line: {"topic", "header", "payload"}')
    _connect_securely(p)


def _explain_parser(sub, common) -> None:
    p = sub.add_parser("explain", parents=[common],
                       help="ask a running runtime for the [reason] explanation of the latest window")
    _endpoints(p)
    p.add_argument("--subtitle", help="transcript line to reason with")
    p.add_argument("--person", metavar="SOURCE/FACE",
                   help="that person's newest window, e.g. hall/face-1 or hall/scene (default: the newest of anyone)")
    p.add_argument("-t", "--timeout", type=float, default=30.0, help="seconds for the whole request (default 30)")
    _connect_securely(p)


def _eval_parser(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help="the paper's protocol on labelled clips: accuracy, weighted F1, "
                                                       "confusion matrix")
    _setting(p, "--artifacts", key="runtime.artifacts", help="exported folder (default: runtime.artifacts)")
    p.add_argument("--clips", required=True, help="folder of clips NAME.mp4 / .avi / .mov / .mkv")
    p.add_argument("--labels", required=True, help="CSV name,label[,subtitle] or Emotion-LLaMA's annotation text "
                                                   "(name frames label score per line)")
    p.add_argument("--json", help="where to write the figures (default: print only)")
    p.add_argument("--png", help="confusion matrix picture (default: beside --json)")
    _setting(p, "--asr", key="runtime.asr.model", help="subtitles by speech recognition where the labels have none")
    p.add_argument("--limit", type=int, help="evaluate only the first N clips")


def _report_parser(sub, common) -> None:
    p = sub.add_parser("report", parents=[common], help="a recording of run --record -> a PNG or HTML report")
    p.add_argument("session", metavar="SESSION.jsonl", help="a recording (run --record FILE; a .partial one too)")
    p.add_argument("--out", help="report.png or report.html (default: SESSION.png beside the recording)")
    p.add_argument("--utc", action="store_true", help="UTC times on the time axis (default: seconds from the start)")


def _demo_parser(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common],
                       help="no camera, microphone, GPU or checkpoints: tiny preset on a generated clip")
    p.add_argument("--artifacts", default="artifacts/tiny", help="where the tiny export lives (made if missing)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the generated clip plays, in real time (default 60; Ctrl-C stops earlier)")
    p.add_argument("--clip", help="a clip to play instead (default: artifacts/sample-clip-SECONDSs.mp4, generated)")
    _endpoints(p)
    _serve_securely(p)


def _keys_parser(sub, common) -> None:
    p = sub.add_parser("keys", parents=[common], help="CURVE keys: the runtime's pair and one per client "
                                                       "(docs/security.md)")
    p.add_argument("folder", metavar="DIR", help="where to write server.key(_secret) and clients/NAME.key(_secret)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="a client key pair to allow-list (repeatable); existing secrets are never overwritten")


def _bench_parser(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common], help="per-stage latency, throughput, clip run; --reference "
                                                        "side by side")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--preset", help="tiny | mid | emotion-llama: artifacts/PRESET if it holds one, else exported "
                                         "into artifacts/bench-PRESET")
    where.add_argument("--artifacts", help="an exported folder")
    p.add_argument("--random-weights", action="store_true", help="emotion-llama shapes with random weights")
    p.add_argument("--reference", action="store_true", help="also time the PyTorch reference on the same inputs")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="cost against window length (table + SVG plot)")
    p.add_argument("--streams", type=_counts, default=(), metavar="N,N,...",
                   help="estimates/s for N concurrent streams, one llama_decode each and batched, e.g. 1,2,4,8")
    p.add_argument("--no-clip", action="store_true", help="skip the whole-runtime clip runs")
    p.add_argument("--json", help="where to write the figures (default artifacts/bench-PRESET.json; "
                                  "bench-results/ keeps the published ones)")


PARSERS = {"export": _export_parser, "run": _run_parser, "listen": _listen_parser, "explain": _explain_parser,
           "eval": _eval_parser, "report": _report_parser, "demo": _demo_parser, "bench": _bench_parser,
           "keys": _keys_parser}


def _global_options(parser, suppress: bool) -> None:
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--config", default=default(None), help="config.yaml (default: built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="debug logging, and the traceback of an internal error")
    parser.add_argument("--log", default=default(None), metavar="FILE",
                        help="also write the full log (debug level, tracebacks included) to FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-emollama", description=__doc__.split("\n")[0])
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)   # after the subcommand too, without resetting what came before
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS.values():
        add(sub, common)
    return parser


def overrides(args) -> dict:
    """{config key: value} of every configuration option given on the command line."""
    out = {}
    for dest, value in vars(args).items():
        if dest.startswith(SETTING) and value is not None:
            for key in dest[len(SETTING):].split(","):
                out[key] = value
    if getattr(args, "link", None):
        out["runtime.links"] = dict(args.link)
    return out


def _logging(args) -> None:
    """Console at INFO (DEBUG with -v), and the --log file at DEBUG; ``None``: remove what was installed."""
    root = logging.getLogger()
    for handler in _HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _HANDLERS.clear()
    if args is None:
        return
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handlers = [console]
    if args.log:
        handlers.append(logging.FileHandler(args.log))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        _HANDLERS.append(handler)
    logging.getLogger("gguf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(args)
    try:
        return _dispatch(args)
    finally:
        _logging(None)   # the handlers this call installed go (main() can be called again in one process)


def _dispatch(args) -> int:
    try:
        args.settings = overrides(args)
        cfg = load_config(args.config, args.settings)
        return commands.COMMANDS[args.command](args, cfg)
    except EdgeEmollamaError as exc:
        print(f"edge-emollama {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-emollama {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # a bug: never relabelled as bad input
        log.debug("internal error in %s", args.command, exc_info=True)   # the --log file (and -v) keep it
        print(f"edge-emollama {args.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.verbose:
            print("this is a bug in edge-emollama: rerun with -v for the traceback and please report it",
                  file=sys.stderr)
        return 1


__all__ = ["main", "build_parser", "overrides"]

if __name__ == "__main__":
    sys.exit(main())
