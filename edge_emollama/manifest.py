"""The artifact manifest: the contract between the export and the runtime, read, verified and written here.

The export builds a :class:`Manifest` and writes it last (``Manifest.write``); the runtime reads it once with
:func:`load_artifacts` and hands the typed object down. A folder without a manifest, of another schema
version, with a malformed manifest, or whose files differ from what was exported is refused with one
error that says what to re-export (docs/manifest.md).

Verifying means hashing every file (~25 GB at full size: tens of seconds). ``.verified.json`` remembers, per
file, the SHA-256 it matched and the file's size, modification and change times and inode: a file is
hashed again when any of them changed or the manifest now expects another hash. ``touch -d`` can reset the
modification time but not the change time, so content edited in place is always caught.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ArtifactError
from .spec import ModelSpec

__all__ = ["MANIFEST", "SCHEMA", "VERSION", "ArtifactFile", "PromptInfo", "MediaInfo", "FeatureModes",
           "ExportedWindow", "Extraction", "Manifest", "Artifacts", "load_artifacts", "describe_file", "sha256"]

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
SCHEMA = "edge-emollama.manifest"
VERSION = 3       # 2: the extraction choices (faces, VideoMAE sampling and pooling, absent input, context)
                  # 3: a batch axis (windows) on the EVA, VideoMAE and HuBERT files


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactFile:
    """One written file: where, how big, its hash, and what it is (format, branch, precision or quant)."""
    file: str
    bytes: int
    sha256: str
    format: str | None = None        # onnx | onnx-data | tensorrt | gguf; None for the extra files
    branch: str | None = None        # eva | mae | videomae | hubert
    precision: str | None = None     # fp32 | fp16 (ONNX, TensorRT)
    quant: str | None = None         # F16 | Q8_0 | ... (GGUF)
    inputs: tuple = ()
    outputs: tuple = ()
    dynamic_axes: dict = field(default_factory=dict)
    external_data: tuple = ()

    def matches(self, **match) -> bool:
        return all(getattr(self, k) == v for k, v in match.items())

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None and v != () and v != {} or k in ("file", "bytes", "sha256")}


def describe_file(root: Path, path: Path, **kind) -> ArtifactFile:
    """The manifest entry of a file just written under ``root``."""
    return ArtifactFile(file=str(path.relative_to(root)), bytes=path.stat().st_size, sha256=sha256(path), **kind)


@dataclass(frozen=True)
class PromptInfo:
    template: str
    layout: str                      # inference | training (prompt.prompt_parts)
    recognition_instruction: str
    reason_instruction: str
    bos: str


@dataclass(frozen=True)
class MediaInfo:
    rows: int
    order: tuple
    patch_rows: int
    hidden: int


@dataclass(frozen=True)
class FeatureModes:
    mae: str
    videomae: str
    hubert: str
    zero_rows: str                   # file of the rows a zero feature gives (the projectors' biases)

    def zeros(self) -> tuple:
        return tuple(name for name in ("mae", "videomae", "hubert") if getattr(self, name) == "zeros")


@dataclass(frozen=True)
class ExportedWindow:
    """The window the export was configured for; the runtime uses it unless runtime.windows overrides it."""
    eva_frame_rule: str
    video_frames: int
    sample_rate: int
    window_s: float
    hop_s: float


@dataclass(frozen=True)
class Extraction:
    """How the runtime turns capture into the encoders' inputs, chosen to match the offline feature extraction
    the model was trained on (docs/model.md has the table with the original's file and line)."""
    face_crop: str           # openface: aligned 112 px at scale 0.7, masked | box
    face_pixels: str         # what the face encoders get
    videomae_sampling: str   # segments: 8 x 2 consecutive frames | uniform
    videomae_pooling: str    # what VideoMAE's row is made of
    absent: str              # encode: black faces and silence encoded | zeros: zero features
    context_s: dict          # mae / videomae / hubert -> seconds each sees, ending at the window's end


_PARTS = {"prompt": PromptInfo, "media": MediaInfo, "features": FeatureModes, "window": ExportedWindow,
          "extraction": Extraction}


@dataclass(frozen=True)
class Manifest:
    preset: str
    spec: ModelSpec
    source: dict                     # {"weights": "user checkpoints", ...} or {"weights": "seeded random", "seed": N}
    labels: tuple
    label_pieces: tuple              # each label's token ids, prompt order
    prompt: PromptInfo
    media: MediaInfo
    features: FeatureModes
    window: ExportedWindow
    extraction: Extraction
    artifacts: tuple                 # ArtifactFile of every model file
    extra_files: tuple = ()          # ArtifactFile of zero_rows.npy, validation.json, vocab.gguf
    tools: dict = field(default_factory=dict)
    skipped_formats: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    quick_checks: dict = field(default_factory=dict)
    created_utc: str = ""
    schema: str = SCHEMA
    version: int = VERSION

    # --- reading ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, where: str = MANIFEST) -> "Manifest":
        """A manifest from its JSON form; ArtifactError naming the first key that is missing or malformed."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{where} holds {type(data).__name__}, not a manifest object; re-export the folder")
        if data.get("schema") != SCHEMA or data.get("version") != VERSION:
            raise ArtifactError(f"{where} is schema {data.get('schema')} v{data.get('version')}; this runtime reads "
                                f"{SCHEMA} v{VERSION}: re-export with this version of edge-emollama")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is not MISSING or f.default_factory is not MISSING:   # optional
                    continue
                raise ArtifactError(f"{where} has no '{f.name}': it is damaged or was edited; re-export the folder")
            try:
                values[f.name] = _read_field(f.name, data[f.name])
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                raise ArtifactError(f"{where}: '{f.name}' is malformed ({type(exc).__name__}: {exc}); "
                                    "re-export the folder") from exc
        return cls(**values)

    # --- writing ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "spec":
                value = value.to_dict()
            elif f.name in ("artifacts", "extra_files"):
                value = [a.to_dict() for a in value]
            elif f.name in _PARTS:
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}
            elif f.name == "label_pieces":
                value = [list(p) for p in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def write(self, folder: Path) -> Path:
        """Atomically write ``folder/manifest.json`` (the export does this last)."""
        path = Path(folder) / MANIFEST
        write_json(path, self.to_dict())
        return path

    # --- looking things up --------------------------------------------------------------------------------
    def entries(self, **match) -> list:
        return [a for a in self.artifacts if a.matches(**match)]

    def exported(self, attribute: str, **match) -> set:
        """The values of ``attribute`` over the matching artifacts, e.g. exported("quant", format="gguf")."""
        return {getattr(a, attribute) for a in self.entries(**match)}


def _read_field(name: str, value):
    if name == "spec":
        return ModelSpec.from_dict(value)
    if name in ("artifacts", "extra_files"):
        return tuple(ArtifactFile(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
                     for entry in value)
    if name in _PARTS:
        return _PARTS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    if name == "label_pieces":
        pieces = tuple(tuple(int(t) for t in p) for p in value)
        if not pieces or not all(pieces):
            raise ValueError("every label needs at least one token piece")
        return pieces
    if name in ("labels",):
        return tuple(str(v) for v in value)
    if name in ("source", "tools", "skipped_formats", "timings_s", "quick_checks") and not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


TOOLS = {"torch": ("torch",), "transformers": ("transformers",), "onnx": ("onnx",),
         "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "gguf": ("gguf",), "llama_cpp": ("llama_cpp_python",),
         "tensorrt": ("tensorrt",), "numpy": ("numpy",)}


def tool_versions() -> dict:
    """Versions of the installed libraries that write or run artifacts (read from package metadata: nothing
    is imported), for the manifest and the bench."""
    versions = {"edge_emollama": __version__, "python": platform.python_version()}
    for name, distributions in TOOLS.items():
        for dist in distributions:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifacts:
    """An exported folder whose manifest was read (and its files verified) once."""
    root: Path
    manifest: Manifest

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.spec

    def path(self, **match) -> Path:
        found = self.manifest.entries(**match)
        if not found:
            have = sorted(f"{a.format} {a.branch or ''}{a.precision or a.quant or ''}".strip()
                          for a in self.manifest.artifacts if a.format != "onnx-data")
            raise ArtifactError(f"{self.root / MANIFEST} lists no artifact with {match} (it has: {', '.join(have)}); "
                                "re-export with it included (edge-emollama export --formats ... --quant ...)")
        return self.root / found[0].file

    def zero_rows(self) -> np.ndarray:
        """[3, hidden]: the MAE / VideoMAE / HuBERT rows of a zero feature."""
        return np.load(self.root / self.manifest.features.zero_rows)


def _export_command(root: Path) -> str:
    """The ``edge-emollama export`` that makes ``root``, for the error messages, from the folder's name:
    a checkpoints folder or an emotion-llama one the full preset from the user's checkpoints, tiny or mid
    their preset, any other name the full preset or tiny to try."""
    name = root.name.lower().replace("_", "-")
    words = set(name.split("-"))
    if words & {"checkpoints", "checkpoint", "ckpt"}:
        return f"'edge-emollama export --preset emotion-llama --checkpoints {root}' (it writes artifacts/emotion-llama)"
    full = (f"'edge-emollama export --preset emotion-llama --checkpoints DIR --out {root}' (DIR: your checkpoints, "
            "docs/checkpoints.md)")
    if "emotion-llama" in name or "emotionllama" in words:
        return full
    for preset in ("tiny", "mid"):   # seeded random weights, no checkpoints
        if preset in words:
            return f"'edge-emollama export --preset {preset} --out {root}'"
    return f"{full}, or 'edge-emollama export --preset tiny --out {root}' (untrained, for a quick try)"


def _holds_checkpoints(root: Path) -> bool:
    """Whether ``root`` looks like a checkpoints folder (docs/checkpoints.md's names) rather than an export."""
    return any((root / name).exists() for name in ("Llama-2-7b-chat-hf", "eva_vit_g.pth", "Emoation_LLaMA.pth",
                                                    "Emotion_LLaMA.pth", "chinese-hubert-large"))


def load_artifacts(root: str | os.PathLike, verify: bool = True) -> Artifacts:
    """The one reader of an exported folder: parse the manifest, check every file (unless ``verify=False``)."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact folder {root} is missing (it does not exist): export with "
                            f"{_export_command(root)}, or point --artifacts at an exported folder")
    if not path.is_file() and _holds_checkpoints(root):
        raise ArtifactError(f"{root} holds checkpoints, not an export (no {MANIFEST}): export them with "
                            f"'edge-emollama export --preset emotion-llama --checkpoints {root}', then point "
                            "--artifacts at what it writes (artifacts/emotion-llama)")
    if not path.is_file():
        raise ArtifactError(f"{root} holds no {MANIFEST}: it is not a finished export (an interrupted export "
                            f"leaves no manifest). Export it with {_export_command(root)}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the folder") from exc
    manifest = Manifest.from_dict(data, str(path))
    if verify:
        _verify_all(root, manifest.artifacts + manifest.extra_files)
    return Artifacts(root, manifest)


def _stamp(info: os.stat_result) -> list:
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _verify_all(root: Path, entries: tuple) -> None:
    try:
        cache = json.loads((root / VERIFIED).read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    checked = {entry.file: _verify(root, entry, cache.get(entry.file)) for entry in entries}
    if checked != cache:
        try:
            write_json(root / VERIFIED, checked)
        except OSError:   # a read-only folder: verified again next time
            pass


def _verify(root: Path, entry: ArtifactFile, cached) -> dict:
    """The cache record of ``entry`` after checking it (hashing only when the cache cannot vouch for it)."""
    path = root / entry.file
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing; re-export the folder")
    stamp = _stamp(path.stat())
    if isinstance(cached, dict) and cached.get("stamp") == stamp and cached.get("sha256") == entry.sha256:
        return cached
    if stamp[0] != entry.bytes or sha256(path) != entry.sha256:
        raise ArtifactError(f"{path} differs from the file that was exported (size or SHA-256); it was changed "
                            "or damaged: re-export the folder")
    return {"stamp": stamp, "sha256": entry.sha256}
