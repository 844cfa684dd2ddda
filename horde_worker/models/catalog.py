"""The models this worker serves: names from the horde's model reference, files under cache_home.

Checkpoints live in `<cache_home>/compvis/`, the layout the reGen worker uses, so an existing
reGen model cache is served in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from horde_worker.inference.tiny import DEMO_MODEL_NAME, ensure_demo_model

REFERENCE_SNAPSHOT = Path(__file__).parent / "data" / "stable_diffusion.json"
LOADABLE_BASELINES = {"stable diffusion 1": "stable_diffusion_1"}
META_PREFIXES = ("ALL", "TOP ", "BOTTOM ")


@dataclass(frozen=True)
class ServedModel:
    """A model the worker advertises, with the file it loads."""

    name: str
    path: Path
    baseline: str


class ModelCatalog:
    """Name -> ServedModel, matched case-insensitively as the horde does."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name.lower(): m for m in models}

    def has(self, name: str) -> bool:
        return name.lower() in self._models

    def get(self, name: str) -> ServedModel:
        return self._models[name.lower()]

    def names(self) -> list[str]:
        return [m.name for m in self._models.values()]

    def __len__(self) -> int:
        return len(self._models)


def load_reference(path: Path = REFERENCE_SNAPSHOT) -> dict[str, dict[str, Any]]:
    """The horde's image model reference (the snapshot shipped with the package)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def checkpoint_file(entry: dict[str, Any], cache_home: Path) -> Path:
    """Where a reference entry's checkpoint lives under cache_home."""
    files = [f["path"] for f in entry.get("config", {}).get("files", []) if "sha256sum" in f]
    name = files[0] if files else entry["config"]["download"][0]["file_name"]
    return Path(cache_home) / "compvis" / name


def resolve_models(models_to_load: list[str], cache_home: Path,
                   reference: dict[str, dict[str, Any]] | None = None) -> tuple[list[ServedModel], list[str]]:
    """Served models for `models_to_load` (exact names) and notices about entries that cannot be served."""
    reference = load_reference() if reference is None else reference
    by_lower = {name.lower(): entry for name, entry in reference.items()}
    served, notices = [], []
    for wanted in models_to_load:
        if wanted.lower() == DEMO_MODEL_NAME.lower():
            served.append(ServedModel(DEMO_MODEL_NAME, ensure_demo_model(Path(cache_home)), "stable_diffusion_1"))
            continue
        if wanted.upper().startswith(META_PREFIXES):
            notices.append(f"models_to_load: {wanted!r}: meta-instructions (ALL, TOP n, ...) are not built yet; "
                           "list model names instead")
            continue
        entry = by_lower.get(wanted.lower())
        if entry is None:
            notices.append(f"models_to_load: {wanted!r} is not in the horde's model reference")
            continue
        baseline = LOADABLE_BASELINES.get(entry.get("baseline", ""))
        if baseline is None:
            notices.append(f"models_to_load: {entry['name']!r} is a {entry.get('baseline')} model; "
                           "this worker serves stable diffusion 1 models so far")
            continue
        path = checkpoint_file(entry, cache_home)
        if not path.exists():
            notices.append(f"models_to_load: {entry['name']!r}: {path} not found (put the checkpoint there; "
                           "automatic downloads are not built yet)")
            continue
        served.append(ServedModel(entry["name"], path, baseline))
    return served, notices
