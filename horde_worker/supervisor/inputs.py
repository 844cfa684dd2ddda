"""A popped job's inputs, fetched before it queues: source image, mask and extra images.

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

from loguru import logger

from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy
from horde_worker.horde.wire import GenMetadata, GenMetadataType, GenMetadataValue, PopResponse

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
