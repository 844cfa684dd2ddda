"""Final latents of a batched job to 8-bit images, as the model's diffusers pipeline (SD, SDXL, Flux) decodes them."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def sd_images(pipe, latents: torch.Tensor) -> list[np.ndarray]:
    """Final SD latents to 8-bit RGB images, as the model's diffusers pipeline decodes them (SDXL's VAE
    upcast to float32 when its config asks for it)."""
    vae = pipe.vae
    upcast = hasattr(pipe, "text_encoder_2") and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        pixels = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return to_uint8(pipe.image_processor.postprocess(pixels, output_type="np"))


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Float images in [0, 1] as 8-bit arrays, rounded as `generate.Pass.call` rounds them."""
    as_bytes = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return [as_bytes[i] for i in range(as_bytes.shape[0])]


@torch.no_grad()
def flux_images(pipe, latents: torch.Tensor, width: int, height: int) -> list[np.ndarray]:
    """Final packed latents to 8-bit RGB images, as the Flux pipeline decodes them."""
    vae = pipe.vae
    unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    unpacked = (unpacked / vae.config.scaling_factor) + vae.config.shift_factor
    pixels = vae.decode(unpacked.to(next(vae.parameters()).device), return_dict=False)[0]
    return to_uint8(pipe.image_processor.postprocess(pixels, output_type="np"))


def one_by_one_in_tiles(model, latents: torch.Tensor, width: int, height: int) -> list[np.ndarray] | None:
    """The decode again, an image at a time in VAE tiles (after running out of memory); None if that fails too."""
    from loguru import logger

    pipe = model.pipeline
    tiled_before = getattr(pipe.vae, "use_tiling", False)  # the model's plan may tile already (inference/fit.py)
    try:
        pipe.vae.enable_tiling()
        images: list[np.ndarray] = []
        with torch.inference_mode():
            for row in range(latents.shape[0]):
                one = latents[row:row + 1]
                images += flux_images(pipe, one, width, height) if model.baseline == "flux_1" \
                    else sd_images(pipe, one)
        logger.warning("decoded {} image(s) in tiles after running out of device memory", len(images))
        return images
    except Exception:
        logger.exception("the tiled decode failed too")
        return None
    finally:
        if not tiled_before:
            pipe.vae.disable_tiling()
