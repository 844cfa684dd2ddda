"""A diffusers scheduler that runs one of `inference/ksamplers.py`'s samplers inside a pipeline's loop.

The pipeline keeps its own job (conditioning, guidance, ControlNet, inpainting masks, decoding); this
scheduler owns everything about noise levels: the sigmas the job runs, where the sampler evaluates
the model, the start latent, the per-step noise and the latent between steps (kept in float32, as
the reference keeps it, whatever precision the model computes in).

    pipeline loop, evaluation i          this scheduler
    t = timesteps[i]                     the trained timestep nearest the i-th evaluation sigma
    scale_model_input(x, t)              x / sqrt(sigma^2 + 1)
    model -> output                      eps or v
    step(output, t, x)                   denoised = x - sigma * eps (or from v); the sampler takes it
                                         and answers the next point to evaluate, or its final latent

diffusers' image pipelines cut a schedule by `strength` themselves. Here the cut is the reference's
(`schedules.job_schedule`), made before the pipeline runs: the pipeline is handed a schedule twice as
long with strength 0.5, and the half it drops is padding.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from horde_worker.inference import ksamplers, noise
from horde_worker.inference.schedules import ModelSigmas, start_noise_scale

ADAPTIVE_MAX_EVALUATIONS = 400
IMAGE_PIPELINE_STRENGTH = 0.5


class KScheduler(SchedulerMixin, ConfigMixin):
    """One sampler run over given sigmas, driven by a diffusers pipeline."""

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon", **_ignored) -> None:
        self.model_sigmas = ModelSigmas.from_config(dict(self.config))
        self.algorithm = "euler"
        self.run_sigmas: list[float] = []
        self.points: list[float] = []
        self.seeds: list[int] = []
        self.blend_seed_offset = 0
        self.timesteps = torch.zeros(1)
        self.sigmas = torch.zeros(1)
        self.init_noise_sigma = 1.0
        self.finished = False
        self._pad = 0
        self._index = 0
        self._sampler: ksamplers.Sampler | None = None
        self._x: torch.Tensor | None = None
        self._returned: torch.Tensor | None = None
        self._start_noise: torch.Tensor | None = None
        self._blend_noise: torch.Tensor | None = None

    def prepare(self, algorithm: str, sigmas: list[float], seeds: list[int], blend_seed_offset: int = 0) -> KScheduler:
        """Run `algorithm` over `sigmas` for one image per seed. `blend_seed_offset`: inpainting's kept area
        is re-noised from the seeds plus this (the reference's DDIM draws that noise from seed + 1)."""
        self.algorithm, self.run_sigmas, self.seeds = algorithm, list(sigmas), [int(s) for s in seeds]
        self.blend_seed_offset = blend_seed_offset
        if algorithm in ksamplers.ADAPTIVE:
            self.points = [sigmas[0]] * ADAPTIVE_MAX_EVALUATIONS
        else:
            self.points = ksamplers.evaluation_sigmas(algorithm, self.run_sigmas)
        self.init_noise_sigma = start_noise_scale(self.model_sigmas, self.run_sigmas)
        return self

    @property
    def steps(self) -> int:
        return len(self.run_sigmas) - 1

    def pipeline_steps(self, from_image: bool) -> int:
        """The `num_inference_steps` to give the pipeline (with `IMAGE_PIPELINE_STRENGTH` from an image)."""
        return 2 * len(self.points) if from_image else len(self.points)

    def steps_done(self, evaluations: int) -> int:
        """Sampler steps completed after `evaluations` model calls (for progress reports)."""
        if self.finished:
            return self.steps
        if self.algorithm in ksamplers.ADAPTIVE:
            return min(evaluations, self.steps - 1)
        return min(self.steps, round(self.steps * evaluations / max(1, len(self.points))))

    # --- what the pipeline calls -------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_kwargs) -> None:
        self._pad = max(0, num_inference_steps - len(self.points))
        timesteps = [self.model_sigmas.timestep(s) for s in self.points]
        self.timesteps = torch.tensor(timesteps[:1] * self._pad + timesteps, dtype=torch.float32, device=device)
        self.sigmas = torch.tensor(self.points + [0.0], dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._index, self._sampler, self._x, self._returned, self.finished = 0, None, None, None, False

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The pipeline's own cut lands on the padding (see the module's docstring): nothing to do."""

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample / math.sqrt(self._sigma() ** 2 + 1)

    def add_noise(self, original: torch.Tensor, _noise: torch.Tensor, _timesteps: torch.Tensor) -> torch.Tensor:
        """Before the first step: the start latent (the image's, noised to the first sigma). Later (an
        inpainting pipeline re-noising the kept area): the image at the sigma about to be evaluated."""
        if self._sampler is None and self._x is None:
            self._x = original.float() + self.start_noise(original) * self.init_noise_sigma
            self._returned = self._x.to(original.dtype)
            return self._returned
        return (original.float() + self.blend_noise(original) * self._sigma()).to(original.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **_kwargs):
        if self.finished:
            return SchedulerOutput(prev_sample=sample) if return_dict else (sample,)
        x = self._current_x(sample)
        sigma = self._sigma()
        denoised = ksamplers.denoised_from(x, model_output.float(), sigma,
                                           self.config.prediction_type == "v_prediction")
        if self._sampler is None:
            self._sampler = self.sampler_from(x)
            next(self._sampler)
        self._index += 1
        try:
            x, next_sigma = self._sampler.send(denoised)
            if self.algorithm in ksamplers.ADAPTIVE and self._index < len(self.points):
                # The pipeline reads the next timestep from this tensor only now: tell it where we are.
                self.points[self._index] = next_sigma
                self.timesteps[self._pad + self._index] = self.model_sigmas.timestep(
                    max(next_sigma, self.model_sigmas.sigma_min))
        except StopIteration as done:
            x, self.finished = done.value, True
        self._x, self._returned = x, x.to(sample.dtype)
        return SchedulerOutput(prev_sample=self._returned) if return_dict else (self._returned,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- noise and state ---------------------------------------------------------------------------

    def start_noise(self, like: torch.Tensor) -> torch.Tensor:
        """The job's start noise (float32, from each image's seed), shaped like the latents."""
        if self._start_noise is None or self._start_noise.shape != like.shape:
            self._start_noise = noise.start_noise(self.seeds, like.shape, like.device)
        return self._start_noise

    def blend_noise(self, like: torch.Tensor) -> torch.Tensor:
        if not self.blend_seed_offset:
            return self.start_noise(like)
        if self._blend_noise is None:
            seeds = [s + self.blend_seed_offset for s in self.seeds]
            self._blend_noise = noise.start_noise(seeds, like.shape, like.device)
        return self._blend_noise

    def _sigma(self) -> float:
        return self.points[min(self._index, len(self.points) - 1)]

    def _current_x(self, sample: torch.Tensor) -> torch.Tensor:
        """The float32 latent the model was just evaluated at. The pipeline hands back what `step`
        returned, unless it changed it (inpainting puts the kept area back): then its latent is the truth."""
        if self._sampler is None and self._x is None:
            self._x = self.start_noise(sample) * self.init_noise_sigma  # txt2img: the pipeline scaled our noise
        if self._sampler is None or sample is self._returned:
            return self._x
        return sample.float()

    def sampler_from(self, x: torch.Tensor) -> ksamplers.Sampler:
        """This run's sampler, not yet started, from the float32 latent `x` (its first point)."""
        return ksamplers.ALGORITHMS[self.algorithm](x, self.run_sigmas, self._noise_source(x))

    def _noise_source(self, x: torch.Tensor) -> noise.NoiseSource:
        if self.algorithm == "dpmpp_sde":
            low, high = ksamplers.positive_range(self.run_sigmas)
            return noise.brownian_noise(self.seeds, x, low, high)
        return noise.ancestral_noise(self.seeds, x)
