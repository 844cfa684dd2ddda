"""`python -m horde_worker.bench.zimage`: Z-Image-Turbo seconds per image and peak VRAM, worker vs plain diffusers.

The same modules serve both in one run: the worker's path (`zimage.run`: the reference's shift-3 simple
schedule, each seed's own start noise) and diffusers' `ZImagePipeline` called as its documentation shows
(9 steps, guidance 0). With `--full-size` (GPU) the architectures are the released ones (a 6B transformer,
Qwen3-4B, the Flux autoencoder) with random bf16 weights, built on the device; without it, the tiny ones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any


def full_size_pipeline(device, tokenizer_dir: Path):
    """The released architectures with random weights, built straight on `device` in bf16."""
    import torch
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from horde_worker.inference import zimage
    from horde_worker.inference.tiny_zimage import write_tiny_tokenizer

    write_tiny_tokenizer(tokenizer_dir)  # token ids only; the encoder's width is the real one
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
    for module in (transformer, text_encoder, vae):
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0, 0.02)
        module.eval()
    return ZImagePipeline(scheduler=zimage.scheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=zimage.tokenizer(tokenizer_dir), transformer=transformer)


def measure(device_name: str, full_size: bool, images: int) -> dict[str, Any]:
    import torch

    from horde_worker.inference import zimage
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.pipelines import LoadedModel, load_pipeline

    device = torch.device(device_name)
    folder = Path(tempfile.mkdtemp(prefix="horde-zimage-bench-"))
    if full_size:
        pipe = full_size_pipeline(device, folder / "tokenizer")
    else:
        from horde_worker.inference.tiny_zimage import write_tiny_zimage

        pipe = load_pipeline(write_tiny_zimage(folder / "compvis"), device, torch.float32).pipeline
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(name="z", baseline="z_image_turbo", pipeline=pipe, load_seconds=0.0,
                        scheduler_config=dict(pipe.scheduler.config))
    size = 1024 if full_size else 256
    request = GenerateRequest(job_id="b", model_name="z", model_path="", baseline="z_image_turbo",
                              prompt="a lighthouse at dusk", negative_prompt="", width=size, height=size, steps=9,
                              cfg_scale=1.0, sampler_name="k_euler", karras=False, seeds=[1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def worker() -> None:
        with torch.inference_mode():
            zimage.run(model, request)

    def plain() -> None:
        with torch.inference_mode():
            pipe(prompt="a lighthouse at dusk", height=size, width=size, num_inference_steps=9, guidance_scale=0.0,
                 generator=torch.Generator("cpu").manual_seed(1), output_type="np")

    results: dict[str, Any] = {"image_size": size, "steps": 9}
    for name, run in (("worker", worker), ("plain_diffusers", plain)):
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
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench.zimage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-size", action="store_true", help="the released architectures (GPU)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from horde_worker.bench.report import device_header, emit
    from horde_worker.cli import detect_devices

    device = detect_devices(args.device)[0]
    results = device_header(device, full_size=args.full_size)
    results["z_image_turbo"] = measure(device, args.full_size, args.images)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
