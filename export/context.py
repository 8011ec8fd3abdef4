"""State shared by the export steps of one run."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..manifest import ArtifactFile, describe_file
from ..progress import Steps
from ..spec import ModelSpec

log = logging.getLogger("edge_emollama.export")


@dataclass
class ExportContext:
    cfg: Config
    spec: ModelSpec
    reference: object          # EmotionLlamaReference
    tokenizer: object          # edge_emollama.vocab.LlamaTokenizer
    vocab: object              # edge_emollama.vocab.Vocab
    staging: Path              # the folder being written (renamed to the output folder at the end)
    provenance: dict
    entries: list = field(default_factory=list)     # ArtifactFile of every model file written
    checks: dict = field(default_factory=dict)      # step -> quick validation figures
    skipped: dict = field(default_factory=dict)     # format -> reason
    timings: dict = field(default_factory=dict)     # step -> seconds
    progress: Steps = field(default_factory=lambda: Steps(0, "export", enabled=False))   # the numbered steps

    def add(self, path: Path, **kind) -> ArtifactFile:
        entry = describe_file(self.staging, path, **kind)
        self.entries.append(entry)
        return entry

    def files(self, **match) -> list:
        return [self.staging / e.file for e in self.entries if e.matches(**match)]


class StepTimer:
    """One export step: numbered on stderr with its time and the size of what it wrote (``ctx.progress``),
    logged, and timed into ``ctx.timings`` (the manifest's ``timings_s``). An exception goes on unchanged."""

    def __init__(self, ctx: ExportContext, name: str):
        self.ctx, self.name = ctx, name

    def __enter__(self):
        self.start, self.count = time.perf_counter(), len(self.ctx.entries)
        self.step = self.ctx.progress.step(self.name).__enter__()
        log.log(self._level(), "[%s] started", self.name)
        return self

    def bar(self, total, label: str, unit: str = "it"):
        """A byte or tensor bar inside this step (shown when the step takes a while)."""
        return self.ctx.progress.bar(total, label, unit)

    def _level(self) -> int:
        """DEBUG while the progress lines say as much on the console (the --log file keeps it), else INFO."""
        return logging.DEBUG if self.ctx.progress.enabled else logging.INFO

    def __exit__(self, kind, value, tb):
        seconds = time.perf_counter() - self.start
        self.ctx.timings[self.name] = round(seconds, 3)
        written = sum(e.bytes for e in self.ctx.entries[self.count:])
        self.step.note = human_bytes(written) if written else None
        self.step.__exit__(kind, value, tb)
        if kind is None:
            log.log(self._level(), "[%s] done in %.2f s, %s written", self.name, seconds, human_bytes(written))
        else:
            log.error("[%s] failed after %.2f s: %s", self.name, seconds, value)
        return False


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GB"
