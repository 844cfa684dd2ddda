"""The models this worker serves: resolved names, their files under cache_home, missing files fetched.

Checkpoints live in `<cache_home>/compvis/`, the layout the reGen worker uses, so an existing
reGen model cache is served in place without downloading anything again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from horde_worker.inference.flux_files import T5_TOKENIZER_DIR, T5_TOKENIZER_URL
from horde_worker.inference.tiny import DEMO_MODEL_NAME, ensure_demo_model
from horde_worker.models.controlnets import ControlSetup
from horde_worker.models.download import DownloadTask
from horde_worker.models.postprocessors import PostProcessSetup
from horde_worker.models.reference import ModelEntry, ModelReference
from horde_worker.models.resolve import resolve

# Baselines whose checkpoints this worker loads and generates with.
LOADABLE_BASELINES = {"stable_diffusion_1", "stable_diffusion_2", "stable_diffusion_xl", "flux_1"}
REFUSED_BASELINES = {
    "stable_cascade": "Stable Cascade is not supported by this worker",
}


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

    @property
    def requirements(self) -> dict[str, int]:
        """The step limits as bounds_reason reads them."""
        limits = {"min_steps": self.min_steps, "max_steps": self.max_steps}
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
        return sum(task.size or 0 for _, task in self.to_download)


def checkpoint_path(entry: ModelEntry, cache_home: Path) -> Path:
    """Where a reference entry's checkpoint lives under cache_home."""
    return Path(cache_home) / "compvis" / entry.checkpoint.name


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
        if not path.exists():
            if not entry.checkpoint.url:
                plan.notices.append(f"models_to_load: {entry.name!r}: {path} is missing and the reference gives no URL")
                continue
            size = entry.size_bytes if len(entry.files) == 1 else None
            missing.append(DownloadTask(entry.checkpoint.url, path, entry.checkpoint.sha256, size))
        if entry.baseline == "flux_1":
            tokenizer = path.parent / T5_TOKENIZER_DIR / "tokenizer.json"
            if not tokenizer.exists() and not any(t.dest == tokenizer for _, t in plan.to_download):
                missing.append(DownloadTask(T5_TOKENIZER_URL, tokenizer, None, None))
        if missing:
            plan.to_download += [(entry, task) for task in missing]
        else:
            plan.ready.append(served_from_entry(entry, path))
    return plan


def served_from_entry(entry: ModelEntry, path: Path) -> ServedModel:
    """The ServedModel of a reference entry whose checkpoint is at `path`."""
    return ServedModel(entry.name, path, entry.baseline, entry.v_prediction,
                       _int_or_none(entry.requirements.get("min_steps")), _int_or_none(entry.requirements.get("max_steps")))


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
