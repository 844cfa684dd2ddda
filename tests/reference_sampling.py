"""An independent transcription of the reference worker's sampling maths, for tests only.

It follows the reference's structure rather than the worker's: float32 tensor schedules, a model
function `model(x, sigma)` returning the denoised latent, plain loops per sampler, the LMS coefficients
by numerical quadrature, DPM-Solver in t = -log(sigma). The worker's own code (`inference/schedules.py`,
`inference/ksamplers.py`, `inference/kscheduler.py`) is never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy import integrate

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Discrete:
    """The trained noise levels of an SD-style model."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, count: int = 1000) -> None:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, count, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        distances = sigma.log() - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float(), min=0, max=len(self.log_sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def schedule(model: Discrete, name: str, steps: int) -> torch.Tensor:
    if name == "karras":
        ramp = torch.linspace(0, 1, steps)
        lo, hi = float(model.sigma_min) ** (1 / 7), float(model.sigma_max) ** (1 / 7)
        return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1)])
    if name == "simple":
        stride = len(model.sigmas) / steps
        return torch.FloatTensor([float(model.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])
    timesteps = torch.linspace(float(model.timestep(model.sigma_max)), float(model.timestep(model.sigma_min)), steps)
    return torch.FloatTensor([float(model.sigma(t)) for t in timesteps] + [0.0])


def sampler_sigmas(model: Discrete, sampler: str, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    def calculate(n: int) -> torch.Tensor:
        if sampler in ("dpm_2", "dpm_2_ancestral"):
            full = schedule(model, scheduler, n + 1)
            return torch.cat([full[:-2], full[-1:]])
        return schedule(model, scheduler, n)

    if denoise > 0.9999:
        return calculate(steps)
    return calculate(int(steps / denoise))[-(steps + 1):]


def start_latent(model: Discrete, sigmas: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    sigma = float(sigmas[0])
    top = float(model.sigma_max)
    if math.isclose(top, sigma, rel_tol=1e-5) or sigma > top:
        return noise * math.sqrt(1.0 + sigma**2) + latent
    return noise * sigma + latent


def seeded_noise(x: torch.Tensor, seed: int):
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return lambda _s, _n: torch.randn(x.size(), dtype=x.dtype, device=x.device, generator=generator)


class Brownian:
    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int) -> None:
        import torchsde

        self.t0, self.t1 = torch.as_tensor(sigma_min).float(), torch.as_tensor(sigma_max).float()
        self.tree = torchsde.BrownianTree(self.t0.cpu(), torch.zeros_like(x).cpu(), self.t1.cpu(), entropy=seed)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma).float(), torch.as_tensor(sigma_next).float()
        sign = 1 if a < b else -1
        low, high = (a, b) if a < b else (b, a)
        w = self.tree(low.cpu(), high.cpu()) * sign
        return w / (b - a).abs().sqrt()


def ancestral(sigma_from, sigma_to):
    up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    down = (sigma_to**2 - up**2) ** 0.5
    return down, up


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def run(name: str, model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    """Run the reference sampler `name` (the reference's own names) from x over sigmas."""
    return SAMPLERS[name](model, x, sigmas, seed)


def euler(model, x, sigmas, seed):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(model, x, sigmas, seed):
    noise = seeded_noise(x, seed)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def heun(model, x, sigmas, seed):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def dpm_2(model, x, sigmas, seed):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            x = x + to_d(x_2, mid, model(x_2, mid)) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model, x, sigmas, seed):
    noise = seeded_noise(x, seed)
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i]))
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            mid = sigmas[i].log().lerp(torch.as_tensor(down).log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            x = x + to_d(x_2, mid, model(x_2, mid)) * (down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def lms_coefficient(order, t, i, j):
    def basis(tau):
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(model, x, sigmas, seed, order=4):
    t = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        ds.append(to_d(x, sigmas[i], model(x, sigmas[i])))
        if len(ds) > order:
            ds.pop(0)
        current = min(i + 1, order)
        coefficients = [lms_coefficient(current, t, i, j) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(ds), strict=True))
    return x


def t_of(sigma):
    return torch.as_tensor(sigma).log().neg()


def sigma_of(t):
    return torch.as_tensor(t).neg().exp()


def dpmpp_2m(model, x, sigmas, seed):
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_of(sigmas[i - 1])) / h
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    return x


def dpmpp_2s_ancestral(model, x, sigmas, seed):
    noise = seeded_noise(x, seed)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            t, t_next = t_of(sigmas[i]), t_of(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_of(s) / sigma_of(t)) * x - (-h / 2).expm1() * denoised
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * model(x_2, sigma_of(s))
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def dpmpp_sde(model, x, sigmas, seed):
    positive = sigmas[sigmas > 0]
    noise = Brownian(x, positive.min(), sigmas.max(), seed)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])
        s = t + (t_next - t) / 2
        down, up = ancestral(sigma_of(t), sigma_of(s))
        s_ = t_of(down)
        x_2 = (sigma_of(s_) / sigma_of(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(sigma_of(t), sigma_of(s)) * up
        denoised_2 = model(x_2, sigma_of(s))
        down, up = ancestral(sigma_of(t), sigma_of(t_next))
        t_next_ = t_of(down)
        x = (sigma_of(t_next_) / sigma_of(t)) * x - (t - t_next_).expm1() * denoised_2
        x = x + noise(sigma_of(t), sigma_of(t_next)) * up
    return x


def lcm(model, x, sigmas, seed):
    noise = seeded_noise(x, seed)
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


class Solver:
    """DPM-Solver in t = -log(sigma), on the noise prediction."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def eps(self, cache, key, x, t):
        if key not in cache:
            cache[key] = (x - self.model(x, sigma_of(t))) / sigma_of(t)
        return cache[key]

    def first(self, x, t, t_next, cache):
        eps = self.eps(cache, "eps", x, t)
        return x - sigma_of(t_next) * (t_next - t).expm1() * eps

    def second(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        return x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / (2 * r1) * h.expm1() * (eps_1 - eps)

    def third(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
        eps_1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - sigma_of(s2) * (r2 * h).expm1() * eps
              - sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_1 - eps))
        eps_2 = self.eps(cache, "eps_r2", u2, s2)
        return x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / r2 * (h.expm1() / h - 1) * (eps_2 - eps)


def ends(sigmas):
    low = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return low, sigmas[0]


def dpm_fast(model, x, sigmas, seed):
    low, high = ends(sigmas)
    n = len(sigmas) - 1
    solver = Solver(model)
    m = n // 3 + 1
    ts = torch.linspace(float(t_of(high)), float(t_of(low)), m + 1, dtype=torch.float64)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        step = {1: solver.first, 2: solver.second, 3: solver.third}[order]
        x = step(x, ts[i], ts[i + 1], {})
    return x


def dpm_adaptive(model, x, sigmas, seed, rtol=0.05, atol=0.0078, h=0.05, safety=0.81):
    low, high = ends(sigmas)
    solver = Solver(model)
    s, t_end = t_of(high).double(), t_of(low).double()
    x_prev, errors = x, None
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + h)
        cache: dict = {}
        x_low = solver.second(x, s, t, cache, r1=1 / 3)
        x_high = solver.third(x, s, t, cache)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
        inverse = 1 / (error + 1e-8)
        errors = errors or [inverse] * 3
        errors[0] = inverse
        factor = 1 + math.atan(errors[0] ** (1 / 3) - 1)
        if factor >= safety:
            errors[2], errors[1] = errors[1], errors[0]
            x_prev, x, s = x_low, x_high, t
        h *= factor
    return x


SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpm_2": dpm_2,
            "dpm_2_ancestral": dpm_2_ancestral, "lms": lms, "dpmpp_2m": dpmpp_2m,
            "dpmpp_2s_ancestral": dpmpp_2s_ancestral, "dpmpp_sde": dpmpp_sde, "lcm": lcm, "dpm_fast": dpm_fast,
            "dpm_adaptive": dpm_adaptive}
# The reference worker's map from horde names to these (DDIM runs Euler's method there).
HORDE_NAMES = {"k_euler": "euler", "k_euler_a": "euler_ancestral", "k_heun": "heun", "k_dpm_2": "dpm_2",
               "k_dpm_2_a": "dpm_2_ancestral", "k_lms": "lms", "k_dpm_fast": "dpm_fast",
               "k_dpm_adaptive": "dpm_adaptive", "k_dpmpp_2s_a": "dpmpp_2s_ancestral", "k_dpmpp_sde": "dpmpp_sde",
               "k_dpmpp_2m": "dpmpp_2m", "DDIM": "euler", "lcm": "lcm"}
