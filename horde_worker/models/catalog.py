"""The models this worker serves: resolved names, their files under cache_home, missing files fetched.

Checkpoints live in `<cache_home>/compvis/`, the layout the reGen worker uses, so an existing
reGen model cache is served in place without downloading anything again. A split entry's parts go where
its reference entry says, relative to that folder (`<cache_home>/vae/`, `<cache_home>/text_encoders/`);
a part two models share (a VAE, a text encoder) is one file, fetched once. Such a model is served from a
small manifest beside the checkpoints (`<name>.parts.json`) naming its parts, which the loader reads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from horde_worker.inference import qwen_files
from horde_worker.inference.flux_files import T5_TOKENIZER_DIR, T5_TOKENIZER_URL
from horde_worker.inference.tiny import DEMO_MODEL_NAME, ensure_demo_model
from horde_worker.inference.zimage_files import TOKENIZER_DIR as ZIMAGE_TOKENIZER_DIR
from horde_worker.inference.zimage_files import TOKENIZER_URLS as ZIMAGE_TOKENIZER_URLS
from horde_worker.models.controlnets import ControlSetup
from horde_worker.models.download import DownloadTask
from horde_worker.models.manifest import SUFFIX as MANIFEST_SUFFIX
from horde_worker.models.manifest import write_manifest_file
from horde_worker.models.postprocessors import PostProcessSetup
from horde_worker.models.reference import ModelEntry, ModelFile, ModelReference
from horde_worker.models.resolve import resolve

# Baselines whose checkpoints this worker loads and generates with.
LOADABLE_BASELINES = {"stable_diffusion_1", "stable_diffusion_2", "stable_diffusion_xl", "flux_1", "z_image_turbo",
                      "qwen_image", "stable_cascade"}
REFUSED_BASELINES: dict[str, str] = {}
# The tokenizer each split baseline fetches beside its text encoder: (folder, file name -> URL).
SPLIT_TOKENIZERS = {"z_image_turbo": (ZIMAGE_TOKENIZER_DIR, ZIMAGE_TOKENIZER_URLS),
                    "qwen_image": (qwen_files.TOKENIZER_DIR, qwen_files.TOKENIZER_URLS)}


@dataclass(frozen=True)
class ServedModel:
    """A model the worker advertises, with the file it loads."""

    name: str
    path: Path
    baseline: str
    v_prediction: bool = False
    # The reference's step limits for this model (min_steps / max_steps), when it gives any.
    min_steps: int | None = None
    max_steps: int | None = None
    # Its cfg limits, the only samplers it takes, and the features it cannot do ("hires_fix", "inpainting",
    # "controlnet"), from the reference's `requirements` and `features_not_supported`.
    min_cfg_scale: float | None = None
    max_cfg_scale: float | None = None
    samplers: tuple[str, ...] = ()
    features_not_supported: tuple[str, ...] = ()

    @property
    def requirements(self) -> dict[str, float]:
        """The step and cfg limits as bounds_reason reads them."""
        limits = {"min_steps": self.min_steps, "max_steps": self.max_steps, "min_cfg_scale": self.min_cfg_scale,
                  "max_cfg_scale": self.max_cfg_scale}
        return {key: value for key, value in limits.items() if value is not None}


class ModelCatalog:
    """Name -> ServedModel, matched case-insensitively as the horde does."""

    def __init__(self, models: list[ServedModel], control: ControlSetup | None = None,
                 postprocess: PostProcessSetup | None = None) -> None:
        self._models = {m.name.lower(): m for m in models}
        self.control = control or ControlSetup()
        self.postprocess = postprocess or PostProcessSetup()

    def has(self, name: str) -> bool:
        return name.lower() in self._models

    def get(self, name: str) -> ServedModel:
        return self._models[name.lower()]

    def names(self) -> list[str]:
        return [m.name for m in self._models.values()]

    def __len__(self) -> int:
        return len(self._models)

    def baselines(self) -> set[str]:
        return {m.baseline for m in self._models.values()}


@dataclass
class CatalogPlan:
    """What resolving the settings gave: models ready now, files to fetch, and notices."""

    ready: list[ServedModel] = field(default_factory=list)
    to_download: list[tuple[ModelEntry, DownloadTask]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)

    @property
    def bytes_to_download(self) -> int:
        return sum(task.size or 0 for task in unique_tasks([task for _, task in self.to_download]))


def file_path(file: ModelFile, cache_home: Path) -> Path:
    """Where one of a reference entry's files lives under cache_home."""
    return Path(os.path.normpath(Path(cache_home) / "compvis" / file.directory / file.name))


def checkpoint_path(entry: ModelEntry, cache_home: Path) -> Path:
    """What the loader is given for a reference entry: its checkpoint, or a split entry's manifest."""
    if entry.is_split:
        return Path(cache_home) / "compvis" / (re.sub(r"[^A-Za-z0-9._-]+", "_", entry.name) + MANIFEST_SUFFIX)
    return file_path(entry.checkpoint, cache_home)


def write_manifest(entry: ModelEntry, cache_home: Path) -> Path:
    """A split entry's manifest: its baseline and each part's files (relative to the manifest's folder)."""
    path = checkpoint_path(entry, cache_home)
    parts: dict[str, list[str]] = {}
    for file in entry.files:
        relative = os.path.relpath(file_path(file, cache_home), path.parent)
        parts.setdefault(file.file_type or "checkpoint", []).append(relative)
    return write_manifest_file(path, entry.name, entry.baseline, parts)


def plan_catalog(models_to_load: list[str], models_to_skip: list[str], cache_home: Path, reference: ModelReference,
                 usage_counts: dict[str, int] | None, load_large_models: bool = False,
                 custom_models: list | None = None) -> CatalogPlan:
    """Resolve the settings and sort each model into ready, to download, or refused (with a notice)."""
    plan = CatalogPlan()
    customs = {c.name.lower(): c for c in custom_models or []}
    for custom in customs.values():
        if reference.get(custom.name) is not None:
            plan.notices.append(f"custom_models: {custom.name!r} is already a model of the horde's reference; "
                                "choose another name")
    extra = [DEMO_MODEL_NAME] + [c.name for c in customs.values() if reference.get(c.name) is None]
    resolution = resolve(models_to_load, models_to_skip, reference, usage_counts, load_large_models, extra)
    plan.notices += resolution.notices
    plan.resolved = list(resolution.names)
    for name in resolution.names:
        if name.lower() == DEMO_MODEL_NAME.lower():
            plan.ready.append(ServedModel(DEMO_MODEL_NAME, ensure_demo_model(Path(cache_home)), "stable_diffusion_1"))
            continue
        custom = customs.get(name.lower())
        if custom is not None:
            path = Path(custom.filepath).expanduser()
            if not path.exists():
                plan.notices.append(f"custom_models: {name!r}: {path} does not exist")
            elif custom.baseline not in LOADABLE_BASELINES:
                plan.notices.append(f"custom_models: {name!r}: baseline {custom.baseline!r} is not one of "
                                    f"{sorted(LOADABLE_BASELINES)}")
            else:
                plan.ready.append(ServedModel(custom.name, path, custom.baseline))
            continue
        entry = reference.get(name)
        if entry.baseline not in LOADABLE_BASELINES:
            why = REFUSED_BASELINES.get(entry.baseline, f"baseline {entry.baseline!r} is unknown to this worker")
            plan.notices.append(f"models_to_load: {entry.name!r} is left out: {why}")
            continue
        path = checkpoint_path(entry, cache_home)
        missing = []
        files = entry.files if entry.is_split else (entry.checkpoint,)
        unreachable = [file_path(f, cache_home) for f in files if not file_path(f, cache_home).exists() and not f.url]
        if unreachable:
            plan.notices.append(f"models_to_load: {entry.name!r}: {unreachable[0]} is missing and the reference "
                                "gives no URL")
            continue
        for file in files:
            dest = file_path(file, cache_home)
            if not dest.exists():
                size = entry.size_bytes if len(entry.files) == 1 else None
                missing.append(DownloadTask(file.url, dest, file.sha256, size))
        if entry.baseline == "flux_1":
            tokenizer = path.parent / T5_TOKENIZER_DIR / "tokenizer.json"
            if not tokenizer.exists() and not any(t.dest == tokenizer for _, t in plan.to_download):
                missing.append(DownloadTask(T5_TOKENIZER_URL, tokenizer, None, None))
        if entry.baseline in SPLIT_TOKENIZERS:
            encoder = next((f for f in entry.files if f.file_type == "text_encoders"), None)
            if encoder is not None:
                folder_name, urls = SPLIT_TOKENIZERS[entry.baseline]
                folder = file_path(encoder, cache_home).parent / folder_name
                missing += [DownloadTask(url, folder / name, None, None) for name, url in urls.items()
                            if not (folder / name).exists()]
        if missing:
            plan.to_download += [(entry, task) for task in missing]
        else:
            plan.ready.append(served_from_entry(entry, cache_home))
    return plan


def unique_tasks(tasks: list[DownloadTask]) -> list[DownloadTask]:
    """Each destination once: a file two models share is downloaded once."""
    seen: set[Path] = set()
    return [t for t in tasks if not (t.dest in seen or seen.add(t.dest))]


def served_from_entry(entry: ModelEntry, cache_home: Path) -> ServedModel:
    """The ServedModel of a reference entry whose files are all under `cache_home`; a split entry's manifest is
    written here."""
    path = write_manifest(entry, cache_home) if entry.is_split else checkpoint_path(entry, cache_home)
    needs = entry.requirements
    return ServedModel(entry.name, path, entry.baseline, entry.v_prediction,
                       _int_or_none(needs.get("min_steps")), _int_or_none(needs.get("max_steps")),
                       _float_or_none(needs.get("min_cfg_scale")), _float_or_none(needs.get("max_cfg_scale")),
                       tuple(str(s) for s in needs.get("samplers") or ()),
                       tuple(str(f) for f in entry.raw.get("features_not_supported") or ()))


def _float_or_none(value: object) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
