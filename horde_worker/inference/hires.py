"""The hires fix as the reference worker runs it.

    first pass   txt2img at a size the model was trained for, with the job's aspect ratio
    upscale      the first pass's latents, nearest-exact, to the requested size
    second pass  img2img of those latents at `hires_fix_denoising_strength` (0.65 if unset), on the
                 "simple" schedule, for fewer steps than the job asked (`second_pass_steps`)

Small jobs (SD: a side of 512 or less; SDXL: a side of 1024 or less) and Flux jobs skip the fix: the
reference makes them in one pass.
"""

from __future__ import annotations

import torch

DEFAULT_STRENGTH = 0.65
# SDXL's training buckets: the first pass takes the one nearest the job's aspect ratio.
XL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536))
SECOND_PASS_SCHEDULE = "simple"


def native_side(baseline: str) -> int:
    return 1024 if baseline in ("stable_diffusion_xl", "flux_1") else 512


def applies(baseline: str, width: int, height: int) -> bool:
    """Whether a hires fix runs two passes for this job (the reference's rule)."""
    if baseline == "flux_1":
        return False
    side = native_side(baseline)
    return width > side and height > side


def first_pass_size(baseline: str, width: int, height: int) -> tuple[int, int]:
    """The first pass's size: SDXL's nearest bucket, otherwise the short side at 512 (multiples of 64)."""
    if baseline == "stable_diffusion_xl":
        return min(XL_BUCKETS, key=lambda wh: abs(wh[0] / wh[1] - width / height))
    ratio = min(width / 512, height / 512)
    return int(width // (ratio * 64)) * 64, int(height // (ratio * 64)) * 64


def second_pass_steps(baseline: str, width: int, height: int, strength: float, steps: int) -> int:
    """How many steps the second pass runs: fewer at low strength, more for larger images, at least
    min(6, steps) and at most `steps`."""
    native = native_side(baseline)
    area_factor = (width * height) / (native * native) / (3 * (512 / native))
    strength = min(1.0, max(0.01, strength))
    count = round(3 + (steps - 3) * strength**2)
    count = round(count * ((1 / (0.5**area_factor)) / 2.25))
    if steps <= 18:
        count += 3
    return max(min(count, steps), min(6, steps))


def upscale_latents(latents: torch.Tensor, width: int, height: int, scale_factor: int = 8) -> torch.Tensor:
    """Latents resized to a pixel size, each latent cell copied from its nearest source cell."""
    size = (height // scale_factor, width // scale_factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="nearest-exact")
