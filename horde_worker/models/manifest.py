"""A split model's manifest (`<name>.parts.json`): its baseline and each part's files, relative to the manifest.

The catalog writes one for a reference entry whose files are all present, the tiny test models write theirs the
same way, and the loaders read them back (no torch here: the supervisor plans with it).
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIX = ".parts.json"


def write_manifest_file(path: Path, name: str, baseline: str, parts: dict[str, list[str]]) -> Path:
    """Write (or leave, when unchanged) the manifest at `path`; returns it."""
    path = Path(path)
    text = json.dumps({"name": name, "baseline": baseline, "parts": parts}, indent=1)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def read_manifest(path: Path, required: tuple[str, ...] = ()) -> tuple[str, dict[str, list[Path]]]:
    """(baseline, file type -> files) of a manifest; every file must exist, and a part of each `required` type."""
    from horde_worker.inference.checkpoint import CheckpointError

    data = json.loads(Path(path).read_text())
    parts = {kind: [(Path(path).parent / f).resolve() for f in files] for kind, files in data["parts"].items()}
    for files in parts.values():
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{data.get('name', path)}: part {file} is missing")
    for kind in required:
        if kind not in parts:
            raise CheckpointError(f"{path}: no {kind} part")
    return str(data["baseline"]), parts
