"""The horde's image model reference: fetched at start, last good copy kept, shipped snapshot last.

Only models in the reference (or the user's custom_models) are advertised to the horde.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from loguru import logger

DEFAULT_REFERENCE_URL = (
    "https://raw.githubusercontent.com/Haidra-Org/AI-Horde-image-model-reference/main/stable_diffusion.json"
)
SNAPSHOT = Path(__file__).parent / "data" / "stable_diffusion.json"

# The reference's baseline names, as this worker calls them.
BASELINES = {
    "stable diffusion 1": "stable_diffusion_1",
    "stable_diffusion_1": "stable_diffusion_1",
    "stable diffusion 2": "stable_diffusion_2",
    "stable diffusion 2 512": "stable_diffusion_2",
    "stable_diffusion_2": "stable_diffusion_2",
    "stable_diffusion_xl": "stable_diffusion_xl",
    "stable_cascade": "stable_cascade",
    "flux_1": "flux_1",
    "flux_schnell": "flux_1",
    "flux_dev": "flux_1",
}


@dataclass(frozen=True)
class ModelFile:
    """One file a model needs: where it goes, its hash, where to get it."""

    name: str
    sha256: str | None
    url: str | None


@dataclass(frozen=True)
class ModelEntry:
    """One model of the reference."""

    name: str
    baseline: str
    inpainting: bool
    nsfw: bool
    style: str
    size_bytes: int
    files: tuple[ModelFile, ...]
    requirements: dict[str, Any]
    v_prediction: bool
    raw: dict[str, Any]

    @property
    def checkpoint(self) -> ModelFile:
        """The weights file (the first file with a hash, else the first download)."""
        return next((f for f in self.files if f.sha256), self.files[0])

    @property
    def is_large(self) -> bool:
        """Cascade and Flux need load_large_models."""
        return self.baseline in ("stable_cascade", "flux_1")


def parse_entry(raw: dict[str, Any]) -> ModelEntry | None:
    """A reference entry, or None for one this worker cannot even describe (no files)."""
    config = raw.get("config") or {}
    downloads = {d.get("file_name"): d for d in config.get("download") or [] if d.get("file_name")}
    files = []
    for item in config.get("files") or []:
        path = item.get("path")
        if not path or path.endswith((".yaml", ".yml")):
            continue
        url = (downloads.get(path) or {}).get("file_url")
        sha = item.get("sha256sum")
        files.append(ModelFile(path, sha.lower() if sha else None, url))
    for name, download in downloads.items():
        if not any(f.name == name for f in files):
            files.append(ModelFile(name, None, download.get("file_url")))
    if not files:
        return None
    yaml_files = [item.get("path", "") for item in config.get("files") or []]
    baseline = BASELINES.get(str(raw.get("baseline", "")).lower(), str(raw.get("baseline", "")))
    return ModelEntry(
        name=raw["name"], baseline=baseline, inpainting=bool(raw.get("inpainting")), nsfw=bool(raw.get("nsfw")),
        style=str(raw.get("style", "")), size_bytes=int(raw.get("size_on_disk_bytes") or 0), files=tuple(files),
        requirements=dict(raw.get("requirements") or {}),
        v_prediction=any("-v.yaml" in path for path in yaml_files), raw=raw,
    )


class ModelReference:
    """Name -> ModelEntry, looked up case-insensitively."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.source = source
        self.entries: dict[str, ModelEntry] = {}
        for raw in data.values():
            if isinstance(raw, dict) and raw.get("name"):
                entry = parse_entry(raw)
                if entry is not None:
                    self.entries[entry.name.lower()] = entry

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name.lower())

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries.values()]

    def __len__(self) -> int:
        return len(self.entries)


def _valid(data: Any) -> bool:
    return isinstance(data, dict) and len(data) > 0 and all(isinstance(v, dict) for v in data.values())


def load_reference(cache_dir: Path, url: str | None = DEFAULT_REFERENCE_URL, timeout: float = 20.0) -> ModelReference:
    """The current reference from `url`; else the last good copy in `cache_dir`; else the shipped snapshot."""
    cache_dir = Path(cache_dir)
    cached = cache_dir / "stable_diffusion.json"
    if url:
        try:
            response = requests.get(url, timeout=timeout)
            response.raise_for_status()
            data = response.json()
            if not _valid(data):
                raise ValueError("not a model reference")
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(cached)
            return ModelReference(data, f"fetched from {url}")
        except (requests.RequestException, ValueError) as exc:
            logger.warning("model reference not fetched ({}): using the last good copy", type(exc).__name__)
    if cached.exists():
        try:
            data = json.loads(cached.read_text())
            if _valid(data):
                return ModelReference(data, f"last good copy {cached}")
        except ValueError:
            logger.warning("the saved model reference {} is damaged; using the shipped snapshot", cached)
    return ModelReference(json.loads(SNAPSHOT.read_text()), "snapshot shipped with the worker")
