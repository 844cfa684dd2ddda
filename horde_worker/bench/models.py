"""`python -m horde_worker.bench.models`: load time, first image, switch time and peak VRAM per baseline.

Real single-file checkpoints are written (full-size SD1.5 and SDXL with random weights with
`--full-size`, tiny ones otherwise) and loaded through the worker's own residency code:
disk -> device with the first image, a second model pushing the first to RAM, and the first
coming back from RAM (the switch the horde's traffic causes most).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any


def full_sdxl_components():
    """SDXL base's architecture with random fp16 weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from horde_worker.inference.checkpoint import skip_weight_init

    with skip_weight_init():
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=0.13025)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280))
    generator = torch.Generator().manual_seed(0)
    for module in (unet, vae, clip_l, big_g):
        module.to(torch.float16)
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    return unet, vae, clip_l, big_g


def write_checkpoints(folder: Path, full_size: bool) -> dict[str, Path]:
    """baseline -> checkpoint path, created on first use."""
    from horde_worker.inference import ldm_export
    from horde_worker.inference.tiny import write_tiny_checkpoint

    paths = {}
    for baseline in ("stable_diffusion_1", "stable_diffusion_xl"):
        for copy in ("a", "b"):
            path = folder / f"{baseline}-{'full' if full_size else 'tiny'}-{copy}.safetensors"
            if not path.exists():
                if full_size and copy == "b":  # the same weights under a second name: a real second load
                    import os

                    os.link(paths[f"{baseline}-a"], path)
                elif not full_size:
                    write_tiny_checkpoint(path, baseline, seed=0 if copy == "a" else 1)
                elif baseline == "stable_diffusion_1":
                    from horde_worker.bench.fullsize import write_full_sd15_checkpoint

                    write_full_sd15_checkpoint(path)
                else:
                    ldm_export.save_sdxl_checkpoint(path, *full_sdxl_components())
            paths[f"{baseline}-{copy}"] = path
    return paths


def measure(paths: dict[str, Path], device_name: str, full_size: bool) -> dict[str, Any]:
    """Figures per baseline."""
    import torch

    from horde_worker.inference.generate import generate_images as txt2img
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.residency import Residency

    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    results: dict[str, Any] = {}
    for baseline, size in (("stable_diffusion_1", 512), ("stable_diffusion_xl", 1024)):
        if not full_size:
            size //= 4
        residency = Residency(device, dtype, ram_budget=None, device_budget=1)  # one model on the device

        def job(name: str, baseline: str = baseline, size: int = size) -> GenerateRequest:
            return GenerateRequest(job_id=name, model_name=name, model_path=str(paths[name]), baseline=baseline,
                                   prompt="a lighthouse", negative_prompt="", width=size, height=size, steps=20,
                                   cfg_scale=7.0, sampler_name="k_euler", karras=False, seeds=[1])

        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        figures: dict[str, Any] = {"image_size": size, "steps": 20}
        start = time.perf_counter()
        model, _, _ = residency.acquire(f"{baseline}-a", str(paths[f"{baseline}-a"]))
        with torch.inference_mode():
            txt2img(model, job(f"{baseline}-a"))
        sync()
        figures["disk_to_first_image_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            txt2img(model, job(f"{baseline}-a"))
        sync()
        figures["image_s"] = time.perf_counter() - start
        if on_gpu:
            figures["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        _, source_b, seconds_b = residency.acquire(f"{baseline}-b", str(paths[f"{baseline}-b"]))
        figures["second_model_from_" + source_b + "_s"] = seconds_b
        _, source_a, seconds_a = residency.acquire(f"{baseline}-a", str(paths[f"{baseline}-a"]))
        sync()
        figures["switch_back_from_" + source_a + "_s"] = seconds_a
        results[baseline] = figures
        del model, residency
        import gc

        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return results


def measure_flux(folder: Path, device_name: str) -> dict[str, Any]:
    """Full-size Flux.1 schnell (fp8 all-in-one): disk to first image, one image, peak VRAM."""
    import torch

    from horde_worker.bench.fullsize import write_full_flux_checkpoint
    from horde_worker.inference.generate import generate_images as txt2img
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.pipelines import load_pipeline

    path = folder / "flux-schnell-full.safetensors"
    if not path.exists():
        write_full_flux_checkpoint(path)
    device = torch.device(device_name)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    job = GenerateRequest(job_id="f", model_name="flux", model_path=str(path), baseline="flux_1", prompt="a cat",
                          negative_prompt="", width=1024, height=1024, steps=4, cfg_scale=1.0, sampler_name="k_euler",
                          karras=False, seeds=[1])
    start = time.perf_counter()
    model = load_pipeline(path, device, torch.float16, name="flux")
    loaded = time.perf_counter() - start
    with torch.inference_mode():
        txt2img(model, job)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        txt2img(model, job)
    torch.cuda.synchronize()
    return {"image_size": 1024, "steps": 4, "load_s": loaded, "disk_to_first_image_s": first,
            "image_s": time.perf_counter() - start, "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
            "weights_on_gpu_gib": torch.cuda.memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench.models", description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-size", action="store_true", help="full-size SD1.5 and SDXL (GPU)")
    parser.add_argument("--cache", type=Path, help="where the checkpoints are kept (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--flux", action="store_true", help="only full-size Flux.1 schnell fp8 (GPU)")
    args = parser.parse_args(argv)
    from horde_worker.bench.report import device_header, emit
    from horde_worker.cli import detect_devices

    device = detect_devices(args.device)[0]
    folder = args.cache or Path(tempfile.mkdtemp(prefix="horde-models-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.flux:
        results = device_header(device, flux_1=measure_flux(folder, device))
    else:
        paths = write_checkpoints(folder, args.full_size)
        results = device_header(device, full_size=args.full_size, baselines=measure(paths, device, args.full_size))
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
