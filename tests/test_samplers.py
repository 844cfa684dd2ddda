"""All fourteen horde samplers: each the reference's algorithm, karras wherever it changes the schedule,
reproducible seeds, and the DPM-Solver samplers checked against exact solutions."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from horde_worker.inference.dpm_solver import dpm_adaptive, dpm_fast
from horde_worker.inference.generate import generate_images
from horde_worker.inference.ksamplers import dpmpp_2s_ancestral
from horde_worker.inference.messages import GenerateRequest
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.samplers import SAMPLERS
from tests.conftest import job_request

HORDE_SAMPLERS = ("k_lms k_heun k_euler k_euler_a k_dpm_2 k_dpm_2_a k_dpm_fast k_dpm_adaptive k_dpmpp_2s_a "
                  "k_dpmpp_2m dpmsolver k_dpmpp_sde DDIM lcm").split()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


def request(**overrides) -> GenerateRequest:
    return job_request(**{"width": 64, "height": 64, "steps": 6, **overrides})


def test_every_horde_sampler_has_its_own_implementation(model):
    assert set(SAMPLERS) == set(HORDE_SAMPLERS)
    images = {name: generate_images(model, request(sampler_name=name))[0].astype(int) for name in HORDE_SAMPLERS}
    same = [(a, b) for a, b in combinations(HORDE_SAMPLERS, 2) if np.abs(images[a] - images[b]).mean() < 0.05]
    # The reference runs Euler's method for DDIM.
    assert same == [("k_euler", "DDIM")]
    for name in HORDE_SAMPLERS:
        karras = generate_images(model, request(sampler_name=name, karras=True))[0].astype(int)
        changed = np.abs(karras - images[name]).mean() > 0.05
        # DPM-Solver-fast and adaptive read only the schedule's ends, which Karras' ramp shares.
        assert changed == SAMPLERS[name].karras_changes_image, name


@pytest.mark.parametrize("sampler", ["k_dpmpp_2s_a", "k_dpm_fast", "k_dpm_adaptive", "dpmsolver"])
def test_new_samplers_reproduce_each_seed_alone(model, sampler):
    batch = generate_images(model, request(sampler_name=sampler, seeds=[3, 4]))
    alone = generate_images(model, request(sampler_name=sampler, seeds=[4]))[0]
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).mean() > 1
    assert np.abs(alone.astype(int) - batch[1].astype(int)).max() <= 1


@pytest.mark.parametrize("sampler", ["k_dpmpp_2s_a", "k_dpm_fast", "k_dpm_adaptive"])
def test_samplers_of_their_own_steps_also_start_from_an_image(model, sampler):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    source = buffer.getvalue()
    low = generate_images(model, request(sampler_name=sampler, source_image=source, denoising_strength=0.3))[0]
    high = generate_images(model, request(sampler_name=sampler, source_image=source, denoising_strength=0.9))[0]
    red = np.array([200, 40, 40])
    # The weaker the denoising, the more of the source survives.
    assert np.abs(low.astype(int) - red).mean() < np.abs(high.astype(int) - red).mean()


# --- the algorithms against exact answers --------------------------------------------------------
# For data drawn from N(0, s^2) the ideal denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2), and the
# probability-flow ODE carries x from sigma_max to x * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).

SPREAD, SIGMA_MAX, SIGMA_MIN = 0.8, 14.6, 0.03


def drive(sampler, denoise) -> torch.Tensor:
    evaluations = 0
    try:
        x, sigma = next(sampler)
        while True:
            evaluations += 1
            x, sigma = sampler.send(denoise(x, sigma))
    except StopIteration as done:
        return done.value, evaluations


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x * SPREAD**2 / (SPREAD**2 + sigma**2)


def exact(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x * math.sqrt(SPREAD**2 + sigma**2) / math.sqrt(SPREAD**2 + SIGMA_MAX**2)


def relative_error(result: torch.Tensor, start: torch.Tensor) -> float:
    target = exact(start, SIGMA_MIN)
    return float(((result - target).abs() / target.abs().clamp(min=1e-9)).max())


def test_dpm_fast_follows_the_ode_with_exactly_its_evaluations():
    start = torch.linspace(-30, 30, 10, dtype=torch.float64)
    errors = {}
    for evaluations in (10, 11, 20, 40):
        result, used = drive(dpm_fast(start, SIGMA_MAX, SIGMA_MIN, evaluations), gaussian_denoiser)
        assert used == evaluations
        errors[evaluations] = relative_error(result, start)
    assert errors[20] < 5e-3 and errors[40] < errors[20] / 8  # third order: error falls fast with steps


def test_dpm_adaptive_meets_its_tolerance():
    start = torch.linspace(-30, 30, 10, dtype=torch.float64)
    loose, loose_used = drive(dpm_adaptive(start, SIGMA_MAX, SIGMA_MIN), gaussian_denoiser)
    tight, tight_used = drive(dpm_adaptive(start, SIGMA_MAX, SIGMA_MIN, rtol=1e-4, atol=1e-6), gaussian_denoiser)
    assert relative_error(loose, start) < 0.05 and relative_error(tight, start) < 2e-3
    assert 6 <= loose_used < tight_used  # a tighter tolerance takes more, shorter steps


def test_dpmpp_2s_ancestral_samples_the_data_distribution():
    generator = torch.Generator().manual_seed(0)
    sigmas = [float(s) for s in np.exp(np.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), 30))] + [0.0]
    start = torch.randn(20000, generator=generator, dtype=torch.float64) * SIGMA_MAX
    noise = lambda _sigma, _next: torch.randn(20000, generator=generator, dtype=torch.float64)  # noqa: E731
    result, used = drive(dpmpp_2s_ancestral(start, sigmas, noise), gaussian_denoiser)
    assert used == 2 * 30 - 1
    assert abs(float(result.std()) - SPREAD) < 0.03 and abs(float(result.mean())) < 0.03


def test_sampler_benchmark_runs_on_cpu(capsys):
    """The GPU benchmark of the sampling path against plain diffusers also runs (tiny model) here."""
    import json

    from horde_worker.bench.samplers import main

    assert main(["--samplers", "k_euler,k_dpmpp_sde", "--steps", "2", "--size", "64", "--count", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["sampler"] for row in rows] == ["k_euler", "k_dpmpp_sde"]
    assert all(row["worker_s"] > 0 and row["plain_s"] > 0 and row["ratio"] > 0 for row in rows)
