"""Typed configuration loaded from config.yaml; unknown keys are rejected with a "did you mean".

Every default of the project lives in these dataclasses (config.yaml at the repository root documents the
same values, and a test keeps the two identical), so everything works with no file at all. The runtime's
stages take their section directly (``Fusion(cfg.runtime.fusion)``): there is no second options class to
keep in step. Model facts (sample rate, crop size, frame count) are not configuration: they come from the
preset (``spec.py``) through the manifest.

- ``model``: what the export builds and records in the manifest (preset, prompt layout, feature modes,
  window, EVA frame rule).
- ``export``: where and how it is written.
- ``runtime``: how the runtime runs an export. ``runtime.windows.window_s`` / ``hop_s`` / ``frame_rule`` are
  null by default, meaning "as the manifest recorded"; a value overrides it, and the runtime logs that.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, did_you_mean
from .spec import FEATURE_MODES, FRAME_RULES, LAYOUTS

STAGES = ("capture", "encode", "llm", "publish")
LINKS = ("windows", "rows", "scores")
PRECISIONS = ("auto", "fp32", "fp16")
QUANTS = ("auto", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
SMOOTHING = ("ema", "moving_average", "none")
FACE_CROPS = ("openface", "box")
VIDEOMAE_SAMPLINGS = ("segments", "uniform")
ABSENT_RULES = ("encode", "zeros")
FACE_DETECTORS = ("mtcnn", "haar")
ASR_TASKS = ("translate", "transcribe")


def _choice(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} = '{value}' is not one of {list(allowed)}{did_you_mean(value, allowed)}")


# --- model and export ---------------------------------------------------------------------------------------
@dataclass
class FeatureConfig:
    """Per feature branch: ``real`` runs the encoder, ``zeros`` feeds a zero 1024-d feature (the demo's rule)."""
    mae: str = "real"
    videomae: str = "real"
    hubert: str = "real"

    def zeros(self) -> tuple:
        return tuple(name for name in ("mae", "videomae", "hubert") if getattr(self, name) == "zeros")

    def validate(self) -> "FeatureConfig":
        for name in ("mae", "videomae", "hubert"):
            _choice(f"model.features.{name}", getattr(self, name), FEATURE_MODES)
        return self


@dataclass
class ContextConfig:
    """How far back each feature branch sees, ending at the window's end (docs/model.md: why 4 s)."""
    mae_s: float = 4.0
    videomae_s: float = 4.0
    hubert_s: float = 4.0

    def validate(self) -> "ContextConfig":
        for name in ("mae_s", "videomae_s", "hubert_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.context.{name} = {getattr(self, name)}: must be > 0 seconds")
        return self


@dataclass
class ModelConfig:
    """What the export builds and the manifest records; each fidelity choice defaults to what the training
    features' extraction did (docs/model.md has the table)."""
    preset: str = "tiny"
    layout: str = "inference"
    frame_rule: str = "middle"   # which frame of a window EVA sees: middle | first (the original) | last
    window_s: float = 2.0        # the window (EVA's frame is chosen in it; runtime/windows.py)
    hop_s: float = 0.5           # one estimate per hop
    face_crop: str = "openface"  # openface: aligned 112 px at scale 0.7, masked (the extraction) | box
    videomae_sampling: str = "segments"   # segments: 8 x 2 consecutive frames (the extraction) | uniform
    absent: str = "encode"       # encode: black faces and silence go through the encoders (the extraction)
                                 # | zeros: a zero feature when no face / no speech (the earlier rule)
    context: ContextConfig = field(default_factory=ContextConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def validate(self) -> "ModelConfig":
        _choice("model.layout", self.layout, LAYOUTS)
        _choice("model.frame_rule", self.frame_rule, FRAME_RULES)
        _choice("model.face_crop", self.face_crop, FACE_CROPS)
        _choice("model.videomae_sampling", self.videomae_sampling, VIDEOMAE_SAMPLINGS)
        _choice("model.absent", self.absent, ABSENT_RULES)
        _check_span("model", self.window_s, self.hop_s)
        self.context.validate()
        self.features.validate()
        return self


def _check_span(where: str, window_s, hop_s) -> None:
    if window_s is not None and not window_s > 0 or hop_s is not None and not hop_s > 0:
        raise ConfigError(f"{where}.window_s = {window_s} and {where}.hop_s = {hop_s}: both must be > 0")
    if window_s is not None and hop_s is not None and hop_s > window_s:
        raise ConfigError(f"{where}.hop_s = {hop_s} > {where}.window_s = {window_s} would leave gaps: "
                          "use hop_s <= window_s")


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
    vit_form: str = "fused"     # fused: ViT attention as com.microsoft.MultiHeadAttention, patch embeddings as
                                # MatMuls (ONNX Runtime) | plain: standard ONNX operators only (comparisons)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> "ExportConfig":
        _choice("export.device", self.device, ("auto", "cpu", "cuda"))
        _choice("export.vit_form", self.vit_form, ("fused", "plain"))
        return self


# --- runtime ------------------------------------------------------------------------------------------------
@dataclass
class SourcesConfig:
    """What to capture: at least one camera, microphone or video (the CLI's --camera/--mic/--video).

    ``camera`` and ``video`` are lists (a single value is taken as a list of one); an entry may name its
    source, ``NAME=TARGET`` (``lobby=clip.mp4``); otherwise the name comes from the argument (runtime/capture.py).
    Each video file is a source with its own audio; the microphone goes with the first camera, or is a source of
    its own without one."""
    camera: list = field(default_factory=list)      # index, /dev/videoN or stream URL, each [NAME=]...
    microphone: str | None = None   # PyAudio device index or name; "default" for the default input
    video: list = field(default_factory=list)       # files with video and/or audio, each [NAME=]PATH
    realtime: bool = True           # a file is paced like a live source (false: as fast as possible, nothing lost)

    def __post_init__(self):
        self.camera, self.video = _as_list(self.camera), _as_list(self.video)

    @property
    def any(self) -> bool:
        return bool(self.camera or self.video or self.microphone)


def _as_list(value) -> list:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


@dataclass
class CameraConfig:
    width: int | None = None        # requested from the driver (null: its default)
    height: int | None = None
    fps: float | None = None
    ring_seconds: float = 6.0       # frames kept: the longest context (4 s) + 4 hops
    max_failed_reads: int = 30      # consecutive failed reads before the camera counts as lost
    lost_after_s: float = 2.0       # ... or failed reads for this long; then it is reopened:
    reconnect_s: float = 0.5        # first wait before reopening, doubled after each failed attempt
    reconnect_max_s: float = 5.0    # ... up to this (a long outage: back within this of the camera's return)


@dataclass
class MicrophoneConfig:
    frames_per_buffer: int = 512    # 32 ms per callback at 16 kHz
    ring_seconds: float = 30.0
    latency_s: float | None = 0.0   # capture latency subtracted from the stamps (null: PortAudio's estimate,
                                    # which over-states it by tens of ms through PulseAudio)
    stall_s: float = 2.0            # no callback for this long: the microphone is lost, then reopened:
    reconnect_s: float = 0.5        # first wait before reopening, doubled after each failed attempt
    reconnect_max_s: float = 5.0    # ... up to this


@dataclass
class FileConfig:
    video: bool = True              # decode the video track (when the file has one)
    audio: bool = True              # decode the audio track (when the file has one)
    max_width: int | None = 960     # wider frames are scaled down (aspect kept) at decode
    ring_seconds: float = 6.0
    audio_ring_seconds: float = 30.0


@dataclass
class FaceConfig:
    detector: str = "mtcnn"         # mtcnn: boxes + 5 landmarks (aligned crops) | haar: boxes only
    mtcnn_thresholds: list = field(default_factory=lambda: [0.6, 0.7, 0.7])   # P-, R-, O-Net
    mtcnn_factor: float = 0.709     # image pyramid step
    cascade: str = "haarcascade_frontalface_default.xml"  # haar: a file in cv2.data.haarcascades, or a path
    detect_width: int = 320         # frames are scaled down to this width for detection (speed)
    scale_factor: float = 1.15      # 1.1 is OpenCV's usual step; 1.15 costs ~40 % less, same boxes here
    min_neighbors: int = 5
    min_size_frac: float = 0.1      # smallest face, as a fraction of the detection image's shorter side
                                    # (24 px at 320x240: a face about 2.5 m from a 640x480 webcam)
    cache_size: int = 512           # frames whose result is kept

    def validate(self) -> "FaceConfig":
        _choice("runtime.faces.detector", self.detector, FACE_DETECTORS)
        return self


@dataclass
class TrackConfig:
    """Stable ids for the faces of a source (runtime/tracks.py); a person who comes back gets a new id."""
    match_iou: float = 0.3          # a face continues a track when their boxes overlap at least this much (IoU)
    match_shift: float = 0.5        # ... or its centre (its landmarks, when both have them) moved at most this
                                    # fraction of the track's box size since the track's last frame
    end_after_s: float = 1.0        # a track not seen for this long ends (track_ended)

    def validate(self) -> "TrackConfig":
        if not (0.0 < self.match_iou <= 1.0 and self.match_shift >= 0.0 and self.end_after_s > 0.0):
            raise ConfigError(f"runtime.tracks: match_iou = {self.match_iou} must be in (0, 1], match_shift = "
                              f"{self.match_shift} >= 0 and end_after_s = {self.end_after_s} > 0")
        return self


@dataclass
class AsrConfig:
    """Speech recognition for the prompt's subtitle (faster-whisper), off the estimate's path."""
    model: str | None = None        # null: off (runtime.subtitle is used) | bundled (the asr extra's model) |
                                    # a faster-whisper model directory or name
    task: str = "translate"         # translate: English from any language, as the training transcripts (needs
                                    # a multilingual model; the bundled tiny.en transcribes English, logged) |
                                    # transcribe: the spoken language
    language: str | None = None     # null: detected
    beam_size: int = 1
    compute_type: str = "int8"
    threads: int = 0                # 0: CTranslate2's choice
    context_s: float = 6.0          # the speech it transcribes: the last N seconds of audio

    def validate(self) -> "AsrConfig":
        _choice("runtime.asr.task", self.task, ASR_TASKS)
        if not self.context_s > 0:
            raise ConfigError(f"runtime.asr.context_s = {self.context_s}: must be > 0 seconds")
        return self


@dataclass
class WindowConfig:
    window_s: float | None = None   # null: as exported (manifest); a value overrides it (logged)
    hop_s: float | None = None      # null: as exported
    frame_rule: str | None = None   # null: as exported; middle | first | last
    face_margin: float = 0.25       # crop side = largest box side * (1 + margin)
    min_face_fraction: float = 0.3  # of the window's frames with a detected face -> face present
    audio_rms_threshold: float = 0.01   # about -40 dBFS -> audio present
    max_wait_s: float = 0.25        # live sources: how long after t1 a window waits for late data
    start_timeout_s: float = 5.0    # how long the first window waits for every source's first data
    drop_stale: bool | None = None  # skip to the newest ready window when behind (null: when all sources are live)

    def validate(self) -> "WindowConfig":
        _check_span("runtime.windows", self.window_s, self.hop_s)
        if self.frame_rule is not None:
            _choice("runtime.windows.frame_rule", self.frame_rule, FRAME_RULES)
        if not 0.0 <= self.min_face_fraction <= 1.0:
            raise ConfigError(f"runtime.windows.min_face_fraction = {self.min_face_fraction}: use a fraction in [0, 1]")
        return self


@dataclass
class EncoderConfig:
    providers: list = field(default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                     "CPUExecutionProvider"])
    precision: str = "auto"         # fp32 | fp16 | auto (per device class, runtime/device.py)
    threads: int = 0                # per branch session; 0: the cores / the branches that run at once
    batch_windows: int = 1          # up to N waiting windows (people, streams) share each branch's run
    io_binding: bool | None = None  # inputs/outputs bound on the provider's device (runtime/binding.py): true |
                                    # false | null: per device class (on with a CUDA GPU, off on the CPU)
    cuda_graphs: bool = False       # CUDA graphs, one per face-count bucket (CUDA provider only; not run on a GPU yet)

    def validate(self) -> "EncoderConfig":
        _choice("runtime.encoders.precision", self.precision, PRECISIONS)
        _choice("runtime.encoders.io_binding", self.io_binding, (True, False, None))
        _choice("runtime.encoders.cuda_graphs", self.cuda_graphs, (True, False))
        if self.cuda_graphs and self.io_binding is False:
            raise ConfigError("runtime.encoders.cuda_graphs: true runs through an IO binding, but io_binding is false: "
                              "set io_binding: null (or true), or cuda_graphs: false")
        if self.cuda_graphs and "CUDAExecutionProvider" not in self.providers:
            raise ConfigError(f"runtime.encoders.cuda_graphs: true needs CUDAExecutionProvider in "
                              f"runtime.encoders.providers (now {self.providers}); add it, or set cuda_graphs: false")
        if not 1 <= self.batch_windows <= 16:
            raise ConfigError(f"runtime.encoders.batch_windows = {self.batch_windows}: use 1 (one window per run) "
                              "to 16")
        return self


@dataclass
class LlmConfig:
    quant: str = "auto"             # the GGUF to load: F16 | Q8_0 | Q4_K_M (as exported) | auto
    n_gpu_layers: int | None = None  # llama.cpp layers on the GPU (-1: all; null: per device class)
    threads: int = 0                # 0: llama.cpp's choice (up to 8)
    n_ctx: int = 2048               # context positions (capped at the model's)
    batch_windows: int = 1          # up to this many waiting windows with the same subtitle (the people of a
                                    # window, other streams) in one llama_decode; 1: one decode each (no clear
                                    # gain on a 2-core CPU, BENCHMARKS.md; not measured on a GPU)

    def validate(self) -> "LlmConfig":
        _choice("runtime.llm.quant", self.quant, QUANTS)
        if not 1 <= self.batch_windows <= 16:
            raise ConfigError(f"runtime.llm.batch_windows = {self.batch_windows}: use 1 (one llama_decode per "
                              "window) to 16")
        return self


@dataclass
class FusionConfig:
    method: str = "ema"             # ema | moving_average | none (runtime/fusion.py)
    time_constant_s: float = 1.5    # ema
    average_windows: int = 4        # moving_average
    switch_margin: float = 0.1      # hysteresis of the dominant label
    switch_windows: int = 2

    def validate(self) -> "FusionConfig":
        _choice("runtime.fusion.method", self.method, SMOOTHING)
        if self.method == "ema" and not self.time_constant_s > 0:
            raise ConfigError(f"runtime.fusion.time_constant_s = {self.time_constant_s}: must be > 0 s for ema")
        if self.average_windows < 1 or self.switch_windows < 1:
            raise ConfigError("runtime.fusion.average_windows and switch_windows must be >= 1")
        if not 0.0 <= self.switch_margin < 1.0:
            raise ConfigError(f"runtime.fusion.switch_margin = {self.switch_margin}: use a difference in [0, 1)")
        return self


@dataclass
class HeartbeatConfig:
    """ZMTP heartbeats: a silent TCP peer is dropped after ``timeout_ms``."""
    ivl_ms: int = 1000
    timeout_ms: int = 3000
    ttl_ms: int = 3000


@dataclass
class PublishConfig:
    endpoint: str = "tcp://127.0.0.1:5555"
    sndhwm: int = 16                 # messages per subscriber before the oldest are dropped (~8 s at 2 Hz)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    status_interval_s: float = 1.0
    queue_size: int = 256            # pipeline -> sender thread
    stall_s: float = 3.0             # status 'degraded' when no estimate for this long
    latency_budget_ms: float | None = None  # status 'degraded' when the mean latency exceeds it

    def validate(self) -> "PublishConfig":
        if self.sndhwm < 1 or self.queue_size < 1:
            raise ConfigError(f"runtime.publish.sndhwm = {self.sndhwm}, queue_size = {self.queue_size}: both must "
                              "be >= 1")
        if not self.status_interval_s > 0:
            raise ConfigError(f"runtime.publish.status_interval_s = {self.status_interval_s}: must be > 0")
        return self


@dataclass
class ControlConfig:
    endpoint: str = "tcp://127.0.0.1:5556"
    poll_ms: int = 100                # how often the loop checks for stop()
    max_request_bytes: int = 65536    # larger messages disconnect the peer (ZMQ_MAXMSGSIZE)
    sndhwm: int = 64
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)


@dataclass
class ReasoningConfig:
    enabled: bool = True            # the explain verb: a second llama.cpp context for [reason] text
    max_tokens: int = 96
    per_client_per_minute: int = 6  # explain requests one control client may make per minute (others refused)


@dataclass
class OutputsConfig:
    """Where else the published messages go (runtime/outputs.py), besides the PUB socket."""
    record: str | None = None       # a JSONL file: every message sent, one JSON object a line (--record)
    lsl: bool = False               # a Lab Streaming Layer outlet of type "Emotion" (--lsl; the lsl extra)
    psi: str | None = None          # a second PUB endpoint in \psi's two-frame format (--psi ENDPOINT)
    annotate: str | None = None     # a video (.mp4/.avi) of the frames with boxes, ids and label bars (--annotate)
    preview: bool = False           # the same in a window, when a display exists (--preview)


@dataclass
class SecurityConfig:
    """ZeroMQ CURVE ("ironhouse"): encrypted sockets that accept only the allow-listed client keys."""
    curve: str | None = None        # a folder from `edge-emollama keys DIR`: server.key(_secret), clients/*.key
    insecure: bool = False          # allow binding beyond loopback without CURVE (refused otherwise)


@dataclass
class RuntimeConfig:
    artifacts: str = "artifacts/tiny"
    subtitle: str = ""              # the transcript line fed to the prompt (no ASR in the loop yet)
    stages: list = field(default_factory=lambda: list(STAGES))   # the stages this process runs
    links: dict = field(default_factory=dict)   # windows / rows / scores -> endpoint (unset: inproc, unique)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    microphone: MicrophoneConfig = field(default_factory=MicrophoneConfig)
    file: FileConfig = field(default_factory=FileConfig)
    max_faces: int = 4              # people estimated per source and window, the largest first
    faces: FaceConfig = field(default_factory=FaceConfig)
    tracks: TrackConfig = field(default_factory=TrackConfig)
    windows: WindowConfig = field(default_factory=WindowConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)

    def validate(self) -> "RuntimeConfig":
        for stage in self.stages:
            _choice("runtime.stages", stage, STAGES)
        for name, endpoint in self.links.items():
            if name not in LINKS or not isinstance(endpoint, str) or "://" not in endpoint:
                raise ConfigError(f"runtime.links: {name}={endpoint!r} is not a link (--link NAME=ENDPOINT, NAME one "
                                  f"of {', '.join(LINKS)}{did_you_mean(name, LINKS)}, ENDPOINT e.g. tcp://HOST:PORT)")
        if not 1 <= self.max_faces <= 16:
            raise ConfigError(f"runtime.max_faces = {self.max_faces}: use 1 to 16 (each person costs MAE, VideoMAE "
                              "and an LLM call per window)")
        for section in (self.faces, self.tracks, self.windows, self.asr, self.encoders, self.llm, self.fusion,
                        self.publish):
            section.validate()
        return self


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.export.validate()
        self.runtime.validate()
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
    if base is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)   # camera: 0
    if base is list and isinstance(value, (str, int)) and not isinstance(value, bool):
        return _as_list(value)   # camera: 0, video: clip.mp4
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"'{path}' must be {base.__name__}, got {value!r}")
    return value


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides`` ({"export.out": ...}; None values skipped)."""
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
            if not isinstance(node, dict):
                raise ConfigError(f"'{part}' in {path} must be a mapping to set {dotted}")
        node[leaf] = value
    return _build(Config, data, "").validate()
