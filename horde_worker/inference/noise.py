"""The random numbers of a job, drawn from each image's seed the way the reference worker draws them.

    start noise      one CPU generator per seed, float32, shape (1, C, h, w): the same on every device
    ancestral noise  one generator per seed on the device the latents live on, float32, a fresh draw per
                     step (CUDA and CPU generators give different streams: a GPU worker matches a GPU
                     reference worker, not a CPU one)
    SDE noise        a Brownian tree per seed on the CPU (torchsde), queried over each step's interval:
                     the same on every device

Image i of a batch only ever reads generators seeded with seed i, so a job for that seed alone gives it
back exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (sigma, sigma_next) -> unit-variance noise for that step, shaped like the batch of latents.
NoiseSource = Callable[[float, float], torch.Tensor]


def start_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The start noise of a batch, float32, one image per seed."""
    single = (1, *shape[1:])
    draws = [torch.randn(single, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
             for seed in seeds]
    return torch.cat(draws).to(device)


def ancestral_noise(seeds: Sequence[int], like: torch.Tensor) -> NoiseSource:
    """Fresh noise at each call, drawn on `like`'s device without waiting for it."""
    generators = [torch.Generator(like.device).manual_seed(int(seed)) for seed in seeds]
    single = (1, *like.shape[1:])

    def draw(_sigma: float, _sigma_next: float) -> torch.Tensor:
        return torch.cat([torch.randn(single, generator=g, device=like.device, dtype=torch.float32)
                          for g in generators])

    return draw


def brownian_noise(seeds: Sequence[int], like: torch.Tensor, sigma_min: float, sigma_max: float) -> NoiseSource:
    """Brownian-motion increments over [sigma_next, sigma], scaled to unit variance (for SDE samplers)."""
    import torchsde

    single = torch.zeros((1, *like.shape[1:]), dtype=torch.float32)
    low, high = torch.tensor(float(sigma_min)), torch.tensor(float(sigma_max))
    trees = [torchsde.BrownianTree(low, single, high, entropy=int(seed)) for seed in seeds]

    def draw(sigma: float, sigma_next: float) -> torch.Tensor:
        lower, upper = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if sigma < sigma_next else -1.0
        a, b = torch.tensor(lower), torch.tensor(upper)
        increments = torch.cat([tree(a, b) for tree in trees]) * sign / abs(upper - lower) ** 0.5
        if like.device.type == "cuda":
            # From pinned memory the copy queues behind the running step instead of waiting for it.
            return increments.pin_memory().to(like.device, non_blocking=True)
        return increments.to(like.device)

    return draw
