"""``edge-emollama export``: reference model -> artifacts -> validation -> manifest, atomically.

Everything is written into a hidden staging folder beside the output; the manifest is written last,
and only then is the staging folder renamed to the output. An interrupted or failed export leaves no
folder that looks finished (the runtime refuses folders without a manifest). A killed export cannot clean
up: the next export of the same name removes the staging folders such exports left (:func:`clean_stale_staging`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import OutputError
from ..lazy import require
from ..manifest import (ExportedWindow, Extraction, FeatureModes, Manifest, MediaInfo, PromptInfo, describe_file,
                        tool_versions, utc_now, write_json)
from ..progress import Steps
from ..prompt import label_pieces
from ..spec import (FEATURE_BRANCHES, LABELS, PROMPT_TEMPLATE, REASON_INSTRUCTION, RECOGNITION_INSTRUCTION,
                    get_preset)
from .context import ExportContext, StepTimer, human_bytes, log
from .formats import plan, step_count
from .validate import encoder_parity, format_table, llm_parity, raise_on_failure

EXTRA_FILES = ("zero_rows.npy", "validation.json", "vocab.gguf")


def export(cfg: Config, validate: bool = False, random_weights: bool = False, progress: bool = True) -> Path:
    """Run the export described by ``cfg``; returns the finished output folder.

    ``progress``: each step numbered on stderr with its time (``export: [3/16] onnx eva ... 1.2 s, 9.1 MB``; a
    bar on a terminal); False for none (a quiet caller)."""
    for module in ("torch", "transformers"):   # the reference model, which every format is made from
        require(module)
    spec = get_preset(cfg.model.preset)
    formats, skipped = plan(cfg.export.formats)
    out = Path(cfg.export.out)
    staging = _make_staging(out)
    steps = Steps(count_steps(cfg, formats, validate), "export", enabled=progress)
    try:
        with steps:
            clean_stale_staging(out, keep=staging)
            ctx = _context(cfg, spec, staging, random_weights, steps)
            ctx.skipped.update(skipped)
            for name, reason in skipped.items():
                log.warning("[%s] skipped: %s", name, reason)
            _check_space(ctx, out, formats)
            for fmt in formats:
                fmt.run(ctx)
            report = _full_validation(ctx) if validate else {"seed": None, "quick": ctx.checks}
            with steps.step("manifest"):
                write_json(staging / "validation.json", report)
                np.save(staging / "zero_rows.npy", ctx.reference.zero_rows())
                build_manifest(ctx).write(staging)
                _publish(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"writing the export to {out} failed ({exc.strerror or exc}); nothing was published. "
                          "Free some space or choose another --out, then export again") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("export finished: %s (%s)", out, human_bytes(sum(e.bytes for e in ctx.entries)))
    return out


def count_steps(cfg: Config, formats: list, validate: bool) -> int:
    """The numbered steps of an export: the reference model, each format's, the full validation's, the manifest."""
    validation = (1 + any(f.name == "gguf" for f in formats)) if validate else 0   # encoders; gguf
    return 1 + sum(step_count(f, cfg) for f in formats) + validation + 1


def build_manifest(ctx: ExportContext) -> Manifest:
    """What the runtime will obey: geometry, labels, prompt, features, window, every file with its hash."""
    cfg, spec = ctx.cfg, ctx.spec
    model = cfg.model
    return Manifest(
        preset=spec.name, spec=spec, source=ctx.provenance, labels=LABELS, label_pieces=tuple(map(tuple, label_pieces(ctx.tokenizer))),
        prompt=PromptInfo(template=PROMPT_TEMPLATE, layout=model.layout,
                          recognition_instruction=RECOGNITION_INSTRUCTION, reason_instruction=REASON_INSTRUCTION,
                          bos="double: BOS added and the literal <s> parsed (LlamaTokenizer add_special_tokens=True)"),
        media=MediaInfo(rows=spec.media_rows, order=("eva_patches",) + FEATURE_BRANCHES + ("eva_cls",),
                        patch_rows=spec.patch_rows, hidden=spec.llama.hidden),
        features=FeatureModes(mae=model.features.mae, videomae=model.features.videomae,
                              hubert=model.features.hubert, zero_rows="zero_rows.npy"),
        window=ExportedWindow(eva_frame_rule=model.frame_rule, video_frames=spec.videomae.frames,
                              sample_rate=spec.hubert.sample_rate, window_s=model.window_s, hop_s=model.hop_s),
        extraction=Extraction(
            face_crop=model.face_crop, videomae_sampling=model.videomae_sampling, absent=model.absent,
            face_pixels="RGB resized bilinear to the encoder's side, / 255, no mean/std (MAE and VideoMAE)",
            videomae_pooling="mean of the last block's tokens, no final norm (use_mean_pooling: norm is Identity)",
            context_s={"mae": model.context.mae_s, "videomae": model.context.videomae_s,
                       "hubert": model.context.hubert_s}),
        artifacts=tuple(ctx.entries), extra_files=tuple(describe_file(ctx.staging, ctx.staging / f) for f in EXTRA_FILES),
        tools=tool_versions(), skipped_formats=ctx.skipped, timings_s=ctx.timings, quick_checks=ctx.checks,
        created_utc=utc_now())


def _make_staging(out: Path) -> Path:
    """``.NAME.partial-PID-RANDOM`` beside ``out``: the PID says which process writes it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent} ({exc.strerror}): choose another --out or fix "
                          "its permissions") from exc


STALE_STAGING_S = 60.0   # a staging folder without a recorded writer, untouched this long, is abandoned


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def clean_stale_staging(out: Path, keep: Path | None = None, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove the staging folders of ``out`` that killed exports left beside it; returns those removed.

    A folder is abandoned when the process its name records (``.NAME.partial-PID-...``) no longer runs on this
    host, or, for a folder without a PID (older exports), when nothing in it changed for ``max_age_s``. The
    folder of a running export (its PID alive) is kept however old, so a concurrent export of the same name
    keeps its folder. A PID reused by another process keeps a dead export's folder until that process ends."""
    removed = []
    for folder in sorted(out.parent.glob(f"{_staging_prefix(out)}*")):
        if folder == keep or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            why = _abandoned(folder, out, max_age_s)
        except OSError:   # gone meanwhile (published or removed by its writer)
            continue
        if why is None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not remove %s, the staging folder of a killed export (%s); delete it by hand",
                        folder, why)
        else:
            log.info("removed %s, the staging folder of a killed export (%s)", folder, why)
            removed.append(folder)
    return removed


def _abandoned(folder: Path, out: Path, max_age_s: float) -> str | None:
    """Why ``folder`` is abandoned, or None while its writer may still be at work."""
    pid = _writer_pid(folder, out)
    if pid is not None:
        return None if _process_runs(pid) else f"its writer, process {pid}, is gone"
    idle = time.time() - _newest_change(folder)
    return f"no writer recorded and untouched for {idle:.0f} s" if idle > max_age_s else None


def _writer_pid(folder: Path, out: Path) -> int | None:
    pid, sep, _ = folder.name[len(_staging_prefix(out)):].partition("-")
    return int(pid) if sep and pid.isdigit() and int(pid) > 0 else None


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # it runs, as another user
        return True
    except OverflowError:      # not a PID this system can have
        return False
    return True


def _newest_change(folder: Path) -> float:
    """The latest modification time of ``folder`` or anything in it."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:   # removed meanwhile
                continue
    return newest


BYTES_PER_PARAM = {"onnx": 4.0, "onnx-fp16": 2.0, "tensorrt": 2.0, "gguf": 2.0,   # the LLM for gguf
                   "faces": 0.0}                                                  # MTCNN: 2 MB in all
QUANT_BYTES_PER_PARAM = {"Q8_0": 1.07, "Q4_K_M": 0.6}                                # others: 1.1


def space_needed(ctx: ExportContext, formats: list) -> int:
    """Bytes the planned formats write, with 15 % margin and room for the largest encoder's trace."""
    llm = sum(p.numel() for p in ctx.reference.llama_model.parameters())
    encoders = sum(p.numel() for p in ctx.reference.parameters()) - llm
    per_param = {f.name: BYTES_PER_PARAM[f.name] for f in formats}
    total = encoders * sum(v for k, v in per_param.items() if k != "gguf")
    if "gguf" in per_param:
        total += llm * (2.0 + sum(QUANT_BYTES_PER_PARAM.get(q, 1.1) for q in ctx.cfg.export.quant))
    largest = max(sum(p.numel() for p in m.parameters()) for m in ctx.reference.export_units().values())
    return int(1.15 * total + 4 * largest * ("onnx" in per_param))


def _check_space(ctx: ExportContext, out: Path, formats: list) -> None:
    needed = space_needed(ctx, formats)
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise OutputError(f"{out.parent} has {human_bytes(free)} free; the export needs about "
                          f"{human_bytes(needed)}: free some space or choose another --out")


def _context(cfg: Config, spec, staging: Path, random_weights: bool, steps: Steps) -> ExportContext:
    from .sources import load_model

    with_timer = ExportContext(cfg, spec, None, None, None, staging, {}, progress=steps)
    with StepTimer(with_timer, "reference model"):
        reference, tokenizer, vocab, provenance = load_model(cfg, spec, staging, random_weights)
    ctx = ExportContext(cfg, spec, reference, tokenizer, vocab, staging, provenance, progress=steps)
    ctx.timings.update(with_timer.timings)
    return ctx


def _full_validation(ctx: ExportContext) -> dict:
    seed = ctx.cfg.export.validation.seed
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    report = {"seed": seed, "encoders": [], "llm": []}
    with StepTimer(ctx, "validate encoders"):
        for entry in [e for e in ctx.entries if e.format == "onnx"]:
            report["encoders"].append(encoder_parity(ctx.reference, ctx.spec, entry.branch, entry.precision,
                                                     ctx.staging / entry.file, rng,
                                                     ctx.cfg.export.validation.encoder_trials))
    ggufs = {e.quant: ctx.staging / e.file for e in ctx.entries if e.format == "gguf"}
    if ggufs:
        with StepTimer(ctx, "validate gguf"):
            report["llm"] = llm_parity(ctx.reference, ctx.spec, ctx.tokenizer, ggufs, rng,
                                       ctx.cfg.export.validation.windows, ctx.cfg.model.layout,
                                       ctx.cfg.model.features.zeros())
    report["elapsed_s"] = {k: v for k, v in ctx.timings.items() if k.startswith("validate")}
    print(format_table(report), flush=True)
    raise_on_failure(report["encoders"] + report["llm"], "full validation")
    return report


def _publish(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished staging folder (the old one is kept until the rename succeeded)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{int(time.time())}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
