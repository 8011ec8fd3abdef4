"""The artifact manifest: written last by the export stage, read first by the runtime.

The runtime refuses a manifest of another schema version, a preset it does not know, or files whose
size or SHA-256 differ from what was exported, with a message that says what to re-export. Hashing the
full-size folder (~25 GB) takes tens of seconds, so a file whose size and modification time are those
recorded in ``.verified.json`` after its last successful check is not hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"   # file -> [bytes, mtime_ns] of files whose SHA-256 matched (a cache, not a record)
SCHEMA = "edge-emollama.manifest"
VERSION = 1


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(root: Path, path: Path, **fields) -> dict:
    """A manifest entry for one written file."""
    return {"file": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": sha256(path), **fields}


@dataclass
class Artifacts:
    """A loaded, verified artifact folder."""
    root: Path
    manifest: dict

    def entries(self, **match) -> list:
        return [e for e in self.manifest["artifacts"] if all(e.get(k) == v for k, v in match.items())]

    def path(self, **match) -> Path:
        found = self.entries(**match)
        if not found:
            raise ArtifactError(f"{self.root / MANIFEST} lists no artifact with {match}; re-export with the "
                                "format included (edge-emollama export --formats ...)")
        return self.root / found[0]["file"]

    @property
    def preset(self) -> str:
        return self.manifest["preset"]


def load_artifacts(root: str | os.PathLike, verify: bool = True) -> Artifacts:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} holds no {MANIFEST}: it is not a finished export. Run "
                            f"'edge-emollama export --out {root}' (an interrupted export leaves no manifest).")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the folder") from exc
    if manifest.get("schema") != SCHEMA or manifest.get("version") != VERSION:
        raise ArtifactError(f"{path} is schema {manifest.get('schema')} v{manifest.get('version')}; this runtime "
                            f"reads {SCHEMA} v{VERSION}: re-export with this version of edge-emollama")
    if verify:
        _verify_all(root, manifest["artifacts"] + manifest.get("extra_files", []))
    return Artifacts(root, manifest)


def _verify_all(root: Path, entries: list) -> None:
    try:
        checked = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        checked = {}
    stamps = {entry["file"]: _verify(root, entry, checked.get(entry["file"])) for entry in entries}
    if stamps != checked:
        try:
            (root / VERIFIED).write_text(json.dumps(stamps))
        except OSError:   # a read-only folder: verified again next time
            pass


def _verify(root: Path, entry: dict, stamp: list | None) -> list:
    path = root / entry["file"]
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing; re-export the folder")
    info = path.stat()
    now = [info.st_size, info.st_mtime_ns]
    if now != stamp and (info.st_size != entry["bytes"] or sha256(path) != entry["sha256"]):
        raise ArtifactError(f"{path} differs from the file that was exported (size or SHA-256); it was changed "
                            "or damaged: re-export the folder")
    return now
