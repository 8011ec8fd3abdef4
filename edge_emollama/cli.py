"""The ``edge-emollama`` command: export, run, listen, bench."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import EdgeEmollamaError

log = logging.getLogger("edge_emollama")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="checkpoints -> ONNX / TensorRT / GGUF artifacts + manifest")
    p.add_argument("--preset", help="tiny | emotion-llama (default: model.preset)")
    p.add_argument("--checkpoints", help="folder with the user's checkpoint files (docs/checkpoints.md)")
    p.add_argument("--out", help="output folder (default: export.out)")
    p.add_argument("--formats", nargs="+", help="onnx onnx-fp16 tensorrt gguf, or auto (default)")
    p.add_argument("--quant", nargs="*", help="GGUF quantizations besides F16 (default: Q8_0 Q4_K_M)")
    p.add_argument("--features", choices=("real", "zeros"), help="MAE and VideoMAE features real or zeros")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (speed checks, no checkpoints)")
    p.add_argument("--validate", action="store_true", help="full parity report (100 windows) saved beside the manifest")
    p.add_argument("--seed", type=int, help="validation seed (default: fresh each run, recorded in the report)")


def _cmd_export(args, cfg) -> int:
    from .export.pipeline import export

    out = export(cfg, validate=args.validate, random_weights=args.random_weights)
    print(f"artifacts written to {out}")
    return 0


def _overrides(args) -> dict:
    o = {"model.preset": getattr(args, "preset", None), "export.out": getattr(args, "out", None),
         "export.formats": getattr(args, "formats", None), "export.quant": getattr(args, "quant", None),
         "export.checkpoints.folder": getattr(args, "checkpoints", None),
         "export.validation.seed": getattr(args, "seed", None)}
    if getattr(args, "features", None):
        o["model.features.mae"] = o["model.features.videomae"] = args.features
    if getattr(args, "preset", None) and not getattr(args, "out", None):
        o["export.out"] = f"artifacts/{args.preset}"
    return o


def _commands() -> dict:
    from . import commands as c

    return {"export": (_export_parser, _cmd_export), "run": (c.add_run_parser, c.cmd_run),
            "listen": (c.add_listen_parser, c.cmd_listen), "explain": (c.add_explain_parser, c.cmd_explain),
            "demo": (c.add_demo_parser, c.cmd_demo), "bench": (c.add_bench_parser, c.cmd_bench)}


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-emollama", description=__doc__)
    parser.add_argument("--config", help="config.yaml (default: built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _commands()
    for add, _ in commands.values():
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gguf").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        from .config import load_config

        cfg = load_config(args.config, _overrides(args))
        return commands[args.command][1](args, cfg)
    except EdgeEmollamaError as exc:
        print(f"edge-emollama {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-emollama {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
