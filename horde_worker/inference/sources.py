"""Source images of a job as the pipelines want them: RGB at the job's size, and a mask.

Mask convention (the horde's): white is repainted, black is kept. Without `source_mask`, the
mask is the source's alpha channel, transparent meaning repaint. An img2img source with
transparent pixels is masked img2img: only those pixels change.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from horde_worker.inference.messages import GenerateRequest

# Pixels of feathering where repainted and kept regions meet, so that no seam shows.
MASK_FEATHER = 4


@dataclass
class Sources:
    """The decoded source image (RGB) and repaint mask (L, 255 = repaint) at the job's size."""

    image: Image.Image | None = None
    mask: Image.Image | None = None

    @property
    def painting(self) -> bool:
        return self.image is not None and self.mask is not None


def decode(data: bytes) -> Image.Image:
    """An encoded image, loaded."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _alpha_mask(image: Image.Image) -> Image.Image | None:
    if image.mode not in ("RGBA", "LA") and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None  # fully opaque: nothing to repaint
    return alpha.point(lambda a: 255 if a < 128 else 0)


def load_sources(request: GenerateRequest) -> Sources:
    """Decode and size the job's source image and its mask."""
    if request.source_image is None:
        return Sources()
    size = (request.width, request.height)
    raw = decode(request.source_image)
    mask = None
    if request.source_mask is not None:
        mask = decode(request.source_mask).convert("L").resize(size, Image.Resampling.LANCZOS)
    elif request.source_processing in ("inpainting", "outpainting", "img2img"):
        alpha = _alpha_mask(raw)
        if alpha is not None:
            mask = alpha.resize(size, Image.Resampling.NEAREST)
        elif request.source_processing != "img2img":
            mask = Image.new("L", size, 255)  # nothing marked: repaint everything
    image = _flatten(raw).resize(size, Image.Resampling.LANCZOS)
    return Sources(image=image, mask=mask)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels filled grey so that they do not pull the result to black."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (127, 127, 127, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def composite(generated: np.ndarray, sources: Sources) -> np.ndarray:
    """Keep the source's pixels outside the mask: the VAE round trip must not touch them."""
    if not sources.painting:
        return generated
    size = (generated.shape[1], generated.shape[0])
    mask = sources.mask.resize(size, Image.Resampling.NEAREST)
    hard = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    feathered = np.asarray(mask.filter(ImageFilter.GaussianBlur(MASK_FEATHER / 2)), dtype=np.float32)[..., None] / 255.0
    # The blur must not leak into kept pixels: only repainted pixels and their feathered edge change.
    edge = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * (MASK_FEATHER // 2) + 1)))[..., None] > 0
    weight = np.maximum(feathered * edge, hard)
    source = np.asarray(sources.image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    mixed = generated.astype(np.float32) * weight + source * (1.0 - weight)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

