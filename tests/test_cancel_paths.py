"""A stopped job ends at the sampling step where the stop is seen, on every path through the pipelines:
diffusers schedulers and the k-samplers run inside them, the adaptive sampler's one seed at a time,
img2img, inpainting, a hires fix's second pass and Flux."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.conftest import job_request


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from horde_worker.inference.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("paths") / "m.safetensors", "stable_diffusion_1")


def job(model: Path, job_id: str, **overrides):
    return job_request(job_id=job_id, model_name="m", model_path=str(model), **overrides)


def png(size: int, mode: str = "RGB", color=(200, 80, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else 255).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded(model):
    import torch

    from horde_worker.inference.pipelines import load_pipeline

    return load_pipeline(model, torch.device("cpu"), torch.float32, name="m")


def stop_at(n: int):
    """An on_step that records each step and raises JobCancelled at the n-th, as the runner's does."""
    from horde_worker.inference.cancellation import JobCancelled

    calls: list[int] = []

    def on_step(step: int, total: int) -> None:
        calls.append(step)
        if len(calls) == n:
            raise JobCancelled("j", "test")

    return on_step, calls


PATHS = {
    "diffusers scheduler": {},
    "k_dpmpp_2s_a": dict(sampler_name="k_dpmpp_2s_a"),
    "k_dpm_fast": dict(sampler_name="k_dpm_fast"),
    "k_dpm_adaptive, one seed at a time": dict(sampler_name="k_dpm_adaptive", seeds=[1, 2]),
    "img2img": dict(source_image=png(64), denoising_strength=0.6),
    "inpainting": dict(source_image=png(64), source_mask=png(64, "L"), source_processing="inpainting"),
}


@pytest.mark.parametrize("path", PATHS)
def test_every_sampling_path_stops_at_the_step_the_cancel_is_seen(loaded, model, path):
    from horde_worker.inference.cancellation import JobCancelled
    from horde_worker.inference.generate import run_job

    on_step, calls = stop_at(2)
    with pytest.raises(JobCancelled):
        run_job(loaded, job(model, "j", width=64, height=64, steps=5, **PATHS[path]), on_step)
    assert len(calls) == 2  # not one step more


def test_hires_fix_stops_in_its_second_pass(loaded, model, monkeypatch):
    from horde_worker.inference import generate, hires
    from horde_worker.inference.cancellation import JobCancelled

    monkeypatch.setattr(hires, "applies", lambda *args: True)
    monkeypatch.setattr(hires, "first_pass_size", lambda *args: (64, 64))  # a first pass at 64 for a 128 job
    request = job(model, "j", width=128, height=128, steps=8, hires_fix=True)
    totals: list[int] = []
    generate.run_job(loaded, request, lambda step, total: totals.append(total))
    first_pass = totals.count(8)
    assert first_pass == 8 and totals[first_pass:] == [6] * 6  # two passes, the second of 6 steps
    on_step, calls = stop_at(first_pass + 1)
    with pytest.raises(JobCancelled):
        generate.run_job(loaded, request, on_step)
    assert len(calls) == first_pass + 1


def test_flux_stops_at_the_step_the_cancel_is_seen(tmp_path, model):
    import torch

    from horde_worker.inference.cancellation import JobCancelled
    from horde_worker.inference.generate import run_job
    from horde_worker.inference.pipelines import load_pipeline
    from horde_worker.inference.tiny import write_tiny_flux_checkpoint

    flux = load_pipeline(write_tiny_flux_checkpoint(tmp_path / "flux.safetensors", fp8=False), torch.device("cpu"),
                         torch.float32, name="flux")
    on_step, calls = stop_at(2)
    with pytest.raises(JobCancelled):
        run_job(flux, job(model, "j", baseline="flux_1", cfg_scale=1.0, width=64, height=64, steps=4), on_step)
    assert len(calls) == 2
