"""Flux txt2img jobs in the step batch: each job keeps its own flow-matching Euler scheduler (the one its
pipeline call would use, on the reference's sigmas from `flux.schedule`), and jobs of one image size
share the transformer's forward, each sample with its own timestep, guidance and prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from horde_worker.inference import flux
from horde_worker.inference.conditioning import plain_text

# The conditioning a step batch stacks per row (image ids and text ids are shared by the group).
ROW_INPUTS = ("encoder_hidden_states", "pooled_projections", "guidance")


def _flow_sampler(scheduler, latents: torch.Tensor) -> Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor,
                                                                 torch.Tensor]:
    for t in scheduler.timesteps:
        velocity = yield latents, t
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


@dataclass
class FluxBatchedJob:
    """One Flux job's sampling, as `stepbatch.BatchedJob` for the UNet models."""

    sampler: Generator
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor
    guidance: torch.Tensor | None
    size: tuple[int, int]
    steps: int
    steps_done: Callable[[int], int] = field(default=lambda evaluations: evaluations)
    point: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False)
    evaluations: int = field(default=0, init=False)

    def group_key(self) -> tuple:
        x, _t = self.point
        return ("flux", self.size, tuple(x.shape[1:]), tuple(self.prompt_embeds.shape[1:]), self.guidance is None)

    def rows(self):
        x, t = self.point
        count = x.shape[0]
        conditioning = {"encoder_hidden_states": self.prompt_embeds, "pooled_projections": self.pooled}
        if self.guidance is not None:
            conditioning["guidance"] = self.guidance
        # As the pipeline hands the timestep over: in the latents' precision, divided by 1000.
        timestep = t.expand(count).to(x.dtype) / 1000
        return x, timestep, conditioning, {"txt_ids": self.text_ids, "img_ids": self.image_ids}

    def answer(self, output: torch.Tensor) -> torch.Tensor:
        return output


def txt2img(pass_, steps: int, width: int, height: int) -> FluxBatchedJob:
    """A Flux txt2img job from its `generate.Pass`: prompts encoded, start noise and sigmas as `flux.schedule`
    gives them to the pipeline."""
    request, pipe = pass_.request, pass_.pipe
    count = len(request.seeds)
    device = pipe._execution_device
    distilled = bool(pipe.transformer.config.guidance_embeds)
    prompts = [plain_text(p) for p in pass_.prompts]
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                         max_sequence_length=512 if distilled else 256)
    _steps, extra = flux.schedule(pipe, steps, None, request.seeds, width, height)
    latents = extra["latents"]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=extra["sigmas"], device=device)
    scheduler.set_begin_index(0)
    rows = 2 * (height // (pipe.vae_scale_factor * 2))
    columns = 2 * (width // (pipe.vae_scale_factor * 2))
    image_ids = pipe._prepare_latent_image_ids(count, rows // 2, columns // 2, device, latents.dtype)
    guidance = None
    if distilled:
        guidance = torch.full([1], request.cfg_scale, device=device, dtype=torch.float32).expand(count)
    return FluxBatchedJob(_flow_sampler(scheduler, latents), prompt_embeds, pooled, text_ids, image_ids, guidance,
                          (width, height), steps)


def transformer_denoiser(pipe):
    """The pipeline's Flux transformer as a step-batch denoiser."""
    transformer = pipe.transformer

    def denoise(hidden_states: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        return transformer(hidden_states=hidden_states, timestep=timesteps, return_dict=False, **conditioning)[0]

    return denoise
