"""The manifest: the contract between the export stage and the runtime (docs/manifest.md)."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from .. import __version__
from ..prompt import label_pieces
from ..runtime.artifacts import SCHEMA, VERSION, describe_file
from ..spec import (FEATURE_BRANCHES, LABELS, PROMPT_TEMPLATE, REASON_INSTRUCTION, RECOGNITION_INSTRUCTION)
from .context import ExportContext


def tool_versions() -> dict:
    versions = {"edge_emollama": __version__, "python": platform.python_version()}
    for module in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama_cpp", "tensorrt", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            continue
    return versions


def build_manifest(ctx: ExportContext, extra_files: list) -> dict:
    cfg, spec = ctx.cfg, ctx.spec
    return {
        "schema": SCHEMA, "version": VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tools": tool_versions(), "preset": spec.name, "spec": spec.to_dict(), "source": ctx.provenance,
        "labels": list(LABELS), "label_pieces": label_pieces(ctx.tokenizer),
        "prompt": {"template": PROMPT_TEMPLATE, "layout": cfg.model.layout,
                   "recognition_instruction": RECOGNITION_INSTRUCTION, "reason_instruction": REASON_INSTRUCTION,
                   "bos": "double: BOS added and the literal <s> parsed (LlamaTokenizer add_special_tokens=True)"},
        "media": {"rows": spec.media_rows, "order": ["eva_patches"] + list(FEATURE_BRANCHES) + ["eva_cls"],
                  "patch_rows": spec.patch_rows, "hidden": spec.llama.hidden},
        "features": {"mae": cfg.model.features.mae, "videomae": cfg.model.features.videomae,
                     "hubert": cfg.model.features.hubert, "zero_rows": "zero_rows.npy"},
        "window": {"eva_frame_rule": cfg.model.frame_rule, "video_frames": spec.videomae.frames,
                   "sample_rate": spec.hubert.sample_rate, "window_s": cfg.runtime.window_s,
                   "hop_s": cfg.runtime.hop_s},
        "artifacts": ctx.entries,
        "extra_files": [describe_file(ctx.staging, p) for p in extra_files],
        "skipped_formats": ctx.skipped, "timings_s": ctx.timings, "quick_checks": ctx.checks,
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
