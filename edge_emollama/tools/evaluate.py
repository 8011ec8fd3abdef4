"""``edge-emollama eval``: the paper's protocol on labelled clips (docs/eval.md).

Each clip is ONE window spanning the whole clip, as Emotion-LLaMA's evaluation did: the file is decoded
completely (the runtime's own file reader, as fast as possible, nothing dropped), one
:class:`~edge_emollama.runtime.items.WindowItem` is built for ``[first capture time, last + 1 ns)`` by the
runtime's window builder with the window's length set to the clip's (so the EVA frame rule, MAE's frames,
VideoMAE's sampling and HuBERT's audio cover the whole clip), and the runtime's encoder and LLM stages give
its label distribution. The prompt's subtitle is the label file's, else speech recognition's (``--asr``),
else ``runtime.subtitle``.

Figures: accuracy, weighted F1 (scikit-learn's ``f1_score(average="weighted")``, written out here with
numpy: the runtime does not depend on scikit-learn), the confusion matrix (rows true, columns predicted)
and one record per clip; written to ``--json`` (atomically) with a PNG of the confusion matrix beside it.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import AsrConfig, FileConfig, RuntimeConfig
from ..errors import InputError, OutputError, did_you_mean
from ..lazy import require
from ..manifest import Artifacts, load_artifacts, utc_now, write_json
from ..runtime.faces import FaceCache, make_detector
from ..runtime.asr import Transcriber
from ..runtime.clock import NS_PER_S
from ..runtime.items import WindowItem
from ..runtime.sources import VideoFileSource
from ..runtime.stages import EncoderStage, LlmStage
from ..runtime.windows import WindowBuilder, WindowPlan
from ..spec import LABELS

__all__ = ["EvalOptions", "LabelledClip", "Metrics", "ClipScorer", "evaluate", "format_summary", "read_labels",
           "find_clips", "decode_clip", "clip_span", "whole_clip_plan", "clip_window", "make_transcriber",
           "compute_metrics", "confusion_matrix", "weighted_f1", "accuracy", "label_order",
           "write_confusion_png", "PAPER_WEIGHTED_F1"]

log = logging.getLogger(__name__)
CLIP_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
MAX_CLIP_S = 600.0            # longest clip held in memory at once (frames at runtime.file.max_width)
PAPER_WEIGHTED_F1 = 0.9036    # Emotion-LLaMA on MER2023-SEMI, released checkpoint (the paper's table)
_POLL_S = 0.01


@dataclass
class EvalOptions:
    runtime: RuntimeConfig        # runtime.artifacts, encoders, llm, faces, windows, file, asr, subtitle
    clips: str                    # folder of NAME.mp4 / .avi / .mov / .mkv
    labels: str                   # CSV name,label[,subtitle] or Emotion-LLaMA's annotation text
    json: str | None = None       # where the report goes (None: nowhere)
    png: str | None = None        # the confusion matrix picture (None: beside json as OUT.png)
    limit: int | None = None      # only the first N clips of the label file
    progress: bool = True         # a progress bar on stderr


# --- label files ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledClip:
    name: str
    label: str                    # one of spec.LABELS
    subtitle: str | None          # None: the label file gives none for this clip
    line: int                     # where it is in the label file


def read_labels(path: str | os.PathLike) -> list[LabelledClip]:
    """The clips of a label file: a CSV with a header ``name,label[,subtitle]`` (other columns are ignored),
    or Emotion-LLaMA's annotation text, ``name frames label score`` per line (the score may be left out)."""
    path = Path(path)
    text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        raise InputError(f"label file {path} is empty: write one clip per line (CSV name,label[,subtitle] or "
                         "'name frames label score')")
    clips = _read_csv(path, text) if "," in first else _read_annotation(path, text)
    if not clips:
        raise InputError(f"label file {path} lists no clip: add lines below the header name,label[,subtitle]")
    _check_unique(path, clips)
    return clips


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"label file {path} not found: check the path given to --labels")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"label file {path} is not UTF-8 text ({exc}): save it as UTF-8") from exc


def _label(path: Path, line: int, text: str) -> str:
    label = text.strip().lower()
    if label not in LABELS:
        raise InputError(f"{path} line {line}: label '{text.strip()}' is not one of the model's labels "
                         f"({', '.join(LABELS)}){did_you_mean(label, LABELS)}; fix or remove that line")
    return label


def _read_csv(path: Path, text: str) -> list[LabelledClip]:
    reader = csv.reader(io.StringIO(text))
    header = [cell.strip().lower() for cell in next(reader)]
    missing = [name for name in ("name", "label") if name not in header]
    if missing:
        raise InputError(f"{path} line 1: the CSV header {header} has no {' or '.join(missing)} column: the "
                         "header must be name,label[,subtitle]")
    column = {name: header.index(name) for name in ("name", "label", "subtitle") if name in header}
    clips = []
    for row in reader:
        if any(cell.strip() for cell in row):
            clips.append(_csv_clip(path, reader.line_num, row, column))
    return clips


def _csv_clip(path: Path, line: int, row: list, column: dict) -> LabelledClip:
    if len(row) <= max(column["name"], column["label"]) or not row[column["name"]].strip():
        raise InputError(f"{path} line {line}: {row} lacks a name or a label (the header says name,label"
                         "[,subtitle]); complete or remove that line")
    at = column.get("subtitle")
    subtitle = row[at].strip() if at is not None and at < len(row) else ""
    return LabelledClip(row[column["name"]].strip(), _label(path, line, row[column["label"]]), subtitle or None,
                        line)


def _read_annotation(path: Path, text: str) -> list[LabelledClip]:
    clips = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (3, 4) or not fields[1].isdigit():
            raise InputError(f"{path} line {number}: '{line.strip()}' is neither Emotion-LLaMA's 'name frames "
                             "label score' (e.g. 'sample_00000001 50 happy 1') nor a CSV with a header "
                             "name,label[,subtitle]")
        clips.append(LabelledClip(fields[0], _label(path, number, fields[2]), None, number))
    return clips


def _check_unique(path: Path, clips: list[LabelledClip]) -> None:
    seen: dict[str, int] = {}
    for clip in clips:
        if clip.name in seen:
            raise InputError(f"{path}: clip '{clip.name}' is listed twice (lines {seen[clip.name]} and {clip.line}):"
                             " keep one line per clip")
        seen[clip.name] = clip.line


def find_clips(folder: str | os.PathLike, clips: Sequence[LabelledClip], labels: str | os.PathLike = "the labels"
               ) -> list[Path]:
    """Each clip's file, ``FOLDER/NAME`` + one of .mp4 .avi .mov .mkv; every missing one is named in one error
    (raised before anything is evaluated)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"clip folder {folder} not found: check the path given to --clips")
    paths = [_clip_path(folder, clip.name) for clip in clips]
    missing = [clip.name for clip, path in zip(clips, paths) if path is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of the {len(clips)} clips listed in {labels} are not in {folder} as "
                         f"NAME{{{','.join(CLIP_SUFFIXES)}}}: {shown}; add them, or remove their lines")
    return paths


def _clip_path(folder: Path, name: str) -> Path | None:
    given = [folder / name] if Path(name).suffix.lower() in CLIP_SUFFIXES else []
    return next((p for p in given + [folder / f"{name}{s}" for s in CLIP_SUFFIXES] if p.is_file()), None)


# --- one clip, one window -----------------------------------------------------------------------------------
def decode_clip(path: Path, sample_rate: int, options: FileConfig) -> VideoFileSource:
    """The whole file read by the runtime's file source into rings that hold all of it (as fast as possible,
    nothing dropped); returned stopped, its rings full."""
    whole = dataclasses.replace(options, ring_seconds=MAX_CLIP_S, audio_ring_seconds=MAX_CLIP_S)
    source = VideoFileSource(path, sample_rate, realtime=False, options=whole)
    try:
        source.start()
        if source.duration_s is not None and source.duration_s > MAX_CLIP_S:
            raise InputError(f"clip {path} lasts {source.duration_s:.0f} s, longer than {MAX_CLIP_S:.0f} s: this "
                             "evaluation holds a whole clip in memory; cut it into shorter clips")
        _wait_until_decoded(source, path)
    finally:
        source.stop()
    source.check()
    return source


def _wait_until_decoded(source: VideoFileSource, path: Path) -> None:
    while not source.finished:
        source.check()
        if _ring_full(source):
            raise InputError(f"clip {path} holds more than {MAX_CLIP_S:.0f} s: cut it into shorter clips")
        time.sleep(_POLL_S)
    source.check()


def _ring_full(source: VideoFileSource) -> bool:
    frames, audio = source.frames, source.audio
    if frames is not None and len(frames) >= frames.capacity:
        return True
    start, end = (audio.start_ns(), audio.end_ns()) if audio is not None else (None, None)
    return start is not None and end is not None and (end - start) / NS_PER_S >= MAX_CLIP_S - 1.0


def clip_span(source: VideoFileSource) -> tuple[int, int]:
    """``[first capture time, last + 1)`` over the decoded frames and audio of a clip."""
    frames, audio = source.frames, source.audio
    starts = [frames.first_t_ns() if frames is not None else None, audio.start_ns() if audio is not None else None]
    ends = [frames.last_t_ns() + 1 if frames is not None and len(frames) else None,
            audio.end_ns() if audio is not None else None]
    starts, ends = [t for t in starts if t is not None], [t for t in ends if t is not None]
    if not starts or not ends:
        raise InputError(f"clip {source.path} decoded to no frame and no audio sample: the file is empty or "
                         "damaged; re-encode it (e.g. to MP4 with H.264 + AAC)")
    return min(starts), max(ends)


def whole_clip_plan(plan: WindowPlan, seconds: float) -> WindowPlan:
    """The plan with its window set to the clip's length and every branch seeing all of it (no shorter
    per-branch context): one window per clip, as the original evaluation."""
    return dataclasses.replace(plan, window_s=seconds, hop_s=min(plan.hop_s, seconds),
                               context_s={})     # no context given: each branch sees the window


def clip_window(path: str | os.PathLike, plan: WindowPlan, detector, options: FileConfig = FileConfig()
                ) -> WindowItem:
    """The one window of a whole clip: the runtime's window builder over all of the clip, with the plan's
    window length replaced by the clip's (``detector``: a face detector, None for no face detection). The
    largest face of each frame only (the benchmarks' clips hold one speaker, as the extraction assumed)."""
    source = decode_clip(Path(path), plan.sample_rate, options)
    t0, t1 = clip_span(source)
    whole = whole_clip_plan(plan, (t1 - t0) / NS_PER_S)
    frames = source.frames
    faces = None
    if frames is not None and detector is not None:
        faces = FaceCache(detector, max_faces=1, size=max(2, len(frames)))
    return WindowBuilder(frames, source.audio, whole, faces).build(0, t0, t1)[0]


def make_transcriber(asr: AsrConfig) -> Transcriber | None:
    """Speech recognition (the whole clip's audio) when ``runtime.asr.model`` is set, else None: Whisper is
    loaded only then."""
    return Transcriber(asr) if asr.model is not None else None


class ClipScorer:
    """A labelled clip -> its label distribution through the runtime's own window builder and stages."""

    def __init__(self, runtime: RuntimeConfig, artifacts: Artifacts):
        self.runtime, self.artifacts = runtime, artifacts
        self.labels = tuple(artifacts.manifest.labels)
        self.plan = WindowPlan.from_manifest(artifacts.manifest, runtime.windows)
        self.detector = make_detector(artifacts, runtime.faces)
        self.transcriber = make_transcriber(runtime.asr)
        self.encoders = EncoderStage(artifacts, runtime.encoders)
        self.llm = LlmStage(artifacts, runtime.llm)

    def window(self, path: Path) -> WindowItem:
        return clip_window(path, self.plan, self.detector, self.runtime.file)

    def subtitle(self, clip: LabelledClip, item: WindowItem) -> tuple[str, str]:
        """(the prompt's subtitle, where it came from: labels | asr | config)."""
        if clip.subtitle is not None:
            return clip.subtitle, "labels"
        if self.transcriber is not None and item.audio is not None and item.audio.size:
            return self.transcriber.transcribe(item.audio).text.strip(), "asr"
        return self.runtime.subtitle, "config"

    def probabilities(self, item: WindowItem, subtitle: str) -> np.ndarray:
        rows, _ = self.encoders(item)
        return self.llm(rows, subtitle)[0]

    def score(self, clip: LabelledClip, path: Path) -> dict:
        """One clip's record: its label, the prediction, the distribution, the subtitle used, the seconds."""
        started = time.perf_counter()
        item = self.window(path)
        subtitle, source = self.subtitle(clip, item)
        probabilities = self.probabilities(item, subtitle)
        predicted = self.labels[int(np.argmax(probabilities))]
        return {"name": clip.name, "label": clip.label, "predicted": predicted, "correct": predicted == clip.label,
                "probabilities": {k: float(p) for k, p in zip(self.labels, probabilities)},
                "subtitle": subtitle, "subtitle_from": source, "clip_s": (item.t1_ns - item.t0_ns) / NS_PER_S,
                "face": item.presence.face, "audio": item.presence.audio,
                "seconds": time.perf_counter() - started}

    def close(self) -> None:
        self.encoders.close()
        self.llm.close()


# --- metrics --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    n_clips: int
    accuracy: float
    weighted_f1: float
    labels: list                  # the confusion matrix's row and column order
    confusion: list               # [true][predicted] clip counts


def label_order(true: Sequence[str], predicted: Sequence[str]) -> list:
    """The labels in the file plus any predicted: the model's labels in prompt order, then any others sorted."""
    seen = set(true) | set(predicted)
    return [label for label in LABELS if label in seen] + sorted(seen - set(LABELS))


def confusion_matrix(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts ``[len(labels), len(labels)]``: row = true label, column = predicted label."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(matrix, ([index[t] for t in true], [index[p] for p in predicted]), 1)
    return matrix


def accuracy(true: Sequence[str], predicted: Sequence[str]) -> float:
    _check_pairs(true, predicted)
    return float(np.mean(np.asarray(true, object) == np.asarray(predicted, object)))


def weighted_f1(true: Sequence[str], predicted: Sequence[str]) -> float:
    """scikit-learn's ``f1_score(true, predicted, average="weighted")``: each label's F1 = 2 TP / (support +
    predicted count) (0 where it has no true positive), averaged with the labels' supports as weights, so a
    label that is only predicted weighs nothing."""
    _check_pairs(true, predicted)
    matrix = confusion_matrix(true, predicted, label_order(true, predicted))
    hits, support, chosen = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    f1 = np.divide(2.0 * hits, support + chosen, out=np.zeros(len(hits)), where=(support + chosen) > 0)
    return float(np.sum(f1 * support) / np.sum(support))


def _check_pairs(true: Sequence[str], predicted: Sequence[str]) -> None:
    if len(true) != len(predicted) or not len(true):
        raise InputError(f"metrics need as many predictions as labels, at least one: got {len(true)} labels and "
                         f"{len(predicted)} predictions")


def compute_metrics(true: Sequence[str], predicted: Sequence[str]) -> Metrics:
    labels = label_order(true, predicted)
    return Metrics(n_clips=len(true), accuracy=accuracy(true, predicted), weighted_f1=weighted_f1(true, predicted),
                   labels=labels, confusion=confusion_matrix(true, predicted, labels).tolist())


# --- the run ----------------------------------------------------------------------------------------------------
class _Progress:
    """``eval  12/834 [#####.....] acc 0.58  NAME`` on stderr: redrawn in place on a terminal, a line per clip
    otherwise."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.done, self.correct = total, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, record: dict) -> None:
        self.done += 1
        self.correct += bool(record["correct"])
        if not self.enabled:
            return
        filled = int(20 * self.done / self.total)
        text = (f"eval {self.done:{len(str(self.total))}d}/{self.total} [{'#' * filled}{'.' * (20 - filled)}] "
                f"acc {self.correct / self.done:.2f}  {record['name']} {record['seconds']:.1f}s")
        self.stream.write(("\r" + text + "\033[K") if self.tty else text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _limited(clips: list[LabelledClip], limit: int | None) -> list[LabelledClip]:
    if limit is None:
        return clips
    if limit < 1:
        raise InputError(f"--limit {limit}: give a number of clips >= 1 (or leave it out for all)")
    return clips[:limit]


def _output_paths(options: EvalOptions) -> tuple[Path | None, Path | None]:
    """(json, png), checked before the run: their folders exist; the picture's library is installed."""
    json_path = Path(options.json) if options.json else None
    png_path = Path(options.png) if options.png else (json_path.with_suffix(".png") if json_path else None)
    for path, flag in ((json_path, "--json"), (png_path, "--png")):
        if path is not None and not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: the folder {path.parent} does not exist; create it or choose "
                              f"another {flag}")
    if png_path is not None:
        require("matplotlib")
    return json_path, png_path


def _score_all(scorer: ClipScorer, clips: list[LabelledClip], paths: list[Path], progress: bool) -> list[dict]:
    bar, records = _Progress(len(clips), progress), []
    try:
        for clip, path in zip(clips, paths):
            records.append(scorer.score(clip, path))
            bar.step(records[-1])
    finally:
        bar.close()
    return records


def build_report(options: EvalOptions, artifacts: Artifacts, records: list[dict], seconds: float) -> dict:
    metrics = compute_metrics([r["label"] for r in records], [r["predicted"] for r in records])
    source = artifacts.manifest.source
    return {**dataclasses.asdict(metrics), "paper_weighted_f1": PAPER_WEIGHTED_F1,
            "untrained": source.get("seed") is not None, "preset": artifacts.manifest.preset,
            "weights": source.get("weights"), "artifacts": str(artifacts.root), "clips": str(options.clips),
            "labels_file": str(options.labels), "frame_rule": artifacts.manifest.window.eva_frame_rule,
            "subtitles": _count(records, "subtitle_from"), "with_face": sum(r["face"] for r in records),
            "with_audio": sum(r["audio"] for r in records), "seconds": seconds, "created_utc": utc_now(),
            "per_clip": records}


def _count(records: list[dict], key: str) -> dict:
    out: dict = {}
    for record in records:
        out[record[key]] = out.get(record[key], 0) + 1
    return out


def evaluate(options: EvalOptions) -> dict:
    """Every labelled clip scored as one window; the report (also written to ``options.json`` / ``.png``)."""
    clips = _limited(read_labels(options.labels), options.limit)
    paths = find_clips(options.clips, clips, options.labels)
    json_path, png_path = _output_paths(options)
    artifacts = load_artifacts(options.runtime.artifacts)
    log.info("eval: %d clips of %s from %s with %s", len(clips), options.labels, options.clips, artifacts.root)
    started = time.perf_counter()
    scorer = ClipScorer(options.runtime, artifacts)
    try:
        records = _score_all(scorer, clips, paths, options.progress)
    finally:
        scorer.close()
    report = build_report(options, artifacts, records, time.perf_counter() - started)
    if json_path is not None:
        write_json(json_path, report)
        report["json"] = str(json_path)
    if png_path is not None:
        report["png"] = str(write_confusion_png(report, png_path))
    return report


# --- output -----------------------------------------------------------------------------------------------------
def write_confusion_png(report: dict, path: str | os.PathLike) -> Path:
    """The confusion matrix as a picture (matplotlib, Agg): cells shaded by the fraction of the true label's
    clips, each with its count; written through a temporary file and a rename."""
    figure_module = require("matplotlib.figure")
    agg = require("matplotlib.backends.backend_agg")
    labels, matrix = report["labels"], np.asarray(report["confusion"], np.int64)
    side = 2.5 + 0.75 * len(labels)
    figure = figure_module.Figure(figsize=(side + 1.2, side), dpi=120)
    agg.FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    _annotate(axes, matrix, rates)
    ticks = range(len(labels))
    axes.set_xticks(ticks, labels, rotation=45, ha="right")
    axes.set_yticks(ticks, labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{report['n_clips']} clips   accuracy {report['accuracy']:.3f}   weighted F1 "
                   f"{report['weighted_f1']:.3f}" + ("\n(untrained weights)" if report.get("untrained") else ""))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true label's clips")
    figure.tight_layout()
    return _save_png(figure, Path(path))


def _annotate(axes, matrix: np.ndarray, rates: np.ndarray) -> None:
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            colour = "white" if rates[row, column] > 0.5 else "black"
            axes.text(column, row, str(matrix[row, column]), ha="center", va="center", color=colour, fontsize=9)


def _save_png(figure, path: Path) -> Path:
    tmp = path.with_name(path.name + ".partial")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def format_summary(report: dict) -> str:
    """n, accuracy, weighted F1 (with the paper's figure) and the confusion matrix as text."""
    lines = [f"eval: {report['n_clips']} clips, preset {report['preset']} ({report['artifacts']})"]
    if report.get("untrained"):
        lines.append("NOTE: seeded random weights (untrained): these figures test the plumbing, not the model")
    lines += [f"accuracy     {report['accuracy']:.4f}",
              f"weighted F1  {report['weighted_f1']:.4f}   (the paper, MER2023-SEMI with the released checkpoint: "
              f"{report['paper_weighted_f1']:.4f})",
              "confusion (rows true, columns predicted):"]
    lines += _matrix_lines(report["labels"], report["confusion"])
    lines += [f"wrote {report[key]}" for key in ("json", "png") if report.get(key)]
    return "\n".join(lines)


def _matrix_lines(labels: list, confusion: list) -> list:
    width = max([len(label) for label in labels] + [len(str(v)) for row in confusion for v in row] + [4])
    head = " " * (width + 2) + " ".join(f"{label:>{width}}" for label in labels)
    rows = [f"  {label:>{width}} " + " ".join(f"{v:>{width}d}" for v in row) for label, row in zip(labels, confusion)]
    return [head] + rows
