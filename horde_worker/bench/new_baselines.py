"""`python -m horde_worker.bench.new_baselines`: Z-Image-Turbo, Qwen-Image and Stable Cascade seconds per image and
peak VRAM, the worker's path against plain diffusers, at the horde's usual 1024² and 9 / 20 / 20 steps.

One run builds each model once and times both paths over the same modules: the worker's (`zimage.run`,
`qwen_image.run`, `cascade_run.run`: the reference's schedules, plain CFG, each seed's own noise) and diffusers'
own pipelines called as their documentation shows (`ZImagePipeline`; `QwenImagePipeline` with true CFG;
`StableCascadePriorPipeline` then `StableCascadeDecoderPipeline`, with the worker's step split). With
`--full-size` (a GPU) the architectures are the released ones with random weights built on the device, in the
precision the worker keeps them (Qwen-Image's transformer and text encoder in fp8, widened per layer); without
it, the tiny ones from the reference's file layouts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINES = ("z_image_turbo", "qwen_image", "stable_cascade")
STEPS = {"z_image_turbo": 9, "qwen_image": 20, "stable_cascade": 20}
CFG = {"z_image_turbo": 1.0, "qwen_image": 2.5, "stable_cascade": 4.0}
PROMPT = "a lighthouse at dusk"


def _randomised(*modules):
    import torch

    for module in modules:
        with torch.no_grad():
            for param in module.parameters():
                if param.is_floating_point():
                    param.normal_(0, 0.02)
        module.eval()
    return modules


def full_size_zimage(device, folder: Path):
    """The released Z-Image-Turbo architectures (6B transformer, Qwen3-4B, the Flux autoencoder), bf16."""
    import torch
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from horde_worker.inference import zimage
    from horde_worker.inference.tiny_zimage import write_tiny_tokenizer

    write_tiny_tokenizer(folder)  # token ids only; the encoder's width is the real one
    with torch.device(device):
        transformer = ZImageTransformer2DModel().to(torch.bfloat16)
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True)).to(torch.bfloat16)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False).to(torch.bfloat16)
    _randomised(transformer, text_encoder, vae)
    return ZImagePipeline(scheduler=zimage.scheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=zimage.tokenizer(folder), transformer=transformer)


def full_size_qwen(device, folder: Path):
    """The released Qwen-Image architectures (20B transformer, Qwen2.5-VL 7B's language model, the Wan VAE), their
    linear layers in fp8 as the worker keeps the reference's files."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from horde_worker.inference import qwen_image, scaled_fp8
    from horde_worker.inference.tiny_zimage import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    with torch.device(device):
        transformer = QwenImageTransformer2DModel(num_layers=60).to(torch.bfloat16)
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, use_cache=False, bos_token_id=None,
            eos_token_id=None, pad_token_id=None, rope_parameters={
                "rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})).to(torch.bfloat16)
        vae = AutoencoderKLQwenImage().to(torch.bfloat16)
    _randomised(transformer, text_encoder, vae)
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    linear = {name: module for name, module in text_encoder.named_modules() if isinstance(module, torch.nn.Linear)}
    weights, scales = {}, {}
    for name, module in linear.items():
        weights[f"{name}.weight"], scale = scaled_fp8.quantize(module.weight.detach())
        scales[name] = float(scale)
        if module.bias is not None:
            weights[f"{name}.bias"] = module.bias.detach()
    scaled_fp8.install(text_encoder, weights, scales, torch.bfloat16)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=qwen_image.SHIFT,
                                                  use_dynamic_shifting=False),
        vae=vae, text_encoder=text_encoder, tokenizer=qwen_image.tokenizer(folder), transformer=transformer)


def full_size_cascade(device, folder: Path):
    """The released Stable Cascade architectures (stage C 3.6B, stage B 1.5B, CLIP-G, CLIP-L vision, stage A), bf16."""
    import torch
    from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from horde_worker.inference import cascade
    from horde_worker.inference.pipelines import clip_tokenizer

    with torch.device(device):
        prior = StableCascadeUNet(
            in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=2048,
            block_out_channels=[2048, 2048], num_attention_heads=[32, 32], down_num_layers_per_block=[8, 24],
            up_num_layers_per_block=[24, 8], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
            block_types_per_layer=[cascade.PRIOR_TYPES] * 2, clip_text_in_channels=1280,
            clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4, kernel_size=3,
            dropout=[0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca", "crp"],
            switch_level=[False]).to(torch.bfloat16)
        decoder = StableCascadeUNet(
            in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=1280,
            block_out_channels=[320, 640, 1280, 1280], down_num_layers_per_block=[2, 6, 28, 6],
            up_num_layers_per_block=[6, 28, 6, 2], down_blocks_repeat_mappers=[1, 1, 1, 1],
            up_blocks_repeat_mappers=[3, 3, 2, 2], num_attention_heads=[0, 0, 20, 20],
            block_types_per_layer=list(cascade.DECODER_TYPES), clip_text_pooled_in_channels=1280, clip_seq=4,
            effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, dropout=[0, 0, 0.1, 0.1],
            self_attn=True, timestep_conditioning_type=["sca"]).to(torch.bfloat16)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)).to(torch.bfloat16)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=224, hidden_act="quick_gelu", projection_dim=768)).to(torch.bfloat16)
        vqgan = PaellaVQModel(scale_factor=cascade.STAGE_A_SCALE).to(torch.bfloat16)
    _randomised(prior, decoder, text_encoder, image_encoder, vqgan)
    for unet in (prior, decoder):
        cascade.embed_timesteps_in_float32(unet)
    return cascade.pipeline_class()(prior=prior, decoder=decoder, text_encoder=text_encoder,
                                    tokenizer=clip_tokenizer(), vqgan=vqgan, scheduler=DDPMWuerstchenScheduler(),
                                    image_encoder=image_encoder)


def tiny(baseline: str, folder: Path, device):
    """The tiny model of `baseline`, from the reference's file layout through the worker's loader."""
    import torch

    from horde_worker.inference.pipelines import load_pipeline
    from horde_worker.inference.tiny_cascade import write_tiny_cascade
    from horde_worker.inference.tiny_qwen import write_tiny_qwen
    from horde_worker.inference.tiny_zimage import write_tiny_zimage

    writer = {"z_image_turbo": write_tiny_zimage, "qwen_image": write_tiny_qwen,
              "stable_cascade": write_tiny_cascade}[baseline]
    return load_pipeline(writer(folder / "compvis"), device, torch.float32).pipeline


def plain_call(baseline: str, pipe, size: int) -> Callable[[], None]:
    """Diffusers' own pipeline for `baseline`, over `pipe`'s modules, called as documented."""
    import torch

    steps, cfg = STEPS[baseline], CFG[baseline]

    def generator():
        return torch.Generator("cpu").manual_seed(1)

    if baseline == "z_image_turbo":
        return lambda: pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                            generator=generator(), output_type="np")
    if baseline == "qwen_image":
        return lambda: pipe(prompt=PROMPT, negative_prompt=" ", true_cfg_scale=cfg, height=size, width=size,
                            num_inference_steps=steps, generator=generator(), output_type="np")
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline

    from horde_worker.inference.cascade_run import stage_steps

    prior_steps, decoder_steps = stage_steps(steps)
    prior = StableCascadePriorPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, prior=pipe.prior,
                                       scheduler=DDPMWuerstchenScheduler(), image_encoder=pipe.image_encoder)
    decoder = StableCascadeDecoderPipeline(decoder=pipe.decoder, tokenizer=pipe.tokenizer,
                                           text_encoder=pipe.text_encoder, scheduler=DDPMWuerstchenScheduler(),
                                           vqgan=pipe.vqgan)
    for stage in (prior, decoder):
        stage.set_progress_bar_config(disable=True)

    def run() -> None:
        embeddings = prior(prompt=PROMPT, height=size, width=size, num_inference_steps=prior_steps,
                           guidance_scale=cfg, generator=generator()).image_embeddings
        decoder(image_embeddings=embeddings, prompt=PROMPT, num_inference_steps=decoder_steps, guidance_scale=0.0,
                generator=generator(), output_type="np")

    return run


def measure(baseline: str, device_name: str, full_size: bool, images: int) -> dict[str, Any]:
    """Seconds per image (and peak VRAM on a GPU) of the worker's path and of plain diffusers for `baseline`."""
    import importlib

    import torch

    from horde_worker.inference.generate import SPLIT_RUNNERS
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.pipelines import LoadedModel

    device = torch.device(device_name)
    folder = Path(tempfile.mkdtemp(prefix=f"horde-{baseline}-bench-"))
    if full_size:
        builder = {"z_image_turbo": full_size_zimage, "qwen_image": full_size_qwen,
                   "stable_cascade": full_size_cascade}[baseline]
        pipe = builder(device, folder / "tokenizer")
    else:
        pipe = tiny(baseline, folder, device)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(name=baseline, baseline=baseline, pipeline=pipe, load_seconds=0.0,
                        scheduler_config=dict(pipe.scheduler.config))
    size = 1024 if full_size else 256
    request = GenerateRequest(job_id="b", model_name=baseline, model_path="", baseline=baseline, prompt=PROMPT,
                              negative_prompt="", width=size, height=size, steps=STEPS[baseline],
                              cfg_scale=CFG[baseline], sampler_name="k_euler", karras=False, seeds=[1])
    runner = importlib.import_module(SPLIT_RUNNERS[baseline]).run
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def worker() -> None:
        runner(model, request)

    plain = plain_call(baseline, pipe, size)
    results: dict[str, Any] = {"image_size": size, "steps": STEPS[baseline], "cfg": CFG[baseline]}
    for name, run in (("worker", worker), ("plain_diffusers", plain)):
        with torch.inference_mode():
            run()  # warm
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(images):
                run()
            sync()
        results[f"{name}_s_per_image"] = (time.perf_counter() - start) / images
        if device.type == "cuda":
            results[f"{name}_peak_vram_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["ratio_plain_over_worker"] = results["plain_diffusers_s_per_image"] / results["worker_s_per_image"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench.new_baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-size", action="store_true", help="the released architectures (GPU)")
    parser.add_argument("--baseline", choices=[*BASELINES, "all"], default="all")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from horde_worker.bench.report import device_header, emit
    from horde_worker.cli import detect_devices

    device = detect_devices(args.device)[0]
    results = device_header(device, full_size=args.full_size)
    for baseline in BASELINES if args.baseline == "all" else (args.baseline,):
        results[baseline] = measure(baseline, device, args.full_size, args.images)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
