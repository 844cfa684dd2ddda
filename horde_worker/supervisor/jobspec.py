"""From a popped job to an inference request, and from finished images to submit bodies."""

from __future__ import annotations

import base64
import io
import zlib
from typing import Any

from horde_worker.horde.wire import GenMetadata, GenMetadataType, GenMetadataValue, JobPayload, SubmitRequest, SubmitState
from horde_worker.inference.messages import GenerateRequest
from horde_worker.inference.samplers import sampler_refusal
from horde_worker.models.catalog import ModelCatalog
from horde_worker.models.reference import BASELINE_NAMES, WITHOUT_ADAPTERS
from horde_worker.supervisor.job import Job

SEED_RANGE = 2**32


def base_seed(payload: JobPayload) -> int:
    """The pop's seed string as an integer (digits as they are, other text hashed stably)."""
    text = (payload.seed or "").strip()
    if text.isdigit():
        return int(text) % SEED_RANGE
    return zlib.crc32(text.encode()) % SEED_RANGE


def seeds_for(payload: JobPayload, count: int) -> list[int]:
    """One seed per image: the batch shares the pop's seed, so image i gets seed + i, and a request for
    that single seed makes the same picture."""
    start = base_seed(payload)
    return [(start + i) % SEED_RANGE for i in range(count)]


def split_prompt(prompt: str) -> tuple[str, str]:
    """(positive, negative): the negative prompt follows the first `###`."""
    positive, sep, negative = prompt.partition("###")
    return positive.strip(), negative.replace("###", " ").strip() if sep else ""


def unsupported_reason(job: Job, catalog: ModelCatalog) -> str | None:
    """Why this worker cannot do the job faithfully, or None."""
    payload = job.pop.payload
    if not catalog.has(job.model):
        return f"model {job.model!r} is not served by this worker"
    model = catalog.get(job.model)
    baseline = model.baseline
    if payload.tiling and baseline in ("flux_1", "z_image_turbo", "qwen_image", "stable_cascade"):
        return f"tiling is not available for {baseline} models"
    used = {"hires_fix": payload.hires_fix, "controlnet": bool(payload.control_type),
            "inpainting": job.pop.source_processing in ("inpainting", "outpainting")}
    excluded = [feature for feature in model.features_not_supported if used.get(feature)]
    if excluded:
        return f"{', '.join(excluded)} is not supported by {model.name} (the model reference says so)"
    if baseline in WITHOUT_ADAPTERS and (payload.loras or payload.tis):
        return f"LoRAs and textual inversions are not available for {BASELINE_NAMES[baseline]} models"
    processing = job.pop.source_processing or "img2img"
    if baseline == "stable_cascade" and job.pop.source_image and processing != "remix":
        return f"{processing} is not available for Stable Cascade models (remix is)"
    if model.samplers and payload.sampler_name not in model.samplers:
        return f"{model.name} samples with {', '.join(model.samplers)} only, not {payload.sampler_name!r}"
    refusal = sampler_refusal(payload.sampler_name, baseline)
    if refusal is None and payload.control_type:
        refusal = catalog.control.refusal(payload.control_type, baseline, payload.image_is_control)
    if refusal is None and payload.control_type and not job.pop.source_image:
        refusal = "a ControlNet job needs a source image"
    if refusal is not None:
        return refusal
    unsupported = [name for name, used in (
        ("transparent", payload.transparent), ("workflow", payload.workflow)) if used]
    if unsupported:
        return f"not supported yet: {', '.join(unsupported)}"
    return None


def generate_request(job: Job, catalog: ModelCatalog) -> GenerateRequest:
    """The message an inference process runs for this job."""
    payload, inputs = job.pop.payload, job.inputs
    model = catalog.get(job.model)
    positive, negative = split_prompt(payload.prompt)
    return GenerateRequest(
        job_id=job.id,
        model_name=model.name,
        model_path=str(model.path),
        baseline=model.baseline,
        prompt=positive,
        negative_prompt=negative,
        width=payload.width,
        height=payload.height,
        steps=payload.ddim_steps,
        cfg_scale=payload.cfg_scale,
        sampler_name=payload.sampler_name,
        karras=payload.karras,
        seeds=list(job.seeds),
        clip_skip=max(1, payload.clip_skip),
        v_prediction=model.v_prediction,
        tiling=payload.tiling,
        hires_fix=payload.hires_fix,
        hires_fix_denoising_strength=payload.hires_fix_denoising_strength,
        source_image=inputs.source_image if inputs else None,
        source_mask=inputs.source_mask if inputs else None,
        source_processing=job.pop.source_processing or "img2img",
        denoising_strength=payload.denoising_strength,
        extra_images=list(inputs.extra_images) if inputs else [],
        loras=list(job.loras),
        tis=list(job.tis),
        control_type=payload.control_type,
        control_model_path=control_path(catalog, payload.control_type, model.baseline),
        image_is_control=payload.image_is_control,
        return_control_map=payload.return_control_map,
        extra={"annotator_dir": str(catalog.control.annotator_dir or ""),
               "face_dir": str(catalog.postprocess.face_dir or "")},
        post_processing=catalog.postprocess.steps(payload.post_processing),
        facefixer_strength=payload.facefixer_strength,
        deadline=job.deadline,
    )


def control_path(catalog: ModelCatalog, control_type: str | None, baseline: str) -> str | None:
    path = catalog.control.files.get((control_type or "", baseline))
    return str(path) if path else None


def notes_metadata(notes: list[tuple[str, str, str | None]]) -> list[GenMetadata]:
    """gen_metadata entries from an inference process's (type, value, ref) notes."""
    return [GenMetadata(type=GenMetadataType(kind), value=GenMetadataValue(value), ref=ref)
            for kind, value, ref in notes]


MAX_GEN_METADATA = 50


def fault_metadata(job: Job) -> list[GenMetadata]:
    """A faulted submit's gen_metadata: what was noted on the way, then the reason, within the horde's limits."""
    reason = GenMetadata(type=GenMetadataType.INFORMATION, value=GenMetadataValue.SEE_REF,
                         ref=f"faulted: {job.fault_reason}"[:255])
    return [*job.gen_metadata[:MAX_GEN_METADATA - 1], reason]


def encode_webp(image: Any, quality: int = 95) -> bytes:
    """HxWxC uint8 pixels as WebP bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def submit_body(job: Job, index: int) -> SubmitRequest:
    """The submit for the job's `index`-th id: R2 when its upload succeeded, base64 WebP otherwise."""
    job_id = job.ids[index]
    seed = job.seeds[index] if index < len(job.seeds) else base_seed(job.pop.payload)
    if job.fault_reason is not None:
        return SubmitRequest(id=job_id, generation="R2", seed=seed, state=SubmitState.FAULTED,
                             gen_metadata=fault_metadata(job))
    uploaded = index < len(job.uploaded) and job.uploaded[index]
    generation = "R2" if uploaded else base64.b64encode(job.webp[index]).decode()
    state = job.image_states[index] if index < len(job.image_states) else SubmitState.OK
    own = job.image_metadata[index] if index < len(job.image_metadata) else []
    return SubmitRequest(id=job_id, generation=generation, seed=seed, state=state,
                         gen_metadata=[*job.gen_metadata[:MAX_GEN_METADATA - len(own)], *own])
