"""The single table of export formats: what each writes, what it needs, how it is checked."""
from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass

import numpy as np

from ..branches import BRANCHES
from ..errors import ConfigError, MissingDependencyError, did_you_mean
from ..lazy import available
from .context import ExportContext, StepTimer
from .onnx_export import convert_fp16, export_branch
from .validate import encoder_parity, llm_parity, raise_on_failure


@dataclass(frozen=True)
class ExportFormat:
    name: str
    writes: str
    needs: tuple          # importable modules
    requires: tuple       # formats that must run first
    run: object           # (ctx) -> None; adds manifest entries and quick checks
    install: str


def _metadata(ctx: ExportContext, **extra) -> dict:
    return {"producer": "edge-emollama", "preset": ctx.spec.name, **ctx.provenance, **extra}


def run_faces(ctx: ExportContext) -> None:
    """MTCNN's P-, R- and O-Net (facenet-pytorch's weights) -> onnx/face_{pnet,rnet,onet}.onnx, each checked
    against torch on a fresh random input."""
    from .face_detector import INPUT, OUTPUTS, dynamic_axes, export_net, load_nets, net_parity

    folder = ctx.staging / "onnx"
    folder.mkdir(exist_ok=True)
    for net, module in load_nets().items():
        with StepTimer(ctx, f"faces {net}"):
            path = export_net(module, net, folder / f"face_{net}.onnx", ctx.cfg.export.opset,
                              _metadata(ctx, precision="fp32"))
            ctx.add(path, format="face-detector", branch=net, precision="fp32", inputs=(INPUT,),
                    outputs=OUTPUTS[net], dynamic_axes=dynamic_axes(net))
            ctx.checks[f"faces {net}"] = check = net_parity(module, net, path, np.random.default_rng(), trials=1)
            raise_on_failure([check], f"ONNX face detector {net}")


def run_onnx(ctx: ExportContext) -> None:
    folder = ctx.staging / "onnx"
    folder.mkdir(exist_ok=True)
    for branch, module in ctx.reference.export_units().items():
        with StepTimer(ctx, f"onnx {branch}"):
            files = export_branch(module, branch, ctx.spec, folder / f"{branch}.onnx", ctx.cfg.export.opset,
                                  _metadata(ctx, precision="fp32"), fused=ctx.cfg.export.vit_form == "fused")
            _record_onnx(ctx, branch, "fp32", files)


def run_onnx_fp16(ctx: ExportContext) -> None:
    for branch in BRANCHES:
        with StepTimer(ctx, f"onnx-fp16 {branch}"):
            (src,) = ctx.files(format="onnx", branch=branch, precision="fp32")
            _record_onnx(ctx, branch, "fp16", convert_fp16(src, src.with_name(f"{branch}.fp16.onnx"), _metadata(ctx)))


def _record_onnx(ctx: ExportContext, branch: str, precision: str, files: list) -> None:
    """Manifest entries for one ONNX file (and its external data), then its quick parity check."""
    io = BRANCHES[branch]
    ctx.add(files[0], format="onnx", branch=branch, precision=precision, inputs=io.input_names,
            outputs=io.output_names, dynamic_axes=io.dynamic_axes(), external_data=tuple(f.name for f in files[1:]))
    for extra in files[1:]:
        ctx.add(extra, format="onnx-data", branch=branch, precision=precision)
    ctx.checks[f"onnx {branch} {precision}"] = check = encoder_parity(
        ctx.reference, ctx.spec, branch, precision, files[0], np.random.default_rng(), trials=1)
    raise_on_failure([check], f"ONNX {branch} {precision}")


def run_tensorrt(ctx: ExportContext) -> None:
    from .tensorrt_export import build_engine

    folder = ctx.staging / "tensorrt"
    folder.mkdir(exist_ok=True)
    cache = ctx.staging.parent / "tensorrt.timing-cache"
    for branch, module in ctx.reference.export_units().items():
        with StepTimer(ctx, f"tensorrt {branch}"):
            # TensorRT's parser has no com.microsoft ops: the engines are built from plain-operator files
            plain = folder / f".{branch}.plain"
            plain.mkdir(exist_ok=True)
            try:
                (fp32, *_) = export_branch(module, branch, ctx.spec, plain / f"{branch}.onnx", ctx.cfg.export.opset,
                                           _metadata(ctx, precision="fp32"), fused=False)
                (fp16, *_) = convert_fp16(fp32, plain / f"{branch}.fp16.onnx", _metadata(ctx))
                engine = build_engine(fp32, fp16, folder / f"{branch}.engine", ctx.spec, branch, _metadata(ctx),
                                      cache)
            finally:
                shutil.rmtree(plain, ignore_errors=True)
            ctx.add(engine, format="tensorrt", branch=branch, precision="fp16")


def run_gguf(ctx: ExportContext) -> None:
    from .gguf_writer import write_llama_gguf
    from .quantize import quantize_gguf

    folder = ctx.staging / "gguf"
    folder.mkdir(exist_ok=True)
    f16 = folder / "llm.F16.gguf"
    with StepTimer(ctx, "gguf F16") as step:
        state = {k: v.detach().cpu().float().numpy() if ctx.spec.llama.hidden < 1024 else v.detach().cpu().numpy()
                 for k, v in ctx.reference.llama_model.state_dict().items()}
        write_llama_gguf(f16, state, ctx.spec.llama, ctx.vocab, _metadata(ctx, lora_merged=True), ftype="f16",
                         bar=step.bar)
        del state
        ctx.add(f16, format="gguf", quant="F16")
    ggufs = {"F16": f16}
    for qtype in ctx.cfg.export.quant:
        with StepTimer(ctx, f"gguf {qtype}") as step:
            path = quantize_gguf(f16, folder / f"llm.{qtype}.gguf", qtype, bar=step.bar)
            ctx.add(path, format="gguf", quant=qtype)
            ggufs[qtype] = path
    with StepTimer(ctx, "gguf check"):
        rows = llm_parity(ctx.reference, ctx.spec, ctx.tokenizer, ggufs, np.random.default_rng(), windows=5,
                          layout=ctx.cfg.model.layout, zeros=ctx.cfg.model.features.zeros())
        ctx.checks.update({f"gguf {r['quant']}": r for r in rows})
        raise_on_failure([r for r in rows if r["quant"] == "F16"], "GGUF F16")


FORMATS = (
    ExportFormat("faces", "MTCNN face detector (P-, R-, O-Net), fp32 ONNX",
                 ("torch", "onnx", "onnxruntime", "facenet_pytorch"), (), run_faces,
                 'pip install --no-deps "facenet-pytorch==2.6.0"'),
    ExportFormat("onnx", "encoders + projectors, fp32 ONNX", ("torch", "onnx", "onnxruntime"), ("faces",), run_onnx,
                 'pip install -e ".[export]"'),
    ExportFormat("onnx-fp16", "encoders + projectors, fp16 ONNX (fp32 I/O)", ("onnx", "onnxruntime"), ("onnx",),
                 run_onnx_fp16, 'pip install -e ".[export]"'),
    ExportFormat("tensorrt", "TensorRT fp16 engines", ("tensorrt",), ("onnx", "onnx-fp16"), run_tensorrt,
                 "pip install tensorrt  (Jetson: the TensorRT of JetPack)"),
    ExportFormat("gguf", "LLaMA + merged LoRA, F16 GGUF and quantizations", ("gguf", "llama_cpp"), (), run_gguf,
                 'pip install gguf llama-cpp-python==0.3.36'),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
FACE_NETS = ("pnet", "rnet", "onet")   # MTCNN's three networks (face_detector.load_nets)


def step_count(fmt: ExportFormat, cfg) -> int:
    """How many numbered steps (StepTimer) ``fmt.run`` reports: the progress counter's share of ``fmt``."""
    per_branch = len(BRANCHES)
    return {"faces": len(FACE_NETS), "onnx": per_branch, "onnx-fp16": per_branch, "tensorrt": per_branch,
            "gguf": 1 + len(cfg.export.quant) + 1}.get(fmt.name, 1)   # gguf: F16, each quantization, the check


# packages used only for the files they ship: looked up, never imported (facenet-pytorch's __init__ needs
# torchvision, which the export does not install)
DATA_ONLY = ("facenet_pytorch",)
BY_NAME = {f.name: f for f in FORMATS}


def _installed(module: str) -> bool:
    if module in DATA_ONLY:
        return importlib.util.find_spec(module) is not None
    return available(module)


def missing_modules(fmt: ExportFormat) -> list:
    return [m for m in fmt.needs if not _installed(m)]


def plan(requested: list) -> tuple:
    """(formats to run in table order, {skipped format: reason}); "auto" = every format whose libraries exist.

    A chosen format brings its requirements (``requires``). Under "auto", a format or a requirement that was
    not named and whose libraries are missing is skipped with its install command (e.g. "faces" without
    facenet-pytorch: the runtime can still use ``runtime.faces.detector: haar``); a named format, or a
    requirement of one named without "auto", must have its libraries."""
    unknown = [r for r in requested if r not in FORMAT_NAMES + ("auto",)]
    if unknown:
        raise ConfigError(f"unknown export format '{unknown[0]}'{did_you_mean(unknown[0], FORMAT_NAMES)}; "
                          f"formats: {', '.join(FORMAT_NAMES)} or auto")
    chosen, skipped = set(), {}
    for fmt in FORMATS:
        if "auto" in requested or fmt.name in requested:
            _choose(fmt, requested, None, chosen, skipped)
    return [f for f in FORMATS if f.name in chosen], skipped


def _choose(fmt: ExportFormat, requested: list, needed_by: str | None, chosen: set, skipped: dict) -> None:
    """Add ``fmt`` and its requirements to ``chosen``, or record why it is skipped, or raise."""
    if fmt.name in chosen or fmt.name in skipped:
        return
    missing = missing_modules(fmt)
    if missing and "auto" in requested and fmt.name not in requested:
        skipped[fmt.name] = f"{', '.join(missing)} not installed; to add it: {fmt.install}"
        return
    if missing:
        why = f" (needed by '{needed_by}')" if needed_by else ""
        raise MissingDependencyError(f"format '{fmt.name}'{why} needs {', '.join(missing)}: {fmt.install}")
    chosen.add(fmt.name)
    for name in fmt.requires:
        _choose(BY_NAME[name], requested, fmt.name, chosen, skipped)
