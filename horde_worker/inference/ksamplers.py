"""The horde's samplers, each written once, in the "variance exploding" space of k-diffusion
(x = data + sigma * noise) where the reference worker runs them.

Every sampler is a generator that reads like its paper: it yields the point (x, sigma) where it needs
the denoiser and is sent the denoised prediction back; it returns the final latent. It is given the
descending sigmas to run (ending at 0) and a noise source (sigma, sigma_next) -> unit noise, read only
by the ancestral and SDE samplers. `inference/kscheduler.py` drives one from inside any diffusers
pipeline's loop, so txt2img, img2img, inpainting, hires fix and ControlNet share these few lines.

Step coefficients are Python floats computed from the schedule: nothing here waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator

import numpy as np
import torch

from horde_worker.inference import dpm_solver

Sampler = Generator[tuple[torch.Tensor, float], torch.Tensor, torch.Tensor]
Noise = Callable[[float, float], torch.Tensor]
LMS_ORDER = 4


def intervals(sigmas: list[float]) -> list[tuple[float, float]]:
    return list(zip(sigmas[:-1], sigmas[1:], strict=True))


def f32(value) -> torch.Tensor:
    """A CPU float32 scalar: the step coefficients below are computed the way the reference computes
    them (float32 tensor arithmetic), so that ill-conditioned ones round the same way."""
    return torch.as_tensor(value, dtype=torch.float32)


def t_of(sigma) -> torch.Tensor:
    return f32(sigma).log().neg()


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def ancestral_split(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a full ancestral step (eta 1): the deterministic part, then fresh noise.

    With few steps sigma_down is a small difference of squares: its float32 rounding shows in the image."""
    s, n = f32(sigma), f32(sigma_next)
    up = min(n, (n**2 * (s**2 - n**2) / s**2) ** 0.5)
    return float((n**2 - up**2) ** 0.5), float(up)


def denoised_from(x: torch.Tensor, output: torch.Tensor, sigma: float, v_prediction: bool) -> torch.Tensor:
    """The model's denoised prediction at `x` (the unscaled latent) from its output: eps, or v."""
    if v_prediction:
        return x / (sigma**2 + 1) - output * (sigma / math.sqrt(sigma**2 + 1))
    return x - output * sigma


def slope(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def euler(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """Euler's method on the probability-flow ODE."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        x = x + slope(x, sigma, denoised) * (sigma_next - sigma)
    return x


def euler_ancestral(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """An Euler step down to sigma_down, then fresh noise up to sigma_next."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:  # the last step: no noise after it
            x = denoised
            continue
        x = x + slope(x, sigma, denoised) * (down - sigma) + noise(sigma, sigma_next) * up
    return x


def heun(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """Heun's method (Karras et al. 2022, algorithm 1 without churn); the last step, to 0, is Euler's."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        d = slope(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield x_2, sigma_next
            x = x + (d + slope(x_2, sigma_next, denoised_2)) / 2 * dt
    return x


def log_midpoint(a: float, b: float) -> float:
    return math.exp(math.log(a) + (math.log(b) - math.log(a)) * 0.5)


def dpm_2_step(x: torch.Tensor, sigma: float, d: torch.Tensor, target: float):
    """A DPM-Solver-2 step from sigma to `target` (> 0): the slope at their log-midpoint carries it."""
    mid = log_midpoint(sigma, target)
    x_2 = x + d * (mid - sigma)
    denoised_2 = yield x_2, mid
    return x + slope(x_2, mid, denoised_2) * (target - sigma)


def dpm_2(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver-2 (Karras et al. 2022's variant); the last step, to 0, is Euler's."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        d = slope(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x = yield from dpm_2_step(x, sigma, d, sigma_next)
    return x


def dpm_2_ancestral(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver-2 down to sigma_down, then fresh noise up to sigma_next."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        down, up = ancestral_split(sigma, sigma_next)
        d = slope(x, sigma, denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            x = yield from dpm_2_step(x, sigma, d, down)
            x = x + noise(sigma, sigma_next) * up
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """The integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of the slope j steps back."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    basis = basis / math.prod(sigmas[i - j] - node for node in nodes)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def lms(x: torch.Tensor, sigmas: list[float], noise: Noise, order: int = LMS_ORDER) -> Sampler:
    """Linear multistep: the slopes of up to `order` steps, integrated through their interpolating
    polynomial. The order grows from 1 with the slopes this run has seen."""
    slopes: list[torch.Tensor] = []
    for i, (sigma, _sigma_next) in enumerate(intervals(sigmas)):
        denoised = yield x, sigma
        slopes = [*slopes, slope(x, sigma, denoised)][-order:]
        current = min(i + 1, order)
        coefficients = [lms_coefficient(sigmas, i, j, current) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(slopes), strict=True))
    return x


def dpmpp_2m(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver++(2M): second order from the previous step's prediction, first order at both ends."""
    old_denoised = None
    previous_sigma = None
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is None:
                estimate = denoised
            else:
                r = math.log(previous_sigma / sigma) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        old_denoised, previous_sigma = denoised, sigma
    return x


def dpmpp_2s_ancestral(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver++(2S) down to sigma_down (midpoint in log sigma), then fresh noise up to sigma_next."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        down, up = ancestral_split(sigma, sigma_next)
        if down == 0:
            x = x + slope(x, sigma, denoised) * (down - sigma)
        else:
            t, t_next = t_of(sigma), t_of(down)
            h = t_next - t
            s = t + h * 0.5
            x_2 = float(sigma_of(s) / sigma_of(t)) * x - float((-h * 0.5).expm1()) * denoised
            denoised_2 = yield x_2, float(sigma_of(s))
            x = float(sigma_of(t_next) / sigma_of(t)) * x - float((-h).expm1()) * denoised_2
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * up
    return x


def dpmpp_sde(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver++ (stochastic, r = 1/2): two ancestral half-steps in log sigma driven by Brownian noise;
    the last step, to 0, is Euler's. The Brownian path is rough: it is queried at exactly the reference's
    float32 times."""
    for sigma, sigma_next in intervals(sigmas):
        denoised = yield x, sigma
        if sigma_next == 0:
            x = x + slope(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = t_of(sigma), t_of(sigma_next)
        s = t + (t_next - t) * 0.5
        at_t, at_s, at_next = float(sigma_of(t)), float(sigma_of(s)), float(sigma_of(t_next))
        down, up = ancestral_split(at_t, at_s)
        s_ = t_of(down)
        x_2 = float(sigma_of(s_) / sigma_of(t)) * x - float((t - s_).expm1()) * denoised
        x_2 = x_2 + noise(at_t, at_s) * up
        denoised_2 = yield x_2, at_s
        down, up = ancestral_split(at_t, at_next)
        t_next_ = t_of(down)
        x = float(sigma_of(t_next_) / sigma_of(t)) * x - float((t - t_next_).expm1()) * denoised_2
        x = x + noise(at_t, at_next) * up
    return x


def lcm(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """Latent consistency sampling: jump to the prediction, then noise it afresh to the next sigma."""
    for sigma, sigma_next in intervals(sigmas):
        x = yield x, sigma
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
    return x


def positive_range(sigmas: list[float]) -> tuple[float, float]:
    """(smallest positive, largest) sigma of a run."""
    positive = [s for s in sigmas if s > 0]
    return min(positive), max(positive)


def dpm_fast(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver-fast over the run's range, spending one evaluation per step of the schedule."""
    sigma_min, _ = positive_range(sigmas)
    return (yield from dpm_solver.dpm_fast(x, sigmas[0], sigma_min, len(sigmas) - 1))


def dpm_adaptive(x: torch.Tensor, sigmas: list[float], noise: Noise) -> Sampler:
    """DPM-Solver-23 with error control over the run's range (its own steps, not the schedule's)."""
    sigma_min, _ = positive_range(sigmas)
    return (yield from dpm_solver.dpm_adaptive(x, sigmas[0], sigma_min))


ALGORITHMS: dict[str, Callable[[torch.Tensor, list[float], Noise], Sampler]] = {
    "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral, "lms": lms, "dpmpp_2m": dpmpp_2m, "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde, "lcm": lcm, "dpm_fast": dpm_fast, "dpm_adaptive": dpm_adaptive,
}
# Samplers whose evaluation points depend on what the model answers.
ADAPTIVE = {"dpm_adaptive"}


def evaluation_sigmas(algorithm: str, sigmas: list[float]) -> list[float]:
    """Where `algorithm` will call the denoiser on `sigmas`, in order (not for adaptive samplers).

    Found by running it on a one-number latent: each point depends on the schedule alone."""
    x = torch.zeros(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    sampler = ALGORITHMS[algorithm](x, sigmas, lambda _s, _n: zero)
    points = []
    try:
        _x, sigma = next(sampler)
        while True:
            points.append(sigma)
            _x, sigma = sampler.send(zero)
    except StopIteration:
        return points
