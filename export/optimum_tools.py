"""Hugging Face optimum where it serves: HuBERT's exporter, ORTOptimizer and ORTQuantizer, measured against ours.

optimum registers HuBERT (``hubert``: feature-extraction), not EVA-g, the authors' MAE ViT or VideoMAE as this
project builds them (docs/optimum.md); those stay with our exporter (export/onnx_export.py). What runs here:

- :func:`export_hubert`: optimum's ONNX exporter on a Hugging Face HuBERT directory (``save_pretrained`` layout,
  like ``chinese-hubert-large/``), task ``feature-extraction`` (``input_values`` -> ``last_hidden_state``);
- :func:`hubert_parity`: that file, after our ``normalize_waveform`` and with the mean over time and the
  projector (``feats_llama_proj3``) applied in numpy, against our ``hubert`` unit, on fresh random pcm;
- :func:`optimize_hubert`: ORTOptimizer's transformer fusions for model type ``hubert`` (and its fp16 option);
- :func:`quantize_int8`: ORTQuantizer's dynamic int8 (``avx512_vnni`` / ``arm64`` / ``avx2`` by machine,
  :func:`quantization_target`) on any of our encoder files; :func:`branch_parity` and :func:`cpu_times` measure it.

optimum-onnx 0.1.0 (the release with ``optimum.exporters.onnx`` and ``optimum.onnxruntime`` for optimum 2.x)
needs transformers<4.58, while the reference runs on transformers 5.x. optimum therefore runs in a subprocess
whose PYTHONPATH puts a separate target folder first (``.optimum-env``: ``make optimum-env``); everything else
(torch, onnx, onnxruntime, numpy) comes from the project's environment. The parity and timing functions run
here, in this process, with onnxruntime only (and torch for ``normalize_waveform``).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..branches import BRANCHES, HUBERT
from ..checkpoints import load_state
from ..errors import ConfigError, EdgeEmollamaError, MissingDependencyError
from ..lazy import require

ENV_VAR = "EDGE_EMOLLAMA_OPTIMUM_ENV"
DEFAULT_ENV = Path(__file__).resolve().parents[1] / ".optimum-env"
# optimum-onnx 0.1.0 requires transformers<4.58 and (through it) huggingface_hub<1.0, tokenizers<=0.23.0
PINS = ("transformers==4.57.6", "optimum==2.3.0", "optimum-onnx==0.1.0", "huggingface_hub>=0.34,<1.0",
        "tokenizers>=0.22,<=0.23.0")
INSTALL = ("make optimum-env  (or: pip install --no-deps --target .optimum-env "
           + " ".join(f'"{p}"' for p in PINS) + ")")
INT8_TOLERANCE = 0.1   # a loose gate for dynamic int8 (no parity gate of TOLERANCES applies; docs/optimum.md)


class OptimumError(EdgeEmollamaError):
    """optimum's step failed in its subprocess."""


def optimum_env() -> Path:
    """The target folder holding optimum and its transformers 4.57 (``$EDGE_EMOLLAMA_OPTIMUM_ENV`` or .optimum-env)."""
    env = Path(os.environ.get(ENV_VAR) or DEFAULT_ENV)
    if not (env / "optimum" / "onnxruntime").is_dir() or not (env / "transformers").is_dir():
        raise MissingDependencyError(f"optimum's environment {env} is missing or incomplete (no optimum.onnxruntime "
                                     f"or transformers in it); create it with: {INSTALL}")
    return env


def in_optimum_env(step: str, **kwargs) -> dict:
    """Run ``step`` (one of ``STEPS``) in a subprocess with optimum's environment first on PYTHONPATH."""
    paths = [str(optimum_env())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", __name__, step, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise OptimumError(f"optimum's {step} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_hubert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, opset: int = 17) -> dict:
    """optimum's ONNX exporter (feature-extraction) on the HuBERT directory ``hf_dir`` -> ``out_dir/model.onnx``.

    Returns {"file", "transformers", "optimum", "seconds"}; optimum's own check against PyTorch runs too."""
    hf_dir = Path(hf_dir)
    config = hf_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"HuBERT folder {hf_dir} has no config.json: point it at a Hugging Face HuBERT directory "
                          "(save_pretrained layout, like chinese-hubert-large/)")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "hubert":
        raise ConfigError(f"{config} is model_type {kind!r}, not 'hubert': point it at the HuBERT directory")
    return in_optimum_env("export", hf_dir=str(hf_dir), out_dir=str(out_dir), opset=opset)


def optimize_hubert(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, fp16: bool = False,
                    level: int = 2) -> dict:
    """ORTOptimizer on optimum's export in ``onnx_dir`` (its model.onnx and config.json): transformer fusions for
    model type ``hubert`` at ``level``; ``fp16``: weights and compute in float16 (the optimizer's GPU option)."""
    return in_optimum_env("optimize", onnx_dir=str(onnx_dir), out_dir=str(out_dir), fp16=fp16, level=level)


def quantize_int8(onnx_file: str | os.PathLike, out_dir: str | os.PathLike, target: str | None = None,
                  operators: list | None = None) -> dict:
    """ORTQuantizer's dynamic int8 of ``onnx_file`` (per-tensor, QUInt8 activations) into ``out_dir``.

    ``target``: optimum's config name (avx512_vnni, arm64, avx2); None picks by this machine. ``operators``: the
    op types to quantize (None: optimum's default, Conv and MatMul among them). Our files are no
    Hugging Face models: ``ORTQuantizer.from_pretrained`` refuses a plain file path ("Could not find any ONNX
    model file"), so the folder and ``file_name`` are passed, and it warns that there is no config.json."""
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise ConfigError(f"ONNX file {onnx_file} does not exist: export first (edge-emollama export)")
    return in_optimum_env("quantize", onnx_file=str(onnx_file), out_dir=str(out_dir),
                          target=target or quantization_target(), operators=operators)


def quantization_target(machine: str | None = None, cpuinfo: str | None = None) -> str:
    """optimum's dynamic-quantization config for this CPU: arm64 on ARM (Jetson), avx512_vnni where the CPU has
    VNNI, else avx2."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    return "avx512_vnni" if "avx512_vnni" in cpuinfo else "avx2"


# -- parity and timing, in this process ------------------------------------------------------------------------
def session(path: str | os.PathLike, threads: int = 0):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def hubert_projector(reference) -> tuple:
    """(weight [hidden, feature], bias [hidden]) of the reference's HuBERT projector, float32 numpy."""
    proj = reference.feats_llama_proj3
    return proj.weight.detach().float().cpu().numpy(), proj.bias.detach().float().cpu().numpy()


def projector_from_checkpoint(path: str | os.PathLike) -> tuple:
    """(weight, bias) of ``feats_llama_proj3`` from the user's Emotion-LLaMA checkpoint."""
    state = load_state(Path(path), "Emotion-LLaMA")
    keys = ("feats_llama_proj3.weight", "feats_llama_proj3.bias")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConfigError(f"{path} has no {', '.join(missing)}: pass the Emotion-LLaMA checkpoint "
                          "(Emoation_LLaMA.pth)")
    return tuple(state[k].float().numpy() for k in keys)


def optimum_hubert_row(sess, pcm: np.ndarray, projector: tuple) -> np.ndarray:
    """[1, hidden]: optimum's HuBERT file on ``pcm`` [1, S] after our normalize_waveform, mean over time, projector."""
    torch = require("torch")
    from ..reference.audio import normalize_waveform

    values = normalize_waveform(torch.from_numpy(pcm)).numpy()
    inputs = {i.name: i for i in sess.get_inputs()}
    if "input_values" not in inputs:
        raise ConfigError(f"this ONNX file's inputs are {list(inputs)}, not optimum's input_values: pass the file "
                          "export_hubert wrote")
    if inputs["input_values"].type == "tensor(float16)":
        values = values.astype(np.float16)
    hidden = sess.run(["last_hidden_state"], {"input_values": values})[0].astype(np.float32)
    weight, bias = projector
    return hidden.mean(axis=1) @ weight.T + bias


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (the branches' parity measure); ``got`` takes ``want``'s shape ([1, hidden]
    against a batched unit's [1, 1, hidden])."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.size != want.size:
        raise ValueError(f"cannot compare outputs of shapes {got.shape} and {want.shape}")
    got = got.reshape(want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def hubert_parity(optimum_file: str | os.PathLike, ours_file: str | os.PathLike, projector: tuple, spec,
                  seed: int | None = None, trials: int = 3, seconds: float = 2.0) -> dict:
    """optimum's HuBERT (plus mean and projector) against our hubert unit on fresh random pcm (``seed`` recorded)."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    theirs, ours = session(optimum_file), session(ours_file)
    errors = []
    for _ in range(trials):
        pcm = HUBERT.example_inputs(spec, rng, seconds=seconds)["pcm"]
        want = ours.run(["hubert_row"], {"pcm": pcm})[0]
        errors.append(relative_error(optimum_hubert_row(theirs, pcm, projector), want))
    return {"seed": seed, "trials": trials, "seconds": seconds, "rel_err": max(errors)}


def branch_parity(candidate: str | os.PathLike, fp32_file: str | os.PathLike, branch: str, spec,
                  seed: int | None = None, trials: int = 3) -> dict:
    """``candidate`` (e.g. int8) against our fp32 file of ``branch`` on fresh random inputs, over all outputs."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    got, want = session(candidate), session(fp32_file)
    errors = []
    for _ in range(trials):
        feed = BRANCHES[branch].example_inputs(spec, rng)
        errors += [relative_error(g, w) for g, w in zip(got.run(None, feed), want.run(None, feed))]
    return {"seed": seed, "trials": trials, "rel_err": max(errors)}


def cpu_times(runners: dict, runs: int = 10, warmup: int = 1) -> dict:
    """{name: {"p50_ms", "runs"}} of zero-argument callables, run alternately (one of each per round)."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"p50_ms": float(np.median(t)), "runs": runs} for name, t in times.items()}


# -- the steps that run in optimum's environment ---------------------------------------------------------------
def _versions() -> dict:
    import optimum.version
    import transformers

    return {"transformers": transformers.__version__, "optimum": optimum.version.__version__,
            "optimum_onnx": _dist_version("optimum-onnx")}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _step_export(hf_dir: str, out_dir: str, opset: int) -> dict:
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    main_export(hf_dir, output=out_dir, task="feature-extraction", opset=opset, device="cpu",
                library_name="transformers", do_validation=True)
    return {"file": str(Path(out_dir) / "model.onnx"), "seconds": time.perf_counter() - start, **_versions()}


def _step_optimize(onnx_dir: str, out_dir: str, fp16: bool, level: int) -> dict:
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    registered = _register_hubert()
    optimizer = ORTOptimizer.from_pretrained(onnx_dir)
    config = OptimizationConfig(optimization_level=level, fp16=fp16, optimize_for_gpu=fp16)
    start = time.perf_counter()
    optimizer.optimize(config, save_dir=out_dir, file_suffix="fp16" if fp16 else "optimized")
    name = "model_fp16.onnx" if fp16 else "model_optimized.onnx"
    return {"file": str(Path(out_dir) / name), "seconds": time.perf_counter() - start,
            "registered": registered, "fused": _op_counts(Path(out_dir) / name), **_versions()}


def _register_hubert() -> str:
    """optimum-onnx 0.1.0's ORTOptimizer refuses model type hubert ("not available yet": it is in neither
    NormalizedConfigManager nor ORTConfigManager). The narrowest workaround: register it as onnxruntime's BERT
    optimizer type (a post-LN/pre-LN encoder of MatMul attention, LayerNorm and GELU), with the text config's
    attribute names (hidden_size, num_attention_heads), which HubertConfig has."""
    from optimum.onnxruntime.utils import ORTConfigManager
    from optimum.utils.normalized_config import NormalizedConfigManager, NormalizedTextConfig

    if "hubert" in ORTConfigManager._conf:
        return "optimum registers hubert itself"
    ORTConfigManager._conf["hubert"] = "bert"
    NormalizedConfigManager._conf.setdefault("hubert", NormalizedTextConfig)
    return "hubert registered as onnxruntime model type 'bert' (optimum-onnx 0.1.0 lacks it)"


def _op_counts(path: Path) -> dict:
    import onnx

    counts: dict = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {k: v for k, v in sorted(counts.items()) if k in FUSED_OPS}


FUSED_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "Gelu", "FastGelu",
             "BiasGelu", "SkipSimplifiedLayerNormalization", "MatMul", "Softmax")


def _step_quantize(onnx_file: str, out_dir: str, target: str, operators: list | None) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    path = Path(onnx_file)
    try:
        ORTQuantizer.from_pretrained(path)
        plain_path = "accepted"
    except (FileNotFoundError, ValueError) as exc:
        plain_path = f"refused: {exc}"
    quantizer = ORTQuantizer.from_pretrained(path.parent, file_name=path.name)
    config = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=False,
                                                     operators_to_quantize=operators)
    start = time.perf_counter()
    written = quantizer.quantize(config, save_dir=out_dir, file_suffix="int8")
    return {"file": str(Path(written) / f"{path.stem}_int8.onnx"), "seconds": time.perf_counter() - start,
            "target": target, "plain_path": plain_path, "operators": list(config.operators_to_quantize),
            **_versions()}


STEPS = {"export": _step_export, "optimize": _step_optimize, "quantize": _step_quantize}


def _main(argv: list) -> None:
    step, kwargs = argv[0], json.loads(argv[1])
    result = STEPS[step](**kwargs)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
