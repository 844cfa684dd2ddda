"""From settings to a ready catalog: reference, usage statistics, resolution, downloads."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from horde_worker.config.bridge_data import BridgeData
from horde_worker.models.catalog import CatalogPlan, ModelCatalog, ServedModel, plan_catalog
from horde_worker.models.controlnets import CONTROL_BASELINES, ControlSetup, plan_control, ready_setup
from horde_worker.models.download import download_all
from horde_worker.models.postprocessors import HORDE_POSTPROCESSORS, PostProcessSetup, plan_postprocessors
from horde_worker.models.reference import ModelReference, load_reference


def usage_counts(horde_url: str, api_key: str) -> dict[str, int] | None:
    """The horde's monthly per-model usage (what TOP n / BOTTOM n rank by), or None if unreadable."""
    from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy

    client = HordeClient(horde_url, api_key, retry=RetryPolicy(attempts=2, base_delay=0.5), timeout=20)
    try:
        month = client.model_stats().get("month") or {}
    except (HordeError, HordeUnreachable) as exc:
        logger.warning("the horde's model statistics could not be read: {}", exc)
        return None
    return {str(k): int(v or 0) for k, v in month.items()}


def load_reference_for(settings: BridgeData) -> ModelReference:
    """The model reference the settings name, through `download_mirror` when one is set."""
    from horde_worker.models.download import mirrored
    from horde_worker.models.reference import DEFAULT_REFERENCE_URL, NEW_BASELINES_REFERENCE_URL

    url, mirror = settings.model_reference_url or None, settings.download_mirror
    if not mirror or not url:
        return load_reference(Path(settings.cache_home) / "reference", url)
    extra = mirrored(NEW_BASELINES_REFERENCE_URL, mirror) if url == DEFAULT_REFERENCE_URL else False
    return load_reference(Path(settings.cache_home) / "reference", mirrored(url, mirror), new_baselines_url=extra)


def plan_for(settings: BridgeData, reference: ModelReference | None = None,
             counts: dict[str, int] | None | str = "fetch") -> tuple[CatalogPlan, ModelReference]:
    """Resolve the settings' models against the reference (fetched unless given)."""
    cache_home = Path(settings.cache_home)
    if reference is None:
        reference = load_reference_for(settings)
    if counts == "fetch":
        needs_ranking = any(m.strip().upper().startswith(("TOP", "BOTTOM"))
                            for m in settings.models_to_load + settings.models_to_skip)
        counts = usage_counts(settings.horde_url, settings.api_key) if needs_ranking else {}
    plan = plan_catalog(settings.models_to_load, settings.models_to_skip, cache_home, reference, counts,
                        settings.load_large_models, settings.custom_models)
    return plan, reference


def prepare_models(settings: BridgeData, show_progress: bool = True) -> tuple[ModelCatalog, list[str]]:
    """Everything needed to serve: resolve, download what is missing (verified), and return the catalog."""
    plan, reference = plan_for(settings)
    logger.info("model reference: {} ({} models)", reference.source, len(reference))
    ready: list[ServedModel] = list(plan.ready)
    notices = list(plan.notices)
    if plan.to_download:
        logger.info("downloading {} model(s), {:.1f} GB", len(plan.to_download), plan.bytes_to_download / 1e9)
        from horde_worker.models.catalog import served_from_entry, unique_tasks

        notices += download_all(unique_tasks([task for _, task in plan.to_download]),
                                token=settings.civitai_api_token or None, show_progress=show_progress,
                                mirror=settings.download_mirror)

        by_model: dict[str, list] = {}
        for entry, task in plan.to_download:
            by_model.setdefault(entry.name, [entry, []])[1].append(task)
        for entry, tasks in by_model.values():
            if all(task.dest.exists() for task in tasks):
                ready.append(served_from_entry(entry, Path(settings.cache_home)))
    control = None
    if settings.allow_controlnet:
        control, control_notices = prepare_control(settings, {m.baseline for m in ready}, show_progress)
        notices += control_notices
    postprocess = None
    if settings.allow_post_processing:
        postprocess, pp_notices = prepare_postprocessors(settings, show_progress)
        notices += pp_notices
    return ModelCatalog(ready, control, postprocess), notices


def prepare_postprocessors(settings: BridgeData, show_progress: bool) -> tuple[PostProcessSetup, list[str]]:
    """The reference's upscalers and face fixers and rembg's U^2-Net, downloaded if missing."""
    setup, tasks = plan_postprocessors(Path(settings.cache_home))
    notices: list[str] = []
    if tasks:
        logger.info("allow_post_processing: downloading {} post-processor file(s)", len(tasks))
        notices += download_all(tasks, show_progress=show_progress, mirror=settings.download_mirror)
        setup, _ = plan_postprocessors(Path(settings.cache_home))
    absent = [name for name in HORDE_POSTPROCESSORS if not setup.has(name)]
    if absent:
        logger.info("post-processors without weights here (skipped when a job asks, and said so in gen_metadata): {}",
                    ", ".join(absent))
    return setup, notices


def prepare_control(settings: BridgeData, baselines: set[str], show_progress: bool) -> tuple[ControlSetup, list[str]]:
    """ControlNet files for the served baselines and the annotators' weights, downloaded if missing."""
    setup, tasks = plan_control(Path(settings.cache_home), baselines & set(CONTROL_BASELINES))
    notices: list[str] = []
    if tasks:
        logger.info("allow_controlnet: downloading {} ControlNet/annotator file(s)", len(tasks))
        notices += download_all(tasks, token=settings.civitai_api_token or None, show_progress=show_progress,
                                mirror=settings.download_mirror)
    ready = ready_setup(setup)
    if not ready.available:
        notices.append("allow_controlnet is on but no ControlNet file is available for the served models "
                       "(ControlNets exist for SD1.5 and SD2 models): the horde is told this worker does no ControlNet")
    return ready, notices
