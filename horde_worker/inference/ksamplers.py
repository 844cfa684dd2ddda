"""The horde samplers diffusers has no scheduler for: DPM++ 2S ancestral, DPM-Solver-fast and
DPM-Solver adaptive (Lu et al. 2022; the k-diffusion names k_dpmpp_2s_a, k_dpm_fast, k_dpm_adaptive).

Each sampler is written once, as a generator that reads like the paper: it yields the point
(x, sigma) where it wants the denoiser and receives the denoised prediction back. A diffusers
scheduler (`GeneratorScheduler`) drives it from inside any pipeline's own loop: `step` turns
the model output into that prediction and returns the next point to evaluate. Latents live
in the sigma ("variance exploding") space as with diffusers' Euler schedulers.

DPM++ 2S ancestral and DPM-Solver-fast evaluate at points known in advance, so the pipeline's
timesteps are exact. The adaptive solver decides its next point from its error estimate:
its timesteps are written one ahead, in place, in the tensor the pipeline iterates, and the
job stops the loop when the solver has reached the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

Sampler = Generator[tuple[torch.Tensor, float], torch.Tensor, torch.Tensor]
ADAPTIVE_MAX_EVALUATIONS = 400
# The training-schedule keys of a model's scheduler config that these samplers read.
CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def ancestral_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a full ancestral step: deterministic part, then fresh noise."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def dpmpp_2s_ancestral_points(sigmas: list[float]) -> list[float]:
    """Where DPM++ 2S ancestral evaluates: each sigma, then the midpoint (in log sigma) of its step."""
    points = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        points.append(sigma)
        down, _ = ancestral_split(sigma, sigma_next)
        if down > 0:
            points.append(math.sqrt(sigma * down))
    return points


def dpmpp_2s_ancestral(x: torch.Tensor, sigmas: list[float], noise: Callable[[], torch.Tensor]) -> Sampler:
    """DPM-Solver++(2S) with a full ancestral step (eta 1)."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        denoised = yield x, sigma
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = denoised
        else:
            h = math.log(sigma / down)
            mid = math.sqrt(sigma * down)
            x_mid = (mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_mid = yield x_mid, mid
            x = (down / sigma) * x - math.expm1(-h) * denoised_mid
        if sigma_next > 0:
            x = x + noise() * up
    return x


# DPM-Solver's singlestep updates in t = -log(sigma), with the noise predictions eps at t and at the
# intermediate points t + r1 h (and t + r2 h).


def _first_point(x: torch.Tensor, t: float, s: float, eps: torch.Tensor) -> torch.Tensor:
    return x - math.exp(-s) * math.expm1(s - t) * eps


def second_order(x, t: float, t_next: float, r1: float, eps, eps_1) -> torch.Tensor:
    h, sigma_next = t_next - t, math.exp(-t_next)
    return x - sigma_next * math.expm1(h) * eps - sigma_next / (2 * r1) * math.expm1(h) * (eps_1 - eps)


def third_order(x, t: float, t_next: float, eps, eps_2, r2: float = 2 / 3) -> torch.Tensor:
    h, sigma_next = t_next - t, math.exp(-t_next)
    return x - sigma_next * math.expm1(h) * eps - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_2 - eps)


def third_order_midpoint(x, t: float, t_next: float, eps, eps_1, r1: float = 1 / 3, r2: float = 2 / 3):
    """The second intermediate point of the third-order update, at t + r2 h."""
    h = t_next - t
    s2 = t + r2 * h
    return (_first_point(x, t, s2, eps)
            - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps)), s2


def _eps(x: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
    return (x - denoised) / math.exp(-t)


def dpm_solver_step(x: torch.Tensor, t: float, t_next: float, order: int, r1: float | None = None):
    """One singlestep DPM-Solver update from t to t_next: yields each point (x, sigma) it needs the
    denoiser at (t first), returns (x_next, eps at t, eps at the first intermediate point)."""
    eps = _eps(x, (yield x, math.exp(-t)), t)
    h = t_next - t
    if order == 1:
        return x - math.exp(-t_next) * math.expm1(h) * eps, eps, None
    r1 = r1 if r1 is not None else (0.5 if order == 2 else 1 / 3)
    s1 = t + r1 * h
    u1 = _first_point(x, t, s1, eps)
    eps_1 = _eps(u1, (yield u1, math.exp(-s1)), s1)
    if order == 2:
        return second_order(x, t, t_next, r1, eps, eps_1), eps, eps_1
    u2, s2 = third_order_midpoint(x, t, t_next, eps, eps_1, r1)
    eps_2 = _eps(u2, (yield u2, math.exp(-s2)), s2)
    return third_order(x, t, t_next, eps, eps_2), eps, eps_1


def dpm_fast_plan(sigma_max: float, sigma_min: float, evaluations: int) -> list[tuple[float, float, int]]:
    """DPM-Solver-fast's segments (t, t_next, order) spending exactly `evaluations` model calls:
    third order where it can, the remainder at the end."""
    m = evaluations // 3 + 1
    ts = np.linspace(-math.log(sigma_max), -math.log(sigma_min), m + 1)
    orders = [3] * (m - 2) + [2, 1] if evaluations % 3 == 0 else [3] * (m - 1) + [evaluations % 3]
    return [(float(ts[i]), float(ts[i + 1]), order) for i, order in enumerate(orders)]


def dpm_fast_points(sigma_max: float, sigma_min: float, evaluations: int) -> list[float]:
    """Where DPM-Solver-fast evaluates, in order."""
    fractions = {1: [0.0], 2: [0.0, 0.5], 3: [0.0, 1 / 3, 2 / 3]}
    return [math.exp(-(t + f * (t_next - t)))
            for t, t_next, order in dpm_fast_plan(sigma_max, sigma_min, evaluations) for f in fractions[order]]


def dpm_fast(x: torch.Tensor, sigma_max: float, sigma_min: float, evaluations: int) -> Sampler:
    """DPM-Solver-fast: uniform steps in log sigma, orders 3, ..., 3 then 2/1, ending at sigma_min."""
    for t, t_next, order in dpm_fast_plan(sigma_max, sigma_min, evaluations):
        x, _eps_t, _eps_1 = yield from dpm_solver_step(x, t, t_next, order)
    return x


def dpm_adaptive(x: torch.Tensor, sigma_max: float, sigma_min: float, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, accept_safety: float = 0.81) -> Sampler:
    """DPM-Solver-23 with error control: a third-order step and the second-order step embedded in it
    (same evaluations); their difference against the tolerances scales the next step (integral control).
    A rejected step is tried again, shorter."""
    s, t_end, h = -math.log(sigma_max), -math.log(sigma_min), h_init
    x_prev = x
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        x_high, eps, eps_1 = yield from dpm_solver_step(x, s, t, 3)
        x_low = second_order(x, s, t, 1 / 3, eps, eps_1)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
        factor = 1 + math.atan((1 / (error + 1e-8)) ** (1 / 3) - 1)
        if factor >= accept_safety:
            x_prev, x, s = x_low, x_high, t
        h *= factor
    return x


class GeneratorScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs one of the samplers above inside a pipeline's loop."""

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, sampler: str = "k_dpmpp_2s_a", **kwargs) -> None:
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().numpy()
        self.log_sigmas = np.log(self.train_sigmas)
        if sampler == "k_dpmpp_2s_a":
            self.order = 2
        self.timesteps = torch.zeros(1)
        self.points: list[float] = []
        self.base_sigmas: list[float] = []
        self.begin_index = 0
        self.finished = False
        self._generator: Sampler | None = None
        self._index = 0
        self._sigma = float(self.train_sigmas[-1])
        self.init_noise_sigma = float(self.train_sigmas[-1])

    # --- schedule ---------------------------------------------------------------------------

    def sigma_to_t(self, sigma: float) -> float:
        return float(np.interp(math.log(sigma), self.log_sigmas, np.arange(len(self.log_sigmas))))

    def t_to_sigma(self, t: float) -> float:
        return float(math.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def _base_sigmas(self, steps: int) -> list[float]:
        sigma_min, sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        if self.config.use_karras_sigmas:
            ramp = np.linspace(0, 1, steps)
            rho = 7.0
            sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        else:
            sigmas = [self.t_to_sigma(t) for t in np.linspace(len(self.train_sigmas) - 1, 0, steps)]
        return [float(s) for s in sigmas] + [0.0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_kwargs) -> None:
        sampler = self.config.sampler
        sigma_min, sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        self.base_sigmas = self._base_sigmas(num_inference_steps)
        if sampler == "k_dpmpp_2s_a":
            self.points = dpmpp_2s_ancestral_points(self.base_sigmas)
        elif sampler == "k_dpm_fast":
            self.points = dpm_fast_points(sigma_max, sigma_min, num_inference_steps)
        else:
            self.points = [sigma_max] * ADAPTIVE_MAX_EVALUATIONS
        self.timesteps = torch.tensor([self.sigma_to_t(s) for s in self.points], dtype=torch.float32, device=device)
        self.sigmas = torch.tensor(self.points + [0.0], dtype=torch.float32)
        self.init_noise_sigma = self.points[0]
        self.num_inference_steps = num_inference_steps
        self.begin_index, self._index, self._generator, self.finished = 0, 0, None, False

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample / math.sqrt(self._current_sigma() ** 2 + 1)

    def _current_sigma(self) -> float:
        if self._generator is None:
            return self.points[self.begin_index]
        return self._sigma

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.t_to_sigma(float(timesteps.flatten()[0]))
        return original + noise * sigma

    # --- the loop ---------------------------------------------------------------------------

    def _start(self, x: torch.Tensor, generator) -> None:
        sampler = self.config.sampler
        sigma_min, sigma_max = float(self.train_sigmas[0]), float(self.train_sigmas[-1])
        if sampler == "k_dpmpp_2s_a":
            first_step = self.begin_index // 2
            noise = lambda: randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # noqa: E731
            self._generator = dpmpp_2s_ancestral(x, self.base_sigmas[first_step:], noise)
        elif sampler == "k_dpm_fast":
            self._generator = dpm_fast(x, sigma_max, sigma_min, len(self.points))
        else:
            self._generator = dpm_adaptive(x, sigma_max, sigma_min)
        _x, self._sigma = next(self._generator)
        self._index = self.begin_index

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self.finished:
            return SchedulerOutput(prev_sample=sample) if return_dict else (sample,)
        if self._generator is None:
            self._start(sample, generator)
        sigma = self._sigma
        if self.config.prediction_type == "v_prediction":
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            denoised = sample - sigma * model_output
        try:
            x, self._sigma = self._generator.send(denoised.to(sample.dtype))
            self._index += 1
            if self._index < len(self.timesteps):
                # The pipeline reads the next timestep from this tensor only now: tell it where we are.
                self.timesteps[self._index] = self.sigma_to_t(max(self._sigma, float(self.train_sigmas[0])))
        except StopIteration as done:
            x, self.finished = done.value, True
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
