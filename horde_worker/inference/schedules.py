"""Noise schedules of the discrete-time (SD1, SD2, SDXL) models, computed as the reference worker does (and, at
the end, those of the flow-matching models with a fixed shift).

A model was trained on 1000 noise levels sigma_t = sqrt((1 - abar_t) / abar_t). A sampler runs a
descending list of sigmas ending at 0, chosen by one of three rules:

    normal   the trained sigmas at timesteps spaced evenly from the highest to the lowest (fractional
             timesteps interpolate log sigma), then 0 (a job with `karras: false`)
    karras   Karras et al.'s ramp (rho 7) from the model's sigma_max to its sigma_min, then 0
             (`karras: true`)
    simple   every (1000 / steps)-th trained sigma from the highest down, then 0 (a hires fix's
             second pass)

The dpm_2 samplers build one sigma more and drop the next-to-last, so that their final step is a plain
Euler step from a small sigma. Starting from an image with a denoising strength below 1 runs the last
`steps` steps of a schedule made for int(steps / strength) steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

KARRAS_RHO = 7.0


@dataclass(frozen=True)
class ModelSigmas:
    """The trained noise levels of a model, lowest first.

    Kept and interpolated in float32 on the CPU, as the reference does: the schedules below come out
    bit for bit the reference's, which matters where a sampler subtracts nearly equal squares of them."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSigmas:
        """From a diffusers scheduler config's training schedule (beta_start, beta_end, beta_schedule)."""
        count = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        schedule = config.get("beta_schedule", "scaled_linear")
        if schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
        elif schedule == "linear":
            betas = torch.linspace(start, end, count, dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule {schedule!r} is not a schedule this worker samples")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(sigmas=sigmas.float(), log_sigmas=sigmas.log().float())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """The noise level at (possibly fractional) timesteps: log sigma interpolated linearly."""
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        weight = t.frac()
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()

    def timestep(self, sigma: float) -> int:
        """The trained timestep nearest `sigma` in log sigma: what the model is told it is denoising."""
        return int((torch.tensor(sigma, dtype=torch.float32).log() - self.log_sigmas).abs().argmin())


def normal_sigmas(model: ModelSigmas, steps: int) -> list[float]:
    """`steps` trained sigmas at evenly spaced timesteps from the highest to the lowest, then 0."""
    first, last = model.timestep(model.sigma_max), model.timestep(model.sigma_min)
    timesteps = torch.linspace(first, last, steps)
    return [float(model.sigma(t)) for t in timesteps] + [0.0]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> list[float]:
    """Karras et al. (2022), eq. 5: `steps` sigmas evenly spaced in sigma^(1/rho), then 0."""
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = torch.linspace(0, 1, steps)
    return [float(s) for s in (high + ramp * (low - high)) ** rho] + [0.0]


def simple_sigmas(model: ModelSigmas, steps: int) -> list[float]:
    """Every (trained count / steps)-th trained sigma from the highest down, then 0."""
    stride = len(model.sigmas) / steps
    return [float(model.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


RULES = {"normal": normal_sigmas, "simple": simple_sigmas,
         "karras": lambda model, steps: karras_sigmas(model.sigma_min, model.sigma_max, steps)}


def full_schedule(model: ModelSigmas, steps: int, rule: str, drop_penultimate: bool = False) -> list[float]:
    """The sigmas of a `steps`-step run from pure noise (steps + 1 values, the last 0) by `rule`."""
    if drop_penultimate:
        sigmas = full_schedule(model, steps + 1, rule)
        return sigmas[:-2] + sigmas[-1:]
    return RULES[rule](model, steps)


def job_schedule(model: ModelSigmas, steps: int, rule: str, denoise: float | None = None,
                 drop_penultimate: bool = False) -> list[float]:
    """The sigmas a job runs: the full schedule, or for `denoise` < 1 (starting from an image) the last
    `steps` steps of the schedule made for int(steps / denoise) steps."""
    if denoise is None or denoise > 0.9999:
        return full_schedule(model, steps, rule, drop_penultimate)
    if denoise <= 0:
        return []
    longer = full_schedule(model, int(steps / denoise), rule, drop_penultimate)
    return longer[-(steps + 1):]


def starts_from_pure_noise(model: ModelSigmas, sigmas: list[float]) -> bool:
    """Whether a run starts at (or above) the model's highest noise level: then its start latent is
    scaled by sqrt(1 + sigma^2), the variance of a fully noised training sample in the sampler's space."""
    return bool(sigmas) and (math.isclose(sigmas[0], model.sigma_max, rel_tol=1e-5) or sigmas[0] > model.sigma_max)


def start_noise_scale(model: ModelSigmas, sigmas: list[float]) -> float:
    """What the start noise is multiplied by before it is added to the start latent."""
    if starts_from_pure_noise(model, sigmas):
        return math.sqrt(1.0 + sigmas[0] ** 2)
    return sigmas[0]


# --- flow-matching models (Qwen-Image, Z-Image) ---------------------------------------------------------------
FLOW_LEVELS = 1000


def flow_sigma(shift: float, t: float) -> float:
    """The noise level at timestep `t` in (0, 1] of a flow model shifted by `shift`."""
    return shift * t / (1 + (shift - 1) * t)


def flow_schedule(shift: float, steps: int, karras: bool) -> list[float]:
    """The reference's schedule of a flow model (a 1000-level table, timestep = sigma): "normal" spaces the
    timesteps evenly from the top level to the lowest level's sigma and shifts each, "karras" (`karras: true`)
    ramps between the table's ends; then 0."""
    lowest = flow_sigma(shift, 1 / FLOW_LEVELS)
    if karras:
        return karras_sigmas(lowest, 1.0, steps)
    return [flow_sigma(shift, float(t)) for t in torch.linspace(1.0, lowest, steps)] + [0.0]
