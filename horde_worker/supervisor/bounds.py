"""Limits a popped job is checked against before any work starts.

The horde validates requests, but a worker must not trust that: a job outside these bounds
(a width of 100000, 10000 steps, a NaN cfg, a megabyte of prompt) would hold a slot past its
time limit or get the inference process killed for memory. Such a job is faulted at once,
with the reason, and never run.
"""

from __future__ import annotations

import math
from typing import Any

from horde_worker.horde.wire import PopResponse

# The horde's own request limits (API 2.5): sides 64..3072 in multiples of 64, 1..500 steps, cfg 0..100,
# 1..12 clip skip, and prompts of at most 7500 characters.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 3072, 64
MAX_STEPS = 500
MAX_CFG = 100.0
MAX_CLIP_SKIP = 12
MAX_PROMPT_CHARS = 7500
MAX_IDS = 20


def bounds_reason(pop: PopResponse, *, max_pixels: int, max_batch: int,
                  requirements: dict[str, Any] | None = None) -> str | None:
    """Why this job is outside what the worker accepts, or None when it may run."""
    payload, requirements = pop.payload, requirements or {}
    width, height = payload.width, payload.height
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            return f"{name} {side} is outside {MIN_SIDE}..{MAX_SIDE} in multiples of {SIDE_MULTIPLE}"
    if width * height > max_pixels:
        return f"{width}x{height} is more than this worker's max_pixels ({max_pixels}, from max_power)"
    steps = payload.ddim_steps
    low, high = int(requirements.get("min_steps", 1)), int(requirements.get("max_steps", MAX_STEPS))
    if not max(1, low) <= steps <= min(MAX_STEPS, high):
        return f"steps {steps} is outside {max(1, low)}..{min(MAX_STEPS, high)}"
    cfg = payload.cfg_scale
    if not math.isfinite(cfg) or not 0 <= cfg <= MAX_CFG:
        return f"cfg_scale {cfg} is outside 0..{MAX_CFG:g}"
    low_cfg, high_cfg = float(requirements.get("min_cfg_scale", 0)), float(requirements.get("max_cfg_scale", MAX_CFG))
    if not low_cfg <= cfg <= high_cfg:
        return f"cfg_scale {cfg:g} is outside {low_cfg:g}..{high_cfg:g}, this model's range"
    if not 1 <= payload.clip_skip <= MAX_CLIP_SKIP:
        return f"clip_skip {payload.clip_skip} is outside 1..{MAX_CLIP_SKIP}"
    for name in ("denoising_strength", "hires_fix_denoising_strength", "facefixer_strength"):
        value = getattr(payload, name)
        if value is not None and (not math.isfinite(value) or not 0 <= value <= 1):
            return f"{name} {value} is outside 0..1"
    if len(payload.prompt) > MAX_PROMPT_CHARS:
        return f"the prompt has {len(payload.prompt)} characters, more than the horde's {MAX_PROMPT_CHARS}"
    count = len(pop.ids)
    if count > min(max_batch, MAX_IDS):
        return f"{count} images in one job is more than this worker's max_batch ({max_batch})"
    for lora in payload.loras:
        if not math.isfinite(lora.model) or not math.isfinite(lora.clip):
            return f"LoRA {lora.name[:60]!r} has a strength that is not a number"
    return None
