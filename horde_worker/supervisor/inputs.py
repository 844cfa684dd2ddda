"""A popped job's inputs, fetched before it queues: source image, mask, extra images, LoRAs, TIs.

Runs in the supervisor (threads, no torch). Each image comes from a presigned URL or as
base64; both are capped in bytes, and in pixels before the pixels are decoded. An input that
cannot be had becomes gen_metadata (`download_failed` / `parse_failed`) and the job goes on
without it, as the horde expects: the requester is told, the job is not faulted.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy
from horde_worker.horde.wire import GenMetadata, GenMetadataType, GenMetadataValue, PopResponse
from horde_worker.inference.messages import AdapterFile
from horde_worker.models.civitai import AdapterCache, AdapterUnavailable, pick_trigger

MAX_SOURCE_BYTES = 20 << 20
MAX_SOURCE_PIXELS = 4096 * 4096


class SourceUnusable(Exception):
    """A source image that cannot be used; `value` says how it failed."""

    def __init__(self, value: GenMetadataValue, detail: str) -> None:
        super().__init__(detail)
        self.value = value


@dataclass
class JobInputs:
    """Decoded-and-checked input bytes of one job, and what went wrong getting them."""

    source_image: bytes | None = None
    source_mask: bytes | None = None
    extra_images: list[tuple[bytes, float]] = field(default_factory=list)
    notes: list[GenMetadata] = field(default_factory=list)


def check_image(data: bytes) -> tuple[int, int]:
    """Width and height of an encoded image, refusing pixel bombs before decoding them fully."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_SOURCE_PIXELS:
                raise SourceUnusable(GenMetadataValue.PARSE_FAILED,
                                     f"{width}x{height} is more than {MAX_SOURCE_PIXELS} pixels")
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, f"not a readable image: {exc}") from None
    return width, height


def read_reference(client: HordeClient, reference: str) -> bytes:
    """The bytes behind a source reference: a URL is downloaded, anything else is base64."""
    if reference.startswith(("http://", "https://")):
        try:
            return client.download(reference, MAX_SOURCE_BYTES, RetryPolicy(attempts=3, base_delay=0.5, max_delay=5))
        except (HordeUnreachable, HordeError) as exc:
            raise SourceUnusable(GenMetadataValue.DOWNLOAD_FAILED, str(exc)) from None
    if len(reference) > MAX_SOURCE_BYTES * 4 // 3 + 4:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, "base64 image larger than the cap")
    try:
        return base64.b64decode(reference, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, f"not base64: {exc}") from None


def _fetch(client: HordeClient, reference: str | None, kind: GenMetadataType, job_id: str,
           notes: list[GenMetadata]) -> bytes | None:
    if not reference:
        return None
    try:
        data = read_reference(client, reference)
        check_image(data)
        return data
    except SourceUnusable as exc:
        logger.warning("job {}: {} unusable ({}): {}", job_id, kind.value, exc.value.value, exc)
        notes.append(GenMetadata(type=kind, value=exc.value))
        return None


def fetch_inputs(client: HordeClient, pop: PopResponse) -> JobInputs:
    """Everything the job's pop points at, fetched and checked."""
    job_id = pop.ids[0] if pop.ids else "?"
    inputs = JobInputs()
    inputs.source_image = _fetch(client, pop.source_image, GenMetadataType.SOURCE_IMAGE, job_id, inputs.notes)
    if inputs.source_image is not None:
        inputs.source_mask = _fetch(client, pop.source_mask, GenMetadataType.SOURCE_MASK, job_id, inputs.notes)
    for extra in pop.extra_source_images or []:
        data = _fetch(client, extra.image, GenMetadataType.EXTRA_SOURCE_IMAGES, job_id, inputs.notes)
        if data is not None:
            inputs.extra_images.append((data, extra.strength))
    return inputs


@dataclass
class AdapterCaches:
    """The LoRA and TI caches of a worker."""

    loras: AdapterCache
    tis: AdapterCache

    @classmethod
    def from_settings(cls, cache_home: str, max_gb: int, api_url: str, token: str) -> AdapterCaches:
        root = Path(cache_home)
        return cls(loras=AdapterCache("lora", root / "lora", max_gb << 30, api_url=api_url, token=token),
                   tis=AdapterCache("ti", root / "ti", (max_gb << 30) // 10, api_url=api_url, token=token))


def fetch_adapters(caches: AdapterCaches, pop: PopResponse, baseline: str,
                   notes: list[GenMetadata]) -> tuple[list[AdapterFile], list[AdapterFile]]:
    """The job's LoRAs and TIs on disk; each one that cannot be had is noted and left out."""
    payload = pop.payload
    loras: list[AdapterFile] = []
    for spec in payload.loras:
        try:
            path, version = caches.loras.fetch(spec.name, spec.is_version, baseline)
        except AdapterUnavailable as exc:
            logger.warning("LoRA {} left out: {}", spec.name, exc)
            notes.append(GenMetadata(type=GenMetadataType.LORA, value=GenMetadataValue(exc.value), ref=spec.name[:255]))
            continue
        loras.append(AdapterFile(name=spec.name, path=str(path), model_strength=spec.model, clip_strength=spec.clip,
                                 inject=pick_trigger(version, spec.inject_trigger)))
    tis: list[AdapterFile] = []
    for ti in payload.tis:
        try:
            path, version = caches.tis.fetch(ti.name, False, baseline)
        except AdapterUnavailable as exc:
            logger.warning("textual inversion {} left out: {}", ti.name, exc)
            notes.append(GenMetadata(type=GenMetadataType.TI, value=GenMetadataValue(exc.value), ref=ti.name[:255]))
            continue
        tis.append(AdapterFile(name=ti.name, path=str(path), clip_strength=ti.strength, inject=ti.inject_ti,
                               token=f"<ti{version.version_id}>",
                               aliases=(version.model_name, Path(version.file_name).stem)))
    return loras, tis
