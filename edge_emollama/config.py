"""Typed configuration loaded from config.yaml; unknown keys are rejected with a "did you mean".

Every default lives in these dataclasses (config.yaml at the repository root documents the same
values), so the runtime works with no file at all.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .spec import FEATURE_MODES, FRAME_RULES, LAYOUTS


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class FeatureConfig:
    """Per feature branch: ``real`` runs the encoder, ``zeros`` feeds a zero 1024-d feature (the demo's rule)."""
    mae: str = "real"
    videomae: str = "real"
    hubert: str = "real"

    def zeros(self) -> tuple:
        return tuple(name for name in ("mae", "videomae", "hubert") if getattr(self, name) == "zeros")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    layout: str = "inference"
    frame_rule: str = "middle"
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass
class CheckpointConfig:
    folder: str | None = None
    llama_dir: str | None = None
    emotion_llama: str | None = None
    eva: str | None = None
    hubert_dir: str | None = None
    mae: str | None = None
    videomae: str | None = None


@dataclass
class ValidationConfig:
    windows: int = 100          # random windows for the GGUF label-agreement check
    encoder_trials: int = 3     # fresh random inputs per encoder check
    seed: int | None = None     # None: a fresh seed per run (recorded in the report)


@dataclass
class ExportConfig:
    out: str = "artifacts/tiny"
    formats: list = field(default_factory=lambda: ["auto"])  # auto: every format whose libraries are installed
    quant: list = field(default_factory=lambda: ["Q8_0", "Q4_K_M"])
    opset: int = 17
    seed: int = 0               # weights of the random presets
    device: str = "auto"        # where the PyTorch reference runs for tracing and checks: auto | cpu | cuda
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class RuntimeConfig:
    artifacts: str = "artifacts/tiny"
    window_s: float = 2.0
    hop_s: float = 0.5
    providers: list = field(default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                     "CPUExecutionProvider"])
    threads: int = 0            # 0: all cores
    precision: str = "auto"     # ONNX encoders: fp32 | fp16 | auto (per device class, runtime/device.py)
    quant: str = "auto"         # GGUF the LLM stage loads: F16 | Q8_0 | Q4_K_M (as exported) | auto
    n_gpu_layers: int | None = None  # llama.cpp layers on the GPU (-1: all; null: per device class)
    subtitle: str = ""          # the transcript line fed to the prompt (no ASR in the loop yet)
    smoothing: str = "ema"
    time_constant_s: float = 1.5
    hysteresis_margin: float = 0.1
    hysteresis_windows: int = 2
    publish: str = "tcp://127.0.0.1:5555"
    control: str = "tcp://127.0.0.1:5556"
    sndhwm: int = 16
    reasoning: bool = True      # the explain verb: a second llama.cpp instance for [reason] text
    reason_tokens: int = 96


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "Config":
        checks = [("model.layout", self.model.layout, LAYOUTS), ("model.frame_rule", self.model.frame_rule, FRAME_RULES),
                  ("export.device", self.export.device, ("auto", "cpu", "cuda"))]
        checks += [(f"model.features.{k}", getattr(self.model.features, k), FEATURE_MODES)
                   for k in ("mae", "videomae", "hubert")]
        for where, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{where} = '{value}' is not one of {list(allowed)}{did_you_mean(value, allowed)}")
        for where, value, allowed in (("runtime.precision", self.runtime.precision, ("auto", "fp32", "fp16")),
                                      ("runtime.quant", self.runtime.quant,
                                       ("auto", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"))):
            if value not in allowed:
                raise ConfigError(f"{where} = '{value}' is not one of {list(allowed)}{did_you_mean(value, allowed)}")
        if self.runtime.hop_s <= 0 or self.runtime.window_s < self.runtime.hop_s:
            raise ConfigError("runtime.hop_s must be > 0 and no longer than runtime.window_s")
        return self


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'the top level'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown configuration key '{path}'{did_you_mean(key, names)}; known keys here: "
                              f"{', '.join(names)}")
        kind = hints[key]
        kwargs[key] = _build(kind, value, path) if dataclasses.is_dataclass(kind) else _coerce(kind, value, path)
    return cls(**kwargs)


def _coerce(kind, value, path: str):
    if value is None:
        if type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"'{path}' cannot be empty")
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"'{path}' must be {base.__name__}, got {value!r}")
    return value


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides`` ({"export.out": ...})."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} not found (omit --config to use the defaults)")
        yaml = __import__("yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(Config, data, "").validate()
