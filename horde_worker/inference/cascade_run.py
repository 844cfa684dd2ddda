"""A Stable Cascade job: stage C (prior) then stage B (decoder) then stage A, as the reference runs them.

The model is eps-predicting on a cosine noise schedule (s = 0.008, a 10000-level table); stage C's schedule
is shifted by 2 (its log-SNR lowered by 2·ln 2), stage B's not. The UNets are told the timestep of a level on
the unshifted cosine. Both stages run the job's sampler (`ksamplers.py`) on the reference's schedule ("normal",
or Karras' ramp for `karras: true`): stage C
`round(0.67 × steps)` steps with the job's cfg, stage B `round(0.33 × steps)` steps without guidance, its
pooled text zeroed and stage C's result as its image conditioning. A remix job conditions stage C on the CLIP
image embeddings of its source (strength 1) and of each extra source image (its own strength).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from horde_worker.inference import cascade, ksamplers
from horde_worker.inference.schedules import ModelSigmas, karras_sigmas, start_noise_scale

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _alphas_cumprod(t: torch.Tensor, shift: float) -> torch.Tensor:
    start = math.cos(cascade.COSINE_S / (1 + cascade.COSINE_S) * math.pi / 2) ** 2
    alpha = torch.cos((t + cascade.COSINE_S) / (1 + cascade.COSINE_S) * math.pi / 2) ** 2 / start
    if shift != 1.0:
        log_snr = (alpha / (1 - alpha)).log() + 2 * math.log(1 / shift)
        alpha = log_snr.sigmoid()
    return alpha.clamp(1e-4, 0.9999)


def sigma_at(t: float, shift: float) -> float:
    """A stage's noise level at timestep `t` in (0, 1]."""
    alpha = float(_alphas_cumprod(torch.tensor(float(t), dtype=torch.float64), shift))
    return math.sqrt((1 - alpha) / alpha)


def schedule(shift: float, steps: int, karras: bool, drop_penultimate: bool = False) -> tuple[ModelSigmas, list[float]]:
    """(the stage's levels, the sigmas a job runs): "normal" spaces the timesteps evenly between those of the
    table's ends, "karras" (`karras: true`) ramps between the ends; then 0. The dpm_2 samplers build one sigma
    more and drop the next-to-last (as for every baseline)."""
    if drop_penultimate:
        table, sigmas = schedule(shift, steps + 1, karras)
        return table, sigmas[:-2] + sigmas[-1:]
    table = model_sigmas(shift)
    if karras:
        return table, karras_sigmas(table.sigma_min, table.sigma_max, steps)
    timesteps = torch.linspace(timestep_ratio(table.sigma_max), timestep_ratio(table.sigma_min), steps)
    return table, [sigma_at(float(t), shift) for t in timesteps] + [0.0]


def model_sigmas(shift: float) -> ModelSigmas:
    """The noise levels of a Cascade stage, lowest first: timesteps (i + 1) / 10000."""
    t = (torch.arange(cascade.TABLE, dtype=torch.float64) + 1) / cascade.TABLE
    alpha = _alphas_cumprod(t, shift)
    sigmas = ((1 - alpha) / alpha) ** 0.5
    return ModelSigmas(sigmas=sigmas.float(), log_sigmas=sigmas.log().float())


def timestep_ratio(sigma: float) -> float:
    """The timestep (in [0, 1]) a stage is told for noise level `sigma`: the unshifted cosine, inverted."""
    start = math.cos(cascade.COSINE_S / (1 + cascade.COSINE_S) * math.pi / 2) ** 2
    alpha = min(1.0, max(0.0, 1 / (sigma * sigma + 1)))
    return math.acos(math.sqrt(alpha * start)) / (math.pi / 2) * (1 + cascade.COSINE_S) - cascade.COSINE_S


def stage_steps(steps: int) -> tuple[int, int]:
    """(stage C steps, stage B steps) of a job of `steps` steps."""
    return max(1, round(steps * cascade.PRIOR_SHARE)), max(1, round(steps * (1 - cascade.PRIOR_SHARE)))


def sample(denoise: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas: list[float],
           algorithm: str, seeds: list[int], on_eval: Callable[[], None]) -> torch.Tensor:
    """Run `algorithm` from `x` (float32, already at sigmas[0]) over `sigmas`."""
    from horde_worker.inference import noise

    if algorithm == "dpmpp_sde":
        low, high = ksamplers.positive_range(sigmas)
        source = noise.brownian_noise(seeds, x, low, high)
    else:
        source = noise.ancestral_noise(seeds, x)
    sampler = ksamplers.ALGORITHMS[algorithm](x, sigmas, source)
    try:
        point, sigma = next(sampler)
        while True:
            denoised = denoise(point, sigma)
            on_eval()
            point, sigma = sampler.send(denoised)
    except StopIteration as finished:
        return finished.value


def _text(pipe, text: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(last layer's hidden states, projected pooled embedding) of a prompt, 77 tokens padded with the end token."""
    tokens = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    output = pipe.text_encoder(input_ids=tokens.input_ids.to(device), output_hidden_states=True)
    return output.hidden_states[-1].to(dtype), output.text_embeds[:, None].to(dtype)


def _image_embeds(pipe, images: list[tuple[object, float]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, images, dim) CLIP image embeddings, each times its strength (centre-cropped as CLIP was trained)."""
    from PIL import Image

    encoder = pipe.image_encoder
    size = encoder.config.image_size
    rows = []
    for image, strength in images:
        scale = size / min(image.size)
        resized = image.convert("RGB").resize((max(size, round(image.width * scale)),
                                               max(size, round(image.height * scale))), Image.Resampling.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        pixels = (pixels - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, dtype)
        rows.append(encoder(pixel_values=tensor).image_embeds * float(strength))
    return torch.cat(rows)[None].to(dtype)


def _remix_images(request) -> list[tuple[object, float]]:
    from horde_worker.inference.sources import decode

    images = [(decode(request.source_image), 1.0)]
    return images + [(decode(data), strength) for data, strength in request.extra_images]


def run(model, request, on_step=None) -> list[np.ndarray]:
    """The job's images, one per seed: txt2img, or remix of its source images."""
    from horde_worker.inference.conditioning import plain_text
    from horde_worker.inference.decode import to_uint8
    from horde_worker.inference.generate import UnsupportedJob, UnsupportedSampler
    from horde_worker.inference.noise import start_noise
    from horde_worker.inference.samplers import SAMPLERS

    if request.control_type:
        raise UnsupportedJob("ControlNet is not available for Stable Cascade models")
    if request.tiling:
        raise UnsupportedJob("tiling is not available for Stable Cascade models")
    if request.source_image is not None and request.source_processing != "remix":
        raise UnsupportedJob(f"{request.source_processing} is not available for Stable Cascade models (remix is)")
    spec = SAMPLERS.get(request.sampler_name)
    if spec is None or spec.algorithm is None or spec.algorithm in ksamplers.ADAPTIVE:
        raise UnsupportedSampler(f"sampler {request.sampler_name!r} is not available for Stable Cascade models")
    pipe = model.pipeline
    prior, decoder = pipe.prior, pipe.decoder
    device, dtype = prior.clf[1].weight.device, prior.dtype
    count, seeds = len(request.seeds), list(request.seeds)
    prior_steps, decoder_steps = stage_steps(request.steps)
    done, total = [0], prior_steps + decoder_steps
    points = {"prior": 0, "decoder": 0}

    def ticker(stage: str, steps: int, evaluations: int) -> Callable[[], None]:
        def tick() -> None:
            points[stage] += 1
            done[0] = (0 if stage == "prior" else prior_steps) + min(steps, points[stage] * steps // evaluations)
            if on_step is not None:
                on_step(done[0], total)
        return tick

    with torch.inference_mode():
        text, pooled = _text(pipe, plain_text(request.prompt), device, dtype)
        negative_text, negative_pooled = _text(pipe, plain_text(request.negative_prompt or ""), device, dtype)
        empty_image = torch.zeros(1, 1, prior.config.clip_image_in_channels, device=device, dtype=dtype)
        if request.source_image is not None:
            if pipe.image_encoder is None:
                raise UnsupportedJob("this Stable Cascade file has no CLIP image encoder for remix")
            image = _image_embeds(pipe, _remix_images(request), device, dtype)
        else:
            image = empty_image
        guided = request.cfg_scale > 1

        def prior_eps(inputs: torch.Tensor, ratio: torch.Tensor, conditions: list[tuple]) -> list[torch.Tensor]:
            """The prior's eps for each (text, pooled, image) condition, in one batch when their shapes allow."""
            if len({tuple(c[2].shape) for c in conditions}) > 1:  # remix images vs none: separate passes
                return [prior_eps(inputs, ratio, [c])[0] for c in conditions]
            merged = [torch.cat([c[i].expand(count, -1, -1) for c in conditions]) for i in range(3)]
            rows = len(conditions)
            eps = prior(inputs.repeat(rows, 1, 1, 1), ratio.repeat(rows), clip_text=merged[0],
                        clip_text_pooled=merged[1], clip_img=merged[2], return_dict=False)[0].float()
            return list(eps.chunk(rows))

        def prior_denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            inputs = (x / math.sqrt(sigma * sigma + 1)).to(dtype)
            ratio = torch.full((count,), timestep_ratio(sigma), device=device)  # float32 (see cascade.py)
            conditions = [(text, pooled, image)] + ([(negative_text, negative_pooled, empty_image)] if guided else [])
            eps = prior_eps(inputs, ratio, conditions)
            if guided:
                eps[0] = eps[1] + request.cfg_scale * (eps[0] - eps[1])
            return x - sigma * eps[0]

        shape = (count, prior.config.in_channels, request.height // cascade.COMPRESSION,
                 request.width // cascade.COMPRESSION)
        table, sigmas = schedule(cascade.PRIOR_SHIFT, prior_steps, request.karras, spec.drop_penultimate)
        x = start_noise(seeds, shape).to(device) * start_noise_scale(table, sigmas)
        evaluations = len(ksamplers.evaluation_sigmas(spec.algorithm, sigmas))
        prior_latent = sample(prior_denoise, x, sigmas, spec.algorithm, seeds,
                              ticker("prior", prior_steps, evaluations))

        zero_pooled = torch.zeros(count, 1, decoder.config.clip_text_pooled_in_channels, device=device, dtype=dtype)
        effnet = prior_latent.to(dtype)

        def decoder_denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            inputs = (x / math.sqrt(sigma * sigma + 1)).to(dtype)
            ratio = torch.full((count,), timestep_ratio(sigma), device=device)
            eps = decoder(inputs, ratio, clip_text_pooled=zero_pooled, effnet=effnet, return_dict=False)[0].float()
            return x - sigma * eps

        shape = (count, decoder.config.in_channels, request.height // cascade.STAGE_B_COMPRESSION,
                 request.width // cascade.STAGE_B_COMPRESSION)
        table, sigmas = schedule(1.0, decoder_steps, request.karras, spec.drop_penultimate)
        x = start_noise(seeds, shape).to(device) * start_noise_scale(table, sigmas)
        evaluations = len(ksamplers.evaluation_sigmas(spec.algorithm, sigmas))
        latent = sample(decoder_denoise, x, sigmas, spec.algorithm, seeds, ticker("decoder", decoder_steps, evaluations))
        vqgan = pipe.vqgan
        images = vqgan.decode((latent * vqgan.config.scale_factor).to(vqgan.dtype)).sample.float().clamp(0, 1)
        return to_uint8(images.permute(0, 2, 3, 1).cpu().numpy())
