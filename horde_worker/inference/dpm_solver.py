"""DPM-Solver-fast and DPM-Solver adaptive (Lu et al. 2022; the horde's k_dpm_fast and k_dpm_adaptive).

Both are generators in the protocol of `inference/ksamplers.py`: they yield each point (x, sigma) where
they want the denoiser and receive the denoised prediction back. DPM-Solver-fast spends exactly its
evaluations on uniform steps in log sigma; the adaptive solver picks each next point from its error
estimate, so its points are known only as it goes.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np
import torch

Sampler = Generator[tuple[torch.Tensor, float], torch.Tensor, torch.Tensor]


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
