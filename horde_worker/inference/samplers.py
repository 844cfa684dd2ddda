"""Horde sampler names mapped to diffusers schedulers.

Each entry is the sampler the name denotes, never a stand-in: a name without a faithful
implementation here is refused with a clear error instead of being silently replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets" / "schedulers"


class UnsupportedSampler(ValueError):
    """The job asked for a sampler this worker does not implement."""


@dataclass(frozen=True)
class SamplerSpec:
    """How one horde sampler name is built from diffusers."""

    scheduler_class: str
    options: dict[str, Any] = field(default_factory=dict)
    supports_karras: bool = True


SAMPLERS: dict[str, SamplerSpec] = {
    "k_euler": SamplerSpec("EulerDiscreteScheduler"),
    "k_euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", supports_karras=False),
    "k_lms": SamplerSpec("LMSDiscreteScheduler"),
    "k_heun": SamplerSpec("HeunDiscreteScheduler"),
    "k_dpm_2": SamplerSpec("KDPM2DiscreteScheduler"),
    "k_dpm_2_a": SamplerSpec("KDPM2AncestralDiscreteScheduler"),
    "k_dpmpp_2m": SamplerSpec(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    "k_dpmpp_sde": SamplerSpec("DPMSolverSDEScheduler"),
    "k_dpmpp_2s_a": SamplerSpec("GeneratorScheduler", {"sampler": "k_dpmpp_2s_a"}),
    # Their own schedules: uniform in log sigma (fast) or chosen by the error estimate (adaptive).
    "k_dpm_fast": SamplerSpec("GeneratorScheduler", {"sampler": "k_dpm_fast"}, supports_karras=False),
    "k_dpm_adaptive": SamplerSpec("GeneratorScheduler", {"sampler": "k_dpm_adaptive"}, supports_karras=False),
    # The Stable Diffusion reference code's DPMSolverSampler: DPM-Solver++ multistep, order 2, with
    # time-uniform steps (k_dpmpp_2m steps the trained schedule's own timesteps).
    "dpmsolver": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                             "timestep_spacing": "linspace", "lower_order_final": True}),
    "DDIM": SamplerSpec("DDIMScheduler", supports_karras=False),
    "lcm": SamplerSpec("LCMScheduler", supports_karras=False),
}
# Samplers whose evaluation points follow the model's answers: only from pure noise (txt2img).
TXT2IMG_ONLY = {"k_dpm_fast", "k_dpm_adaptive"}


def sampler_refusal(sampler_name: str, baseline: str, from_image: bool = False) -> str | None:
    """Why `sampler_name` cannot run on a model of `baseline` (starting from an image: img2img or a hires
    fix's second pass), or None. Flux samples with its own flow-matching Euler, which is the horde's
    k_euler and nothing else."""
    if baseline == "flux_1":
        return None if sampler_name == "k_euler" else f"Flux models run k_euler only, not {sampler_name!r}"
    if sampler_name not in SAMPLERS:
        return f"sampler {sampler_name!r} is not implemented by this worker"
    if from_image and sampler_name in TXT2IMG_ONLY:
        return f"{sampler_name} starts from pure noise only: not for img2img, inpainting or hires fix"
    return None


def scheduler_config(baseline: str) -> dict[str, Any]:
    """The training noise schedule of a baseline, shipped with the package."""
    return json.loads((ASSETS / f"{baseline}.json").read_text())


def make_scheduler(sampler_name: str, karras: bool, base_config: dict[str, Any], seeds: list[int] | None = None):
    """Build the diffusers scheduler that implements `sampler_name` (with Karras sigmas if asked).

    `seeds` (one per image) seed samplers that draw their own noise, so each image stays reproducible alone."""
    import diffusers

    spec = SAMPLERS.get(sampler_name)
    if spec is None:
        raise UnsupportedSampler(sampler_refusal(sampler_name, "stable_diffusion_1"))
    # Private keys such as `_use_default_values` would make diffusers drop the options set below.
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if spec.scheduler_class == "GeneratorScheduler":
        from horde_worker.inference import ksamplers

        cls = ksamplers.GeneratorScheduler
        config = {k: v for k, v in config.items() if k in ksamplers.CONFIG_KEYS}
    else:
        cls = getattr(diffusers, spec.scheduler_class)
    config.update(spec.options)
    if karras and spec.supports_karras:
        config["use_karras_sigmas"] = True
    if spec.scheduler_class == "DPMSolverSDEScheduler" and seeds:
        config["noise_sampler_seed"] = [int(s) for s in seeds]  # one Brownian tree per image
    return cls.from_config(config)
