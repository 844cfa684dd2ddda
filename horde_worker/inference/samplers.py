"""Horde sampler names mapped to the algorithms that run them, as the reference worker maps them.

The supervisor reads this module to refuse unknown names, so it imports no torch at module level.

Each name runs the sampler the reference runs for it, on the reference's schedule (`schedules.py`):
`karras` picks Karras' ramp over the model's own sigma range for every sampler. A name without a
faithful implementation here is refused with a clear error instead of being silently replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from horde_worker.models.reference import BASELINE_NAMES

ASSETS = Path(__file__).parent / "assets" / "schedulers"


class UnsupportedSampler(ValueError):
    """The job asked for a sampler this worker does not implement."""


@dataclass(frozen=True)
class SamplerSpec:
    """What one horde sampler name runs.

    `algorithm` names a sampler of `inference/ksamplers.py`, or is None for a diffusers scheduler
    (`scheduler_class` with `options`). `karras_changes_image` is False where Karras' ramp has the same
    end points as the normal schedule and the sampler reads nothing else of it."""

    algorithm: str | None
    drop_penultimate: bool = False
    karras_changes_image: bool = True
    scheduler_class: str = ""
    options: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {
    "k_euler": SamplerSpec("euler"),
    "k_euler_a": SamplerSpec("euler_ancestral"),
    "k_lms": SamplerSpec("lms"),
    "k_heun": SamplerSpec("heun"),
    "k_dpm_2": SamplerSpec("dpm_2", drop_penultimate=True),
    "k_dpm_2_a": SamplerSpec("dpm_2_ancestral", drop_penultimate=True),
    "k_dpmpp_2m": SamplerSpec("dpmpp_2m"),
    "k_dpmpp_sde": SamplerSpec("dpmpp_sde"),
    "k_dpmpp_2s_a": SamplerSpec("dpmpp_2s_ancestral"),
    # Their own steps between the schedule's first and last positive sigma, which Karras' ramp shares.
    "k_dpm_fast": SamplerSpec("dpm_fast", karras_changes_image=False),
    "k_dpm_adaptive": SamplerSpec("dpm_adaptive", karras_changes_image=False),
    # The reference runs Euler's method for DDIM (the same path, eta 0), re-noising an inpainting job's
    # kept area from the seed + 1.
    "DDIM": SamplerSpec("euler"),
    "lcm": SamplerSpec("lcm"),
    # The Stable Diffusion reference code's DPMSolverSampler: DPM-Solver++ multistep, order 2, with
    # time-uniform steps. The reference worker has no such sampler (it would run k_euler).
    "dpmsolver": SamplerSpec(None, scheduler_class="DPMSolverMultistepScheduler",
                             options={"algorithm_type": "dpmsolver++", "solver_order": 2,
                                      "timestep_spacing": "linspace", "lower_order_final": True}),
}
# Where the reference re-noises an inpainting job's kept area from other seeds than the start noise's.
BLEND_SEED_OFFSET = {"DDIM": 1}


# Flow-matching baselines sampled with their own Euler (the horde's k_euler): baseline -> how it is named.
FLOW_EULER_ONLY = frozenset({"flux_1", "z_image_turbo", "qwen_image"})


def sampler_refusal(sampler_name: str, baseline: str) -> str | None:
    """Why `sampler_name` cannot run on a model of `baseline`, or None. Flux samples with its own
    flow-matching Euler, which is the horde's k_euler and nothing else."""
    if baseline in FLOW_EULER_ONLY:
        return None if sampler_name == "k_euler" else f"{BASELINE_NAMES[baseline]} models run k_euler only, not " \
                                                      f"{sampler_name!r}"
    if sampler_name not in SAMPLERS:
        return f"sampler {sampler_name!r} is not implemented by this worker"
    if baseline == "stable_cascade" and SAMPLERS[sampler_name].algorithm in (None, "dpm_adaptive"):
        # Its two stages run the k-diffusion samplers on its own noise schedule (inference/cascade_run.py).
        return f"sampler {sampler_name!r} is not available for Stable Cascade models"
    return None


def scheduler_config(baseline: str) -> dict[str, Any]:
    """The training noise schedule of a baseline, shipped with the package."""
    return json.loads((ASSETS / f"{baseline}.json").read_text())


def make_scheduler(sampler_name: str, karras: bool, base_config: dict[str, Any], seeds: list[int],
                   steps: int, denoise: float | None = None, rule: str | None = None):
    """The scheduler that runs `sampler_name` for `steps` steps, one image per seed: from pure noise, or
    with `denoise` < 1 from an image (the last `steps` steps of a longer schedule, as the reference).
    The schedule follows `karras` unless `rule` names another (`schedules.RULES`)."""
    spec = SAMPLERS.get(sampler_name)
    if spec is None:
        raise UnsupportedSampler(sampler_refusal(sampler_name, "stable_diffusion_1"))
    # Private keys such as `_use_default_values` would make diffusers drop the options set below.
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if spec.algorithm is None:
        import diffusers

        config.update(spec.options)
        if karras:
            config["use_karras_sigmas"] = True
        return getattr(diffusers, spec.scheduler_class).from_config(config)
    from horde_worker.inference.kscheduler import KScheduler
    from horde_worker.inference.schedules import job_schedule

    scheduler = KScheduler(**{k: config[k] for k in TRAINING_KEYS if k in config})
    rule = rule or ("karras" if karras else "normal")
    sigmas = job_schedule(scheduler.model_sigmas, steps, rule, denoise, spec.drop_penultimate)
    return scheduler.prepare(spec.algorithm, sigmas, seeds, BLEND_SEED_OFFSET.get(sampler_name, 0))


# The keys of a model's scheduler config that describe its training noise schedule.
TRAINING_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
