"""Step-level batching: jobs of one model that differ in prompt, seed, steps, guidance and sampler, joining
and leaving at different steps, each end with the latent the job makes alone."""

from __future__ import annotations

import pytest
import torch

from horde_worker.inference.generate import Pass
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.stepbatch import BatchedJob, StepBatch, unet_denoiser
from tests.conftest import job_request


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


JOBS = {
    "a": dict(sampler_name="k_euler", steps=5, cfg_scale=7.0, prompt="a cat", seeds=[1]),
    "b": dict(sampler_name="k_dpmpp_2m", karras=True, steps=3, cfg_scale=4.0, prompt="a dog in snow",
              negative_prompt="blurry", seeds=[2, 5]),
    "c": dict(sampler_name="k_euler_a", steps=4, cfg_scale=6.0, prompt="a tree", seeds=[3]),
    "d": dict(sampler_name="k_heun", steps=4, prompt="a boat", seeds=[4]),
    "e": dict(sampler_name="k_lms", steps=4, prompt="a house", seeds=[6], width=64, height=96),
    "f": dict(sampler_name="k_dpmpp_sde", steps=3, prompt="a bird", seeds=[8]),
}


def request_for(name: str, **extra):
    return job_request(**{"width": 64, "height": 64, **JOBS[name], **extra})


def batched_job(model, name: str) -> BatchedJob:
    request = request_for(name)
    count = len(request.seeds)
    pass_ = Pass(model, request, [request.prompt] * count, [request.negative_prompt] * count, None)
    return BatchedJob.txt2img(pass_, request.steps, request.width, request.height)


def alone(model, name: str) -> torch.Tensor:
    request = request_for(name)
    count = len(request.seeds)
    pass_ = Pass(model, request, [request.prompt] * count, [request.negative_prompt] * count, None)
    return pass_.sample(pass_.pipe, request.steps, width=request.width, height=request.height,
                        output_type="latent").images


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_a_batched_job_ends_with_the_latent_it_makes_alone(model):
    forwards: list[int] = []
    unet = unet_denoiser(model.pipeline.unet)

    def counting(model_input, timesteps, embeds):
        forwards.append(model_input.shape[0])
        return unet(model_input, timesteps, embeds)

    batch = StepBatch(counting)
    results: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("a", "b", "d", "e", "f"):
            batch.add(name, batched_job(model, name))
        results.update(batch.step())
        results.update(batch.step())
        batch.add("c", batched_job(model, "c"))  # joins mid-batch
        results.update(batch.step())
        batch.remove("d")  # faulted mid-batch: the others go on untouched
        results.update(batch.run())
        expected = {name: alone(model, name) for name in ("a", "b", "c", "e", "f")}
    assert set(results) == set(expected)
    for name, latent in results.items():
        assert relative(latent, expected[name]) <= 1e-4, name
    assert relative(results["a"], results["c"]) > 0.1  # different jobs, different images
    # a, b (two images), d and f share the 64x64 forward with their guidance pairs; e (64x96) runs apart;
    # c joins the shared one at the third step.
    assert forwards[:2] == [2 * 5, 2] and forwards[4] == 2 * 6
    one_job_at_a_time = 5 + 3 + 4 + 3 + 4 + 5  # evaluations of a, b, c, d (until removed), e, f
    assert len(forwards) < one_job_at_a_time


def test_sdxl_jobs_batch_with_their_pooled_and_size_conditioning(tmp_path):
    from horde_worker.inference.tiny import write_tiny_checkpoint

    xl = load_pipeline(write_tiny_checkpoint(tmp_path / "xl.safetensors", "stable_diffusion_xl"), torch.device("cpu"),
                       torch.float32, name="tiny-xl")
    batch = StepBatch(unet_denoiser(xl.pipeline.unet))
    results, expected = {}, {}
    with torch.no_grad():
        for name in ("a", "b", "c"):
            request = request_for(name, baseline="stable_diffusion_xl")
            count = len(request.seeds)
            pass_ = Pass(xl, request, [request.prompt] * count, [request.negative_prompt] * count, None)
            batch.add(name, BatchedJob.txt2img(pass_, request.steps, 64, 64))
            expected[name] = pass_.sample(pass_.pipe, request.steps, width=64, height=64,
                                          output_type="latent").images
        results = batch.run()
    for name, latent in results.items():
        assert relative(latent, expected[name]) <= 1e-4, name


def test_flux_jobs_batch_with_their_own_timesteps_and_guidance(tmp_path):
    from horde_worker.inference import flux_batch
    from horde_worker.inference.tiny import write_tiny_flux_checkpoint

    dev = load_pipeline(write_tiny_flux_checkpoint(tmp_path / "dev.safetensors", seed=1, guidance=True, fp8=False),
                        torch.device("cpu"), torch.float32, name="tiny-dev")
    jobs = {"a": dict(steps=4, cfg_scale=3.5, prompt="a cat", seeds=[1]),
            "b": dict(steps=3, cfg_scale=2.0, prompt="a dog in the snow", seeds=[2, 5]),
            "c": dict(steps=5, cfg_scale=1.0, prompt="a tree", seeds=[3]),
            "wide": dict(steps=2, cfg_scale=3.5, prompt="a field", seeds=[4], width=96)}
    forwards: list[int] = []
    transformer = flux_batch.transformer_denoiser(dev.pipeline)

    def counting(hidden_states, timesteps, conditioning):
        forwards.append(hidden_states.shape[0])
        return transformer(hidden_states, timesteps, conditioning)

    batch = StepBatch(counting)
    results, expected = {}, {}
    with torch.no_grad():
        for name, fields in jobs.items():
            request = job_request(**{"width": 64, "height": 64, "baseline": "flux_1", "sampler_name": "k_euler",
                                     **fields})
            count = len(request.seeds)
            pass_ = Pass(dev, request, [request.prompt] * count, [request.negative_prompt] * count, None)
            batch.add(name, flux_batch.txt2img(pass_, request.steps, request.width, request.height))
            if name == "a":
                results.update(batch.step())  # the others join a step later
            expected[name] = pass_.sample(pass_.pipe, request.steps, width=request.width, height=request.height,
                                          output_type="latent").images
        results.update(batch.run())
    assert set(results) == set(jobs)
    for name, latent in results.items():
        assert relative(latent, expected[name]) <= 1e-4, name
    assert relative(results["a"], results["c"]) > 0.1
    assert forwards[0] == 1 and forwards[1] == 4  # a alone, then a + b (two images) + c; wide runs apart


def test_identical_prompts_of_a_job_are_encoded_once(model):
    from horde_worker.inference.conditioning import encode_prompts

    calls: list[int] = []
    hook = model.pipeline.text_encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            shared = encode_prompts(model.pipeline, "stable_diffusion_1", ["a cat"] * 3, ["", "", "blurry"], 1)
            single = encode_prompts(model.pipeline, "stable_diffusion_1", ["a cat"], ["blurry"], 1)
    finally:
        hook.remove()
    assert len(calls) == 3 + 2  # "a cat", "", "blurry"; then "a cat", "blurry"
    assert shared["prompt_embeds"].shape[0] == 3 and torch.equal(shared["prompt_embeds"][2], single["prompt_embeds"][0])
    assert torch.equal(shared["negative_prompt_embeds"][2], single["negative_prompt_embeds"][0])
    assert not torch.equal(shared["negative_prompt_embeds"][0], shared["negative_prompt_embeds"][2])
