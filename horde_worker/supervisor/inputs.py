"""A popped job's inputs, fetched before it queues: source image, mask, extra images, LoRAs, TIs.

Runs in the supervisor (threads, no torch). Each image comes from an http(s) URL or as base64;
both are capped in bytes, and in pixels before the pixels are decoded. An input that cannot be
had becomes gen_metadata (`download_failed` / `parse_failed`) and the job goes on without it,
as the horde expects: the requester is told, the job is not faulted. Nothing about an input
may raise out of here: whatever goes wrong with one (network, decoding, odd types) is a note.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy
from horde_worker.horde.urls import form_problem
from horde_worker.horde.wire import GenMetadata, GenMetadataType, GenMetadataValue, PopResponse
from horde_worker.inference.messages import AdapterFile
from horde_worker.models.civitai import HOLD_SECONDS, AdapterCache, AdapterUnavailable, AdapterVersion, pick_trigger

MAX_SOURCE_BYTES = 20 << 20
MAX_SOURCE_PIXELS = 4096 * 4096
# What requesters send; other formats Pillow knows (EPS through Ghostscript, say) are not worth the risk.
IMAGE_FORMATS = ("WEBP", "PNG", "JPEG", "GIF", "BMP")
SOURCE_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=5)
_DATA_URI = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


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
    """Width and height of an encoded image, refusing anything but a whole picture of at most
    MAX_SOURCE_PIXELS in one of IMAGE_FORMATS.

    The size comes from the header and is checked before a pixel is decoded, so a small file
    that claims huge dimensions costs nothing; Pillow's own bomb error (or its warning, where
    warnings are errors) and truncated or corrupt data are refused the same way.
    """
    from PIL import Image

    if not isinstance(data, bytes | bytearray) or not data:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, "no image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > MAX_SOURCE_PIXELS:
                raise SourceUnusable(GenMetadataValue.PARSE_FAILED,
                                     f"{width}x{height} is more than {MAX_SOURCE_PIXELS} pixels")
            image.load()
    except SourceUnusable:
        raise
    except Exception as exc:  # Pillow fails in many ways, and a bomb warning may be an error
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, f"not a readable image: {type(exc).__name__}: {exc}") from None
    return width, height


def read_reference(client: HordeClient, reference: object, allow_unsafe_ip: bool = True) -> bytes:
    """The bytes behind a source reference: an http(s) URL is downloaded (from a public address only,
    unless `allow_unsafe_ip`), a `data:image/...;base64,` URI or bare base64 is decoded, and
    anything else (another scheme, another type) is refused without a request."""
    if not isinstance(reference, str):
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, f"a {type(reference).__name__}, not an image reference")
    text = reference.strip()
    data_uri = _DATA_URI.match(text)
    if data_uri:
        text = text[data_uri.end():]
    elif ":" in text:  # base64 has no colon: this is meant as a URL
        problem = form_problem(text)
        if problem is not None:
            raise SourceUnusable(GenMetadataValue.PARSE_FAILED, problem)
        try:
            return client.download(text, MAX_SOURCE_BYTES, SOURCE_RETRY, allow_private=allow_unsafe_ip)
        except (HordeUnreachable, HordeError) as exc:
            raise SourceUnusable(GenMetadataValue.DOWNLOAD_FAILED, str(exc)) from None
    if len(text) > MAX_SOURCE_BYTES * 4 // 3 + 4:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, "base64 image larger than the cap")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise SourceUnusable(GenMetadataValue.PARSE_FAILED, f"not base64: {exc}") from None


def _fetch(client: HordeClient, reference: object, kind: GenMetadataType, job_id: str, notes: list[GenMetadata],
           allow_unsafe_ip: bool) -> bytes | None:
    """One image input, checked; None (and a note) when it cannot be used. Never raises."""
    if reference is None or reference == "":
        return None
    failed = GenMetadataValue.DOWNLOAD_FAILED
    try:
        data = read_reference(client, reference, allow_unsafe_ip)
        failed = GenMetadataValue.PARSE_FAILED
        check_image(data)
        return data
    except SourceUnusable as exc:
        failed, detail = exc.value, str(exc)
    except Exception as exc:  # one input's failure must never end the job
        detail = f"{type(exc).__name__}: {exc}"
    logger.warning("job {}: {} unusable ({}): {}", job_id, kind.value, failed.value, detail[:300])
    notes.append(GenMetadata(type=kind, value=failed))
    return None


def _extra_entry(extra: object) -> tuple[object, float] | None:
    """An extra source's reference and strength, or None when the entry is malformed."""
    image = extra.get("image") if isinstance(extra, dict) else getattr(extra, "image", None)
    strength = extra.get("strength", 1.0) if isinstance(extra, dict) else getattr(extra, "strength", 1.0)
    if not isinstance(image, str) or not image or isinstance(strength, bool) or not isinstance(strength, int | float):
        return None
    return (image, float(strength)) if math.isfinite(strength) else None


def fetch_inputs(client: HordeClient, pop: PopResponse, *, allow_unsafe_ip: bool = True) -> JobInputs:
    """Everything the job's pop points at, fetched and checked. Never raises: each input that
    cannot be had is a note in `notes` and is left out.

    `allow_unsafe_ip` (the bridge setting of that name) lets source URLs point at loopback and
    private addresses; without it only public addresses are fetched.
    """
    inputs = JobInputs()
    job_id = "?"
    try:
        job_id = str(pop.ids[0]) if pop.ids else "?"
        extra_kind = GenMetadataType.EXTRA_SOURCE_IMAGES

        def fetch(reference: object, kind: GenMetadataType) -> bytes | None:
            return _fetch(client, reference, kind, job_id, inputs.notes, allow_unsafe_ip)

        inputs.source_image = fetch(getattr(pop, "source_image", None), GenMetadataType.SOURCE_IMAGE)
        if inputs.source_image is not None:
            inputs.source_mask = fetch(getattr(pop, "source_mask", None), GenMetadataType.SOURCE_MASK)
        extras = getattr(pop, "extra_source_images", None) or []
        if not isinstance(extras, list | tuple):
            logger.warning("job {}: extra_source_images is a {}, not a list", job_id, type(extras).__name__)
            inputs.notes.append(GenMetadata(type=extra_kind, value=GenMetadataValue.PARSE_FAILED))
            extras = []
        for extra in extras:
            entry = _extra_entry(extra)
            if entry is None:
                logger.warning("job {}: malformed extra source image entry left out", job_id)
                inputs.notes.append(GenMetadata(type=extra_kind, value=GenMetadataValue.PARSE_FAILED))
                continue
            data = fetch(entry[0], extra_kind)
            if data is not None:
                inputs.extra_images.append((data, entry[1]))
    except Exception:  # a last guard: the job goes on with what was had
        logger.exception("job {}: reading its inputs failed; going on with what was fetched", job_id)
    return inputs


@dataclass
class AdapterCaches:
    """The LoRA and TI caches of a worker."""

    loras: AdapterCache
    tis: AdapterCache

    @classmethod
    def from_settings(cls, cache_home: str, max_gb: int, api_url: str, token: str) -> AdapterCaches:
        """The caches under `cache_home`; a file handed to a job is kept for HOLD_SECONDS whatever the cap."""
        root = Path(cache_home)
        return cls(loras=AdapterCache("lora", root / "lora", max_gb << 30, api_url=api_url, token=token,
                                      hold_seconds=HOLD_SECONDS),
                   tis=AdapterCache("ti", root / "ti", (max_gb << 30) // 10, api_url=api_url, token=token,
                                    hold_seconds=HOLD_SECONDS))

    def release(self, files: list[AdapterFile]) -> None:
        """The job that was handed `files` is done with them: they may be evicted again. Never raises."""
        for adapter in files:
            for cache in (self.loras, self.tis):
                cache.release(Path(adapter.path))


def _note(kind: GenMetadataType, value: str, name: str) -> GenMetadata:
    known = {v.value for v in GenMetadataValue}
    return GenMetadata(type=kind, value=GenMetadataValue(value if value in known else "download_failed"),
                       ref=name[:255])


def _lora_file(spec, name: str, path: Path, version: AdapterVersion) -> AdapterFile:
    return AdapterFile(name=name, path=str(path), model_strength=spec.model, clip_strength=spec.clip,
                       inject=pick_trigger(version, spec.inject_trigger))


def _ti_file(spec, name: str, path: Path, version: AdapterVersion) -> AdapterFile:
    return AdapterFile(name=name, path=str(path), clip_strength=spec.strength, inject=spec.inject_ti,
                       token=f"<ti{version.version_id}>", aliases=(version.model_name, Path(version.file_name).stem))


def _fetch_adapter(cache: AdapterCache, kind: GenMetadataType, spec, baseline: str, notes: list[GenMetadata],
                   allow_lora: bool) -> AdapterFile | None:
    """One LoRA or TI on disk, or None (and a note) when it cannot be had. Never raises."""
    name = str(getattr(spec, "name", ""))
    what = "LoRA" if kind == GenMetadataType.LORA else "textual inversion"
    if not allow_lora:
        logger.warning("{} {!r} left out: allow_lora is off", what, name)
        notes.append(_note(kind, "download_failed", name))
        return None
    try:
        is_version = kind == GenMetadataType.LORA and bool(getattr(spec, "is_version", False))
        path, version = cache.fetch(name, is_version, baseline)
        return (_lora_file if kind == GenMetadataType.LORA else _ti_file)(spec, name, path, version)
    except AdapterUnavailable as exc:
        value, detail = exc.value, str(exc)
    except Exception as exc:  # one adapter's failure must never end the job
        value, detail = "download_failed", f"{type(exc).__name__}: {exc}"
    logger.warning("{} {!r} left out: {}", what, name, detail[:300])
    notes.append(_note(kind, value, name))
    return None


def fetch_adapters(caches: AdapterCaches, pop: PopResponse, baseline: str, notes: list[GenMetadata], *,
                   allow_lora: bool = True) -> tuple[list[AdapterFile], list[AdapterFile]]:
    """The job's LoRAs and TIs on disk; each one that cannot be had is noted in `notes` and left out.

    Never raises. Without `allow_lora` (the bridge setting) CivitAI is not contacted at all: every
    LoRA and TI is left out with a `download_failed` note. The same file asked for by several jobs
    at once is downloaded once.
    """
    try:
        lora_specs, ti_specs = list(pop.payload.loras or []), list(pop.payload.tis or [])
    except Exception:
        logger.exception("the job's LoRA and TI list cannot be read; going on without them")
        return [], []
    loras = [f for spec in lora_specs
             if (f := _fetch_adapter(caches.loras, GenMetadataType.LORA, spec, baseline, notes, allow_lora))]
    tis = [f for spec in ti_specs
           if (f := _fetch_adapter(caches.tis, GenMetadataType.TI, spec, baseline, notes, allow_lora))]
    return loras, tis
