"""The horde's image model reference: fetched at start, last good copy kept, shipped snapshot last.

Only models in the reference (or the user's custom_models) are advertised to the horde. The reference's
main branch lacks the newest baselines (Qwen-Image, Z-Image-Turbo): their entries come from its `zmodel`
branch, merged in for names the main branch does not have. Those entries list split files (a diffusion model,
a VAE, text encoders, each with its own directory beside the checkpoints), ComfyUI's layout.
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
NEW_BASELINES_REFERENCE_URL = (
    "https://raw.githubusercontent.com/Haidra-Org/AI-Horde-image-model-reference/zmodel/stable_diffusion.json"
)
SNAPSHOT = Path(__file__).parent / "data" / "stable_diffusion.json"
NEW_BASELINES_SNAPSHOT = Path(__file__).parent / "data" / "stable_diffusion.zmodel.json"

# The reference's baseline names, as this worker calls them.
BASELINES = {
    "stable diffusion 1": "stable_diffusion_1",
    "stable_diffusion_1": "stable_diffusion_1",
    "stable diffusion 2": "stable_diffusion_2",
    "stable diffusion 2 512": "stable_diffusion_2",
    "stable_diffusion_2": "stable_diffusion_2",
    "stable_diffusion_xl": "stable_diffusion_xl",
    "stable_cascade": "stable_cascade",
    "qwen_image": "qwen_image",
    "z_image_turbo": "z_image_turbo",
    "flux_1": "flux_1",
    "flux_schnell": "flux_1",
    "flux_dev": "flux_1",
}
# Baselines served only with load_large_models: the weights alone exceed 8 GB.
LARGE_BASELINES = frozenset({"stable_cascade", "flux_1", "qwen_image", "z_image_turbo"})
# How the worker's messages name the newer baselines, and those served without LoRAs and textual inversions.
BASELINE_NAMES = {"flux_1": "Flux", "z_image_turbo": "Z-Image", "qwen_image": "Qwen-Image",
                  "stable_cascade": "Stable Cascade"}
WITHOUT_ADAPTERS = frozenset({"z_image_turbo", "qwen_image", "stable_cascade"})
# What the horde multiplies a job's kudos by, per baseline (others: 1); Cascade's two-pass hires fix pays 7.
KUDOS_MULTIPLIERS = {"stable_diffusion_xl": 2, "stable_cascade": 4, "flux_1": 8, "z_image_turbo": 8, "qwen_image": 12}
CASCADE_HIRES_MULTIPLIER = 7


def kudos_multiplier(baseline: str, hires_fix: bool = False) -> int:
    """The horde's kudos multiplier for a job of `baseline`."""
    if baseline == "stable_cascade" and hires_fix:
        return CASCADE_HIRES_MULTIPLIER
    return KUDOS_MULTIPLIERS.get(baseline, 1)


# The file types of a split entry that hold the diffusion model itself (the others: vae, text_encoders, ...).
MAIN_FILE_TYPES = (None, "unet", "ckpt", "stable_cascade_stage_c")


@dataclass(frozen=True)
class ModelFile:
    """One file a model needs: where it goes, its hash, where to get it."""

    name: str
    sha256: str | None
    url: str | None
    # A split entry's part: "unet", "vae", "text_encoders", "stable_cascade_stage_b"/"_c"; None for a
    # checkpoint that holds everything.
    file_type: str | None = None
    # Where it goes, relative to the checkpoint folder (a split entry's VAE: "../vae").
    directory: str = ""


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
        """The weights file of the diffusion model (the first such file with a hash, else the first file)."""
        main = [f for f in self.files if f.file_type in MAIN_FILE_TYPES]
        return next((f for f in main if f.sha256), (main or list(self.files))[0])

    @property
    def is_split(self) -> bool:
        """The entry's parts are separate files (diffusion model, VAE, text encoders, ...)."""
        return any(f.file_type for f in self.files)

    @property
    def is_large(self) -> bool:
        """Cascade, Flux, Qwen-Image and Z-Image need load_large_models."""
        return self.baseline in LARGE_BASELINES


def parse_entry(raw: dict[str, Any]) -> ModelEntry | None:
    """A reference entry, or None for one this worker cannot even describe (no files)."""
    config = raw.get("config") or {}
    downloads = {d.get("file_name"): d for d in config.get("download") or [] if d.get("file_name")}
    files = []
    for item in config.get("files") or []:
        path = item.get("path")
        if not path or path.endswith((".yaml", ".yml")):
            continue
        download = downloads.get(path) or {}
        sha = item.get("sha256sum")
        directory = str(item.get("directory") or download.get("file_path") or "")
        files.append(ModelFile(path, sha.lower() if sha else None, download.get("file_url"),
                               item.get("file_type") or None, directory))
    for name, download in downloads.items():
        if not any(f.name == name for f in files):
            files.append(ModelFile(name, None, download.get("file_url"), None, str(download.get("file_path") or "")))
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


def _fetch_or_keep(cache_dir: Path, file_name: str, url: str | None, snapshot: Path, timeout: float,
                  what: str) -> tuple[dict[str, Any], str]:
    """A reference file from `url`; else the last good copy in `cache_dir`; else the shipped snapshot."""
    cached = cache_dir / file_name
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
            return data, f"fetched from {url}"
        except (requests.RequestException, ValueError) as exc:
            logger.warning("{} not fetched ({}): using the last good copy", what, type(exc).__name__)
    if cached.exists():
        try:
            data = json.loads(cached.read_text())
            if _valid(data):
                return data, f"last good copy {cached}"
        except ValueError:
            logger.warning("the saved {} {} is damaged; using the shipped snapshot", what, cached)
    return json.loads(snapshot.read_text()), "snapshot shipped with the worker"


def load_reference(cache_dir: Path, url: str | None = DEFAULT_REFERENCE_URL, timeout: float = 20.0,
                   new_baselines_url: str | None | bool = True) -> ModelReference:
    """The current reference from `url` (else the last good copy in `cache_dir`, else the shipped snapshot), with
    the entries of the newest baselines merged in from `new_baselines_url` for names it lacks. By default that is
    the reference's zmodel branch when `url` is the horde's own reference (a custom reference stays as it is)."""
    cache_dir = Path(cache_dir)
    data, source = _fetch_or_keep(cache_dir, "stable_diffusion.json", url, SNAPSHOT, timeout, "model reference")
    if new_baselines_url is True:
        # Offline (no url): the last good copy or the snapshot, never a fetch.
        new_baselines_url = NEW_BASELINES_REFERENCE_URL if url == DEFAULT_REFERENCE_URL else None if not url else False
    if new_baselines_url is not False:
        extra, extra_source = _fetch_or_keep(cache_dir, "stable_diffusion.zmodel.json", new_baselines_url or None,
                                             NEW_BASELINES_SNAPSHOT, timeout, "new baselines' model reference")
        known = {str(v.get("name", k)).lower() for k, v in data.items()}
        added = {k: v for k, v in extra.items() if str(v.get("name", k)).lower() not in known}
        if added:
            data = {**data, **added}
            source += f" + {len(added)} from {extra_source}"
    return ModelReference(data, source)
