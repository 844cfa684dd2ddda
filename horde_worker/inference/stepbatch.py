"""Step-level batching: the samplers of several jobs advanced together, one denoiser forward per step.

Each job's sampler (`inference/ksamplers.py`) is a generator that asks for the denoiser at one point
(x, sigma) at a time, so jobs at different sigmas, with different samplers, steps, guidance scales
and prompts can share a forward pass:

    step()   gather every running job's pending point
             group them by what can be concatenated (latent shape, conditioning shape)
             per group: one UNet call over [all uncond | all cond] samples, each with its own timestep
             per job: denoised = x - sigma * guided eps (or from v), sent to its sampler, which answers
             its next point, or its final latent

Jobs join (`add`) and leave (`remove`, or by finishing) between steps. A job's images depend only on
its own inputs: the same job run alone gives the same latent up to the rounding of a larger matmul.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from horde_worker.inference import ksamplers
from horde_worker.inference.schedules import ModelSigmas

# (model input, one timestep per sample, conditioning tensors per sample by name) -> the model's output
Denoiser = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class BatchedJob:
    """One job's sampling: its sampler (not yet started, holding its start latent) and its conditioning
    (`encoder_hidden_states`, and for SDXL `text_embeds` and `time_ids`), one row per image."""

    sampler: ksamplers.Sampler
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    guidance: float
    model_sigmas: ModelSigmas
    v_prediction: bool = False
    steps: int = 0
    # Sampler steps done after n denoiser evaluations (for progress reports).
    steps_done: Callable[[int], int] = field(default=lambda evaluations: evaluations)
    point: tuple[torch.Tensor, float] | None = field(default=None, init=False)
    evaluations: int = field(default=0, init=False)

    def group_key(self) -> tuple:
        """Jobs with equal keys can share a forward: same latent shape, same conditioning shapes."""
        x, _sigma = self.point
        return (tuple(x.shape[1:]), tuple((name, tuple(t.shape[1:])) for name, t in sorted(self.cond.items())))

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model input, timesteps, conditioning, shared inputs) of this job's rows: its images without and
        with the prompt (the classifier-free guidance pair)."""
        x, sigma = self.point
        scaled = x / math.sqrt(sigma**2 + 1)
        t = torch.full((2 * x.shape[0],), float(self.model_sigmas.timestep(sigma)), device=x.device)
        conditioning = {name: torch.cat([self.uncond[name], self.cond[name]]) for name in self.cond}
        return torch.cat([scaled, scaled]), t, conditioning, {}

    def answer(self, output: torch.Tensor) -> torch.Tensor:
        """What the sampler is sent for this job's rows of the model output: the guided denoised latent."""
        x, sigma = self.point
        u, c = output.float().chunk(2)
        return ksamplers.denoised_from(x, u + self.guidance * (c - u), sigma, self.v_prediction)

    @classmethod
    def txt2img(cls, pass_, steps: int, width: int, height: int) -> BatchedJob:
        """A txt2img job of an SD1, SD2 or SDXL model, from its `generate.Pass` (conditioning, sampler, seeds)."""
        from horde_worker.inference.samplers import make_scheduler

        request, pipe = pass_.request, pass_.pipe
        count = len(request.seeds)
        scheduler = make_scheduler(request.sampler_name, request.karras, pass_.model.scheduler_config,
                                   request.seeds, steps)
        shape = (count, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        start = scheduler.start_noise(torch.empty(shape, device=pipe.unet.device)) * scheduler.init_noise_sigma
        c = pass_.conditioning()
        cond, uncond = {"encoder_hidden_states": c["prompt_embeds"]}, {"encoder_hidden_states": c["negative_prompt_embeds"]}
        if "pooled_prompt_embeds" in c:
            # SDXL's size conditioning: original size, crop corner, target size.
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=c["prompt_embeds"].dtype,
                                    device=c["prompt_embeds"].device).repeat(count, 1)
            cond.update(text_embeds=c["pooled_prompt_embeds"], time_ids=time_ids)
            uncond.update(text_embeds=c["negative_pooled_prompt_embeds"], time_ids=time_ids)
        return cls(scheduler.sampler_from(start), cond, uncond, request.cfg_scale, scheduler.model_sigmas,
                   scheduler.config.prediction_type == "v_prediction", steps, scheduler.steps_done)


class StepBatch:
    """The running jobs of one model, advanced one denoiser evaluation per `step`."""

    def __init__(self, denoiser: Denoiser, model=None) -> None:
        self.denoiser = denoiser
        self.model = model  # the loaded model whose denoiser this is (the engine decodes with its VAE)
        self.running: dict[str, BatchedJob] = {}

    def add(self, job_id: str, job: BatchedJob) -> None:
        """Join at the next step."""
        job.point = next(job.sampler)
        self.running[job_id] = job

    def remove(self, job_id: str) -> None:
        """Leave now (a faulted or aborted job); the others are untouched."""
        self.running.pop(job_id, None)

    def groups(self) -> dict[tuple, list[str]]:
        """The running jobs by group key."""
        groups: dict[tuple, list[str]] = {}
        for job_id, job in self.running.items():
            groups.setdefault(job.group_key(), []).append(job_id)
        return groups

    def step(self, only: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One denoiser evaluation for every running job (or for the jobs `only` names, which must share a
        group); returns the final latents of jobs that finished."""
        chosen = self.groups().values() if only is None else [[j for j in only if j in self.running]]
        finished: dict[str, torch.Tensor] = {}
        for job_ids in chosen:
            if not job_ids:
                continue
            for job_id, answer in zip(job_ids, self._evaluate([self.running[j] for j in job_ids]), strict=True):
                job = self.running[job_id]
                job.evaluations += 1
                try:
                    job.point = job.sampler.send(answer)
                except StopIteration as done:
                    finished[job_id] = done.value
                    del self.running[job_id]
        return finished

    def _evaluate(self, jobs: list[BatchedJob]) -> list[torch.Tensor]:
        rows = [job.rows() for job in jobs]
        model_input = torch.cat([r[0] for r in rows])
        t = torch.cat([r[1] for r in rows]).to(model_input.device)
        conditioning = {name: torch.cat([r[2][name] for r in rows]) for name in rows[0][2]}
        conditioning.update(rows[0][3])  # inputs every row shares (same for the whole group)
        output = self.denoiser(model_input, t, conditioning)
        answers, start = [], 0
        for job, r in zip(jobs, rows, strict=True):
            count = r[0].shape[0]
            answers.append(job.answer(output[start:start + count]))
            start += count
        return answers

    def run(self) -> dict[str, torch.Tensor]:
        """Step until every running job has finished."""
        done: dict[str, torch.Tensor] = {}
        while self.running:
            done.update(self.step())
        return done


def unet_denoiser(unet) -> Denoiser:
    """A diffusers UNet2DConditionModel as a `Denoiser` (in its own precision)."""

    def denoise(model_input: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        tensors = {name: value.to(unet.dtype) for name, value in conditioning.items()}
        added = {name: tensors.pop(name) for name in ("text_embeds", "time_ids") if name in tensors}
        return unet(model_input.to(unet.dtype), timesteps, added_cond_kwargs=added or None, **tensors).sample

    return denoise
