"""One horde job through a loaded model, top to bottom.

    prompts  = the `{a|b}` choices of each image's seed, then weights and chunks -> conditioning
    adapters = the job's LoRAs and textual inversions, applied for this job only
    sources  = source image and mask at the job's size
    then exactly one of:
      ControlNet    (control_type: the annotator's map guides a txt2img pass)
      inpainting    (a mask from source_mask or the source's alpha; kept pixels composited back)
      img2img       (denoising_strength; the requested number of steps really runs)
      txt2img       (with hires_fix: see inference/hires.py)

Image i depends only on seed i: one CPU generator per image, so a job for that seed alone
regenerates it exactly, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from horde_worker.inference import decode, flux, hires
from horde_worker.inference import sources as sources_mod
from horde_worker.inference.conditioning import encode_prompts, plain_text
from horde_worker.inference.kscheduler import IMAGE_PIPELINE_STRENGTH, KScheduler
from horde_worker.inference.messages import GenerateRequest
from horde_worker.inference.samplers import UnsupportedSampler, make_scheduler, sampler_refusal


class UnsupportedJob(ValueError):
    """The job asks for something this model cannot do faithfully."""


@dataclass
class JobOutput:
    """Images of a job and the gen_metadata notes found while making them."""

    images: list[np.ndarray]
    notes: list[tuple[str, str, str | None]] = field(default_factory=list)


def img2img_steps(steps: int, strength: float) -> int:
    """The schedule length whose `strength` part is exactly `steps` steps (diffusers runs
    int(schedule x strength) of them)."""
    total = max(steps, math.ceil(steps / strength - 1e-9))
    while int(total * strength) < steps:
        total += 1
    return total


# Baselines with a pipeline module of their own (its `run(model, request, on_step)`).
SPLIT_RUNNERS = {"z_image_turbo": "horde_worker.inference.zimage", "qwen_image": "horde_worker.inference.qwen_image",
                 "stable_cascade": "horde_worker.inference.cascade_run"}


def run_job(model, request: GenerateRequest, on_step: Callable[[int, int], None] | None = None) -> JobOutput:
    """Generate the job's images (one per seed)."""
    from horde_worker.inference import adapters, control

    if model.baseline in SPLIT_RUNNERS:
        import importlib

        refusal = sampler_refusal(request.sampler_name, model.baseline)
        if refusal is not None:
            raise UnsupportedSampler(refusal)
        from horde_worker.models.reference import BASELINE_NAMES, WITHOUT_ADAPTERS

        if model.baseline in WITHOUT_ADAPTERS and (request.loras or request.tis):
            raise UnsupportedJob(f"LoRAs and textual inversions are not available for {BASELINE_NAMES[model.baseline]} "
                                 "models")
        return JobOutput(images=importlib.import_module(SPLIT_RUNNERS[model.baseline]).run(model, request, on_step),
                         notes=[])
    if request.tiling and model.baseline == "flux_1":
        raise UnsupportedJob("tiling is not available for Flux models (no convolutions to wrap)")
    refusal = sampler_refusal(request.sampler_name, model.baseline)
    if refusal is not None:
        raise UnsupportedSampler(refusal)
    if request.sampler_name == "k_dpm_adaptive" and len(request.seeds) > 1:
        # Its steps follow the error of what it samples: one image at a time keeps each seed's image its own.
        outputs = [run_job(model, replace(request, seeds=[seed]), on_step) for seed in request.seeds]
        return JobOutput([o.images[0] for o in outputs], [n for o in outputs for n in o.notes])
    notes: list[tuple[str, str, str | None]] = []
    if request.control_type and not request.return_control_map:
        if model.baseline not in ("stable_diffusion_1", "stable_diffusion_2") or not request.control_model_path:
            raise UnsupportedJob(f"no ControlNet for {request.control_type} on {model.baseline} models")
        # Built from the UNet before any LoRA wraps its layers.
        control.load_controlnet(model, request.control_model_path)
    with adapters.applied(model, request, notes) as (prompts, negatives), tiled(model.pipeline, request.tiling):
        sources = sources_mod.load_sources(request)
        pass_ = Pass(model, request, prompts, negatives, on_step)
        if request.control_type:
            images = control.run(pass_, sources)
        elif sources.painting:
            strength = request.denoising_strength or 1.0
            images = [sources_mod.composite(img, sources) for img in pass_.inpaint(sources, strength)]
        elif pass_.inpainting_model:
            # An inpainting UNet always reads a mask: txt2img and img2img repaint everything.
            size = (request.width, request.height)
            base = sources.image or Image.new("RGB", size, (127, 127, 127))
            strength = (request.denoising_strength or 0.75) if sources.image is not None else 1.0
            images = pass_.inpaint(sources_mod.Sources(base, Image.new("L", size, 255)), strength)
        elif sources.image is not None:
            images = pass_.img2img(sources.image, request.denoising_strength or 0.75, request.steps)
        else:
            images = pass_.txt2img_with_hires()
    return JobOutput(images=images, notes=notes)


def generate_images(model, request: GenerateRequest,
                    on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """The images of `run_job`, for callers that do not need its notes."""
    return run_job(model, request, on_step).images


class tiled:  # noqa: N801 - a context manager read as a phrase: `with tiled(pipe, on)`
    """Wrap every convolution around the image's edges, so that the output tiles seamlessly."""

    def __init__(self, pipe, enabled: bool) -> None:
        self.convs: list[torch.nn.Conv2d] = []
        if enabled:
            for name in ("unet", "vae", "controlnet"):
                module = getattr(pipe, name, None)
                if module is not None:
                    self.convs += [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    def __enter__(self) -> tiled:
        for conv in self.convs:
            conv.padding_mode = "circular"
        return self

    def __exit__(self, *exc) -> None:
        for conv in self.convs:
            conv.padding_mode = "zeros"


def own_pipeline(pipe):
    """A pipeline object of the job's own over the model's modules, with a scheduler of its own: a call keeps
    its state (timesteps, step index, guidance, interrupt flag) on them, and jobs run step by step beside
    each other must not share it."""
    from horde_worker.inference.pipelines import derived_pipeline

    return derived_pipeline(pipe, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))


class Pass:
    """Calls into the diffusers pipelines of one job, sharing its conditioning and seeds."""

    def __init__(self, model, request: GenerateRequest, prompts: list[str], negatives: list[str],
                 on_step: Callable[[int, int], None] | None) -> None:
        self.model, self.request, self.on_step = model, request, on_step
        self.pipe = own_pipeline(model.pipeline)
        self.is_flux = model.baseline == "flux_1"
        self.prompts, self.negatives = prompts, negatives
        self._conditioning: dict[str, Any] | None = None

    def generators(self) -> list[torch.Generator]:
        # CPU generators make a seed give the same noise on every device.
        return [torch.Generator("cpu").manual_seed(int(seed)) for seed in self.request.seeds]

    def conditioning(self) -> dict[str, Any]:
        if self._conditioning is None:
            if self.is_flux:
                self._conditioning = self._flux_conditioning()
            else:
                self._conditioning = encode_prompts(
                    self.pipe, self.model.baseline, self.prompts, self.negatives, self.request.clip_skip,
                    zero_empty_negative=bool(self.pipe.config.get("force_zeros_for_empty_prompt", False)))
        return self._conditioning

    def _flux_conditioning(self) -> dict[str, Any]:
        request = self.request
        prompts = [plain_text(p) for p in self.prompts]
        distilled = self.pipe.transformer.config.guidance_embeds
        extra: dict[str, Any] = {"prompt": prompts, "max_sequence_length": 512 if distilled else 256,
                                 "guidance_scale": request.cfg_scale if distilled else 0.0}
        if flux.uses_true_cfg(request):
            # A negative prompt needs true classifier-free guidance: two passes per step.
            extra.update(negative_prompt=[plain_text(n) for n in self.negatives], true_cfg_scale=request.cfg_scale)
        return extra

    def sample(self, pipeline, steps: int, denoise: float | None = None, rule: str | None = None, **kwargs):
        """Run one diffusers pipeline call with the job's sampler, conditioning and seeds, for `steps`
        sampler steps: from pure noise, or with `denoise` from the `image` (pixels or latents) in `kwargs`.
        `rule` overrides the job's schedule (see `schedules.RULES`). Returns the pipeline's output."""
        request = self.request
        from_image = denoise is not None
        scheduler, own_scheduler = None, pipeline.scheduler
        if not self.is_flux:
            scheduler = make_scheduler(request.sampler_name, request.karras, self.model.scheduler_config,
                                       request.seeds, steps, denoise, rule)
            pipeline.scheduler = scheduler
            kwargs.setdefault("guidance_scale", request.cfg_scale)
        progress = lambda evaluations: min(evaluations, steps)  # noqa: E731
        if isinstance(scheduler, KScheduler):
            pipeline_steps, progress = scheduler.pipeline_steps(from_image), scheduler.steps_done
            if from_image:
                kwargs["strength"] = IMAGE_PIPELINE_STRENGTH
            else:
                kwargs["latents"] = self.start_latents(pipeline, scheduler, kwargs["width"], kwargs["height"])
        elif self.is_flux:
            pipeline_steps, extra = flux.schedule(pipeline, steps, denoise, request.seeds, kwargs["width"],
                                                  kwargs["height"])
            kwargs.update(extra)
        else:
            # dpmsolver: a diffusers scheduler, which cuts its schedule by strength itself.
            pipeline_steps = img2img_steps(steps, denoise) if from_image else steps
            if from_image:
                kwargs["strength"] = denoise

        def step_end(pipe, step: int, _timestep, tensors: dict) -> dict:
            if getattr(pipe.scheduler, "finished", False):
                pipe._interrupt = True  # an adaptive sampler reached the end before its step budget
            if self.on_step is not None:
                self.on_step(progress(step + 1), steps)
            return tensors

        kwargs.setdefault("output_type", "np")
        try:
            return pipeline(num_inference_steps=pipeline_steps, generator=self.generators(),
                            callback_on_step_end=step_end, **self.conditioning(), **kwargs)
        finally:
            pipeline.scheduler = own_scheduler  # the model's pipeline keeps no state of this job

    def call(self, pipeline, steps: int, denoise: float | None = None, **kwargs) -> list[np.ndarray]:
        """`sample`, as 8-bit RGB images (decoded here, in the VAE's own precision: see `pipelines.vae_dtype`)."""
        latents = self.sample(pipeline, steps, denoise, output_type="latent", **kwargs).images
        if self.is_flux:
            return decode.flux_images(pipeline, latents, kwargs["width"], kwargs["height"])
        return decode.sd_images(pipeline, latents)

    def start_latents(self, pipeline, scheduler: KScheduler, width: int, height: int) -> torch.Tensor:
        """The seeds' start noise in the pipeline's latent shape and precision (the scheduler keeps its
        float32 original)."""
        unet = pipeline.unet
        scale = pipeline.vae_scale_factor
        like = torch.empty((len(self.request.seeds), unet.config.in_channels, height // scale, width // scale),
                           device=unet.device)
        return scheduler.start_noise(like).to(unet.dtype)

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """Source images as latents: the mean of the VAE's posterior, as the reference encodes them (diffusers
        would draw a sample from it)."""
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(images, height=self.request.height, width=self.request.width)
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        with torch.no_grad():
            if upcast:
                vae.to(torch.float32)
            try:
                latents = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mode()
            finally:
                if upcast:
                    vae.to(torch.float16)
        return (latents * vae.config.scaling_factor).to(self.pipe.unet.dtype)

    def txt2img(self, width: int, height: int) -> list[np.ndarray]:
        return self.call(self.pipe, self.request.steps, width=width, height=height)

    def txt2img_with_hires(self) -> list[np.ndarray]:
        request = self.request
        baseline = self.model.baseline
        if not request.hires_fix or not hires.applies(baseline, request.width, request.height):
            return self.txt2img(request.width, request.height)
        first = hires.first_pass_size(baseline, request.width, request.height)
        low = self.sample(self.pipe, request.steps, width=first[0], height=first[1], output_type="latent").images
        strength = min(1.0, max(0.01, request.hires_fix_denoising_strength or hires.DEFAULT_STRENGTH))
        steps = hires.second_pass_steps(baseline, request.width, request.height, strength, request.steps)
        upscaled = hires.upscale_latents(low, request.width, request.height, self.pipe.vae_scale_factor)
        return self.call(self.image_pipeline(), steps, strength, rule=hires.SECOND_PASS_SCHEDULE, image=upscaled,
                         width=request.width, height=request.height)

    def image_pipeline(self):
        from horde_worker.inference.pipelines import derived_pipeline

        return derived_pipeline(self.pipe, "img2img")

    def img2img(self, image: Image.Image, strength: float, steps: int) -> list[np.ndarray]:
        strength = min(1.0, max(0.01, strength))
        images = [image] * len(self.request.seeds)
        source = images if self.is_flux else self.encode(images)
        return self.call(self.image_pipeline(), steps, strength, image=source, width=self.request.width,
                         height=self.request.height)

    @property
    def inpainting_model(self) -> bool:
        unet = getattr(self.pipe, "unet", None)
        return unet is not None and unet.config.in_channels == 9

    def inpaint(self, sources: sources_mod.Sources, strength: float) -> list[np.ndarray]:
        from horde_worker.inference.pipelines import derived_pipeline

        request = self.request
        strength = min(1.0, max(0.01, strength))
        count = len(request.seeds)
        pipeline = derived_pipeline(self.pipe, "inpaint")
        return self.call(pipeline, request.steps, strength, image=[sources.image] * count,
                         mask_image=[sources.mask] * count, width=request.width, height=request.height)
