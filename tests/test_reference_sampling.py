"""The worker samples as the reference worker does: the same sigma schedules, start noise, per-step noise
and sampler maths, checked against the independent transcription in `tests/reference_sampling.py`, on a
toy denoiser with a known answer and end to end through the tiny SD model's UNet."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import ksamplers, noise
from horde_worker.inference.generate import Pass
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.samplers import SAMPLERS, make_scheduler
from horde_worker.inference.schedules import ModelSigmas, job_schedule
from tests import reference_sampling as ref
from tests.conftest import job_request

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
K_SAMPLERS = [name for name in SAMPLERS if name != "dpmsolver"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- schedules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 20, 50])
@pytest.mark.parametrize("rule", ["normal", "karras", "simple"])
@pytest.mark.parametrize("sampler", ["euler", "dpm_2"])
@pytest.mark.parametrize("denoise", [1.0, 0.5, 0.3])
def test_sigma_schedules_equal_the_reference(steps, rule, sampler, denoise):
    ours = job_schedule(ModelSigmas.from_config(SD_CONFIG), steps, rule, denoise, drop_penultimate=sampler == "dpm_2")
    theirs = ref.sampler_sigmas(ref.Discrete(), sampler, rule, steps, denoise)
    assert len(ours) == len(theirs) == steps + 1
    assert ours[-1] == 0.0
    assert np.allclose(ours, theirs.numpy(), rtol=1e-5, atol=0)


def test_normal_schedule_spans_the_models_own_range():
    sigmas = job_schedule(ModelSigmas.from_config(SD_CONFIG), 20, "normal")
    assert math.isclose(sigmas[0], 14.6146, rel_tol=1e-4) and math.isclose(sigmas[-2], 0.0292, rel_tol=1e-2)
    karras = job_schedule(ModelSigmas.from_config(SD_CONFIG), 20, "karras")
    assert karras[0] == pytest.approx(sigmas[0]) and karras[-2] == pytest.approx(sigmas[-2])
    assert not np.allclose(karras, sigmas)


# --- sampler maths on a toy denoiser ----------------------------------------------------------------
# Data drawn from N(0, 0.8^2): the ideal denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2).


def toy(x: torch.Tensor, sigma) -> torch.Tensor:
    return x * 0.64 / (0.64 + float(sigma) ** 2)


def drive(sampler: ksamplers.Sampler, denoise) -> torch.Tensor:
    try:
        x, sigma = next(sampler)
        while True:
            x, sigma = sampler.send(denoise(x, sigma))
    except StopIteration as done:
        return done.value


def our_noise(algorithm: str, seed: int, x: torch.Tensor, sigmas: list[float]):
    if algorithm == "dpmpp_sde":
        return noise.brownian_noise([seed], x, *ksamplers.positive_range(sigmas))
    return noise.ancestral_noise([seed], x)


@pytest.mark.parametrize("algorithm", sorted(ksamplers.ALGORITHMS))
@pytest.mark.parametrize("rule", ["normal", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 20])
def test_each_sampler_computes_the_references_latent_on_a_toy_denoiser(algorithm, rule, steps):
    drop = algorithm in ("dpm_2", "dpm_2_ancestral")
    sigmas = job_schedule(ModelSigmas.from_config(SD_CONFIG), steps, rule, drop_penultimate=drop)
    start = noise.start_noise([7], (1, 4, 8, 8)) * math.sqrt(1 + sigmas[0] ** 2)
    ours = drive(ksamplers.ALGORITHMS[algorithm](start, sigmas, our_noise(algorithm, 7, start, sigmas)), toy)
    theirs = ref.run(algorithm, toy, start.clone(), ref.sampler_sigmas(ref.Discrete(), algorithm, rule, steps), 7)
    assert relative(ours, theirs) <= 1e-4


def test_dpm_2_runs_its_next_to_last_sigma_dropped():
    model = ModelSigmas.from_config(SD_CONFIG)
    plain, dropped = job_schedule(model, 10, "normal"), job_schedule(model, 10, "normal", drop_penultimate=True)
    assert len(dropped) == len(plain) and dropped[0] == plain[0] and dropped[-1] == 0
    assert dropped[-2] > plain[-2]  # its last positive sigma is the 11-step schedule's next-to-last


# --- end to end through the tiny model's UNet -------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


@pytest.fixture(scope="module")
def v_model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny-v", v_prediction=True)


def reference_denoiser(model, conditioning: dict, cfg: float, v_prediction: bool):
    """The reference's model call: input scaled by 1/sqrt(sigma^2 + 1), the nearest trained timestep,
    guidance applied to the two denoised predictions."""
    unet = model.pipeline.unet
    discrete = ref.Discrete()
    cond, uncond = conditioning["prompt_embeds"], conditioning["negative_prompt_embeds"]

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        x_in = x / (sigma**2 + 1) ** 0.5
        t = discrete.timestep(sigma.reshape(1)).float()
        outputs = [unet(x_in, t, encoder_hidden_states=embeds).sample for embeds in (uncond, cond)]
        if v_prediction:
            predictions = [x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5 for out in outputs]
        else:
            predictions = [x - out * sigma for out in outputs]
        return predictions[0] + (predictions[1] - predictions[0]) * cfg

    return denoise


def source_png() -> bytes:
    gradient = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack([np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)),
                       np.full((64, 64), 90, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def worker_and_reference(model, sampler: str, karras: bool, denoise: float | None, v_prediction: bool = False,
                         seed: int = 11, steps: int = 5):
    request = job_request(width=64, height=64, steps=steps, sampler_name=sampler, karras=karras, seeds=[seed],
                          cfg_scale=6.0, negative_prompt="blurry")
    pass_ = Pass(model, request, ["a cat"], ["blurry"], None)
    with torch.no_grad():
        if denoise is None:
            ours = pass_.sample(pass_.pipe, steps, width=64, height=64, output_type="latent").images
            latent = torch.zeros_like(ours)
        else:
            latent = pass_.encode([Image.open(io.BytesIO(source_png())).convert("RGB")])
            ours = pass_.sample(pass_.image_pipeline(), steps, denoise, image=latent, width=64, height=64,
                                output_type="latent").images
        algorithm = ref.HORDE_NAMES[sampler]
        sigmas = ref.sampler_sigmas(ref.Discrete(), algorithm, "karras" if karras else "normal", steps, denoise or 1.0)
        start_noise = torch.randn(latent.shape, generator=torch.manual_seed(seed), device="cpu")
        x = ref.start_latent(ref.Discrete(), sigmas, start_noise, latent)
        denoiser = reference_denoiser(model, pass_.conditioning(), 6.0, v_prediction)
        theirs = ref.run(algorithm, denoiser, x, sigmas, seed)
    return ours, theirs


@pytest.mark.parametrize("sampler", K_SAMPLERS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("denoise", [None, 0.5])
def test_the_workers_latent_equals_the_references(model, sampler, karras, denoise):
    ours, theirs = worker_and_reference(model, sampler, karras, denoise)
    assert torch.isfinite(ours).all()
    assert relative(ours, theirs) <= 1e-4


@pytest.mark.parametrize("sampler", ["k_euler", "k_dpmpp_2m", "k_euler_a", "k_heun"])
def test_v_prediction_models_follow_the_reference_too(v_model, sampler):
    ours, theirs = worker_and_reference(v_model, sampler, True, None, v_prediction=True)
    assert relative(ours, theirs) <= 1e-4


# The samplers that draw noise as they go, and one that does not.
@pytest.mark.parametrize("sampler", ["k_euler", "k_euler_a", "k_dpm_2_a", "k_dpmpp_2s_a", "k_dpmpp_sde", "lcm",
                                     "k_dpm_adaptive"])
def test_each_seed_of_a_batch_is_its_own_image(model, sampler):
    def latents(seeds: list[int]) -> torch.Tensor:
        request = job_request(width=64, height=64, steps=5, sampler_name=sampler, seeds=seeds)
        pass_ = Pass(model, request, ["a cat"] * len(seeds), [""] * len(seeds), None)
        with torch.no_grad():
            if sampler == "k_dpm_adaptive":  # run per seed by the job, as its steps follow each image's error
                return torch.cat([Pass(model, job_request(width=64, height=64, steps=5, sampler_name=sampler,
                                                          seeds=[s]), ["a cat"], [""], None)
                                  .sample(model.pipeline, 5, width=64, height=64, output_type="latent").images
                                  for s in seeds])
            return pass_.sample(pass_.pipe, 5, width=64, height=64, output_type="latent").images

    batch, alone = latents([3, 4]), latents([4])
    assert relative(batch[0], batch[1]) > 0.1
    assert relative(batch[1:], alone) <= 1e-4


def test_ddim_renoises_an_inpainting_jobs_kept_area_from_the_next_seed():
    euler = make_scheduler("k_euler", False, SD_CONFIG, [5], 4)
    ddim = make_scheduler("DDIM", False, SD_CONFIG, [5], 4)
    like = torch.zeros(1, 4, 8, 8)
    assert torch.equal(euler.blend_noise(like), euler.start_noise(like))
    assert torch.equal(ddim.blend_noise(like), noise.start_noise([6], like.shape))
    assert torch.equal(ddim.start_noise(like), euler.start_noise(like))


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory):
    from horde_worker.inference.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors", "stable_diffusion_xl")
    return load_pipeline(path, torch.device("cpu"), torch.float32, name="tiny-xl")


@pytest.mark.parametrize("sampler,karras,denoise", [("k_euler", False, None), ("k_dpmpp_2m", True, None),
                                                    ("k_euler_a", True, 0.5), ("k_dpm_2", False, 0.5)])
def test_sdxl_follows_the_reference_too(xl_model, sampler, karras, denoise):
    """SDXL's UNet also reads the pooled text embedding and the size conditioning; the sampling is the same."""
    request = job_request(width=64, height=64, steps=4, sampler_name=sampler, karras=karras, seeds=[2],
                          cfg_scale=5.0, baseline="stable_diffusion_xl")
    pass_ = Pass(xl_model, request, ["a cat"], ["blurry"], None)
    unet = xl_model.pipeline.unet
    with torch.no_grad():
        if denoise is None:
            ours = pass_.sample(pass_.pipe, 4, width=64, height=64, output_type="latent").images
            latent = torch.zeros_like(ours)
        else:
            latent = pass_.encode([Image.open(io.BytesIO(source_png())).convert("RGB")])
            ours = pass_.sample(pass_.image_pipeline(), 4, denoise, image=latent, width=64, height=64,
                                output_type="latent").images
        c = pass_.conditioning()
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        discrete = ref.Discrete()

        def denoiser(x, sigma):
            sigma = torch.as_tensor(sigma, dtype=torch.float32)
            x_in, t = x / (sigma**2 + 1) ** 0.5, discrete.timestep(sigma.reshape(1)).float()
            outputs = [unet(x_in, t, encoder_hidden_states=embeds,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                       for embeds, pooled in ((c["negative_prompt_embeds"], c["negative_pooled_prompt_embeds"]),
                                              (c["prompt_embeds"], c["pooled_prompt_embeds"]))]
            uncond, cond = (x - out * sigma for out in outputs)
            return uncond + (cond - uncond) * 5.0

        algorithm = ref.HORDE_NAMES[sampler]
        sigmas = ref.sampler_sigmas(discrete, algorithm, "karras" if karras else "normal", 4, denoise or 1.0)
        start = torch.randn(latent.shape, generator=torch.manual_seed(2), device="cpu")
        theirs = ref.run(algorithm, denoiser, ref.start_latent(discrete, sigmas, start, latent), sigmas, 2)
    assert relative(ours, theirs) <= 1e-4
