"""`python -m horde_worker.bench --stream`: a saturated stream of horde-like jobs served by the full worker
(its engine batching the jobs it holds), against the same requests made by plain diffusers calls, one
request at a time, in the same run.

The job mix is drawn from a seeded distribution shaped like the horde's traffic (sizes, steps,
samplers, karras, n), so every run serves the same jobs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

BASELINES = {"sd15": "stable_diffusion_1", "sdxl": "stable_diffusion_xl", "flux": "flux_1"}

# (width, height, weight) per baseline at full size; the CPU run divides the sides by 4.
SIZES = {
    "stable_diffusion_1": [(512, 512, 60), (512, 768, 20), (768, 512, 10), (640, 640, 10)],
    "stable_diffusion_xl": [(1024, 1024, 60), (832, 1216, 25), (1216, 832, 15)],
    "flux_1": [(1024, 1024, 60), (832, 1216, 25), (1216, 832, 15)],
}
STEPS = {"stable_diffusion_1": (20, 30), "stable_diffusion_xl": (25, 35), "flux_1": (4, 4)}
SAMPLERS = [("k_euler_a", 35), ("k_euler", 20), ("k_dpmpp_2m", 20), ("k_dpmpp_sde", 10), ("k_lms", 5),
            ("k_heun", 5), ("k_dpm_2", 5)]
COUNTS = [(1, 70), (2, 15), (4, 15)]


def _weighted(rng: random.Random, choices: list[tuple]) -> tuple:
    return rng.choices(choices, weights=[c[-1] for c in choices])[0]


def stream_mix(baseline: str, model: str, images: int, full_size: bool, seed: int = 12) -> list[dict[str, Any]]:
    """Requests adding up to at least `images` images."""
    rng = random.Random(seed)
    low, high = STEPS[baseline]
    scale = 1 if full_size else 4
    mix: list[dict[str, Any]] = []
    total = 0
    while total < images:
        width, height, _ = _weighted(rng, SIZES[baseline])
        n = _weighted(rng, COUNTS)[0]
        steps = rng.randint(low, high) if full_size else max(2, rng.randint(low, high) // 4)
        sampler = "k_euler" if baseline == "flux_1" else _weighted(rng, SAMPLERS)[0]
        params = {"width": width // scale // 64 * 64 or 64, "height": height // scale // 64 * 64 or 64,
                  "steps": steps, "n": n, "sampler_name": sampler, "karras": rng.random() < 0.6,
                  "cfg_scale": 3.5 if baseline == "flux_1" else float(rng.choice([5, 6, 7, 7.5, 8])),
                  "seed": str(rng.randrange(2**31))}
        negative = "" if baseline == "flux_1" else " ### blurry, lowres"
        mix.append({"prompt": f"stream picture {len(mix)}, {rng.choice(['a castle', 'a cat', 'a forest'])}{negative}",
                    "models": [model], "params": params})
        total += n
    return mix


def build_checkpoint(cache: Path, baseline: str, full_size: bool) -> tuple[str, Path]:
    """(model name, checkpoint) for a baseline: tiny on a CPU, the full architecture with random weights for a GPU."""
    from horde_worker.inference import tiny

    kind = "full" if full_size else "tiny"
    name = f"horde-worker-stream-{baseline}-{kind}"
    path = cache / "compvis" / f"{name}.safetensors"
    if path.exists():
        return name, path
    path.parent.mkdir(parents=True, exist_ok=True)
    if baseline == "flux_1":
        if full_size:
            from horde_worker.bench.fullsize import write_full_flux_checkpoint

            write_full_flux_checkpoint(path)
        else:
            tiny.write_tiny_flux_checkpoint(path, fp8=False)
    elif not full_size:
        tiny.write_tiny_checkpoint(path, baseline)
    elif baseline == "stable_diffusion_1":
        from horde_worker.bench.fullsize import write_full_sd15_checkpoint

        write_full_sd15_checkpoint(path)
    else:
        from horde_worker.bench.models import full_sdxl_components
        from horde_worker.inference import ldm_export

        ldm_export.save_sdxl_checkpoint(path, *full_sdxl_components())
    return name, path


def measure(baseline: str, device: str, images: int, full_size: bool, max_threads: int, work: Path,
            compile_denoisers: str) -> dict[str, Any]:
    """One baseline's stream: worker figures, plain diffusers figures, their ratio."""
    from horde_worker.bench.harness import run_plain_diffusers, run_worker

    model, checkpoint = build_checkpoint(work / "cache", baseline, full_size)
    mix = stream_mix(baseline, model, images, full_size)
    started = time.perf_counter()
    worker = run_worker(model, checkpoint, device, mix, work / baseline, baseline=baseline, max_threads=max_threads,
                        queue_size=max_threads, compile_denoisers=compile_denoisers)
    worker["run_seconds"] = time.perf_counter() - started
    plain = run_plain_diffusers(checkpoint, device, mix)
    figures = {"baseline": baseline, "model": model, "requests": len(mix),
               "images": sum(b["params"]["n"] for b in mix), "worker": worker, "plain_diffusers": plain,
               "speed_ratio_worker_vs_diffusers": plain["seconds_per_image"] / worker["seconds_per_image"]}
    if baseline == "flux_1" and fp8_available(device):
        fp8_worker = run_worker(model, checkpoint, device, mix, work / f"{baseline}-fp8", baseline=baseline,
                                max_threads=max_threads, queue_size=max_threads,
                                compile_denoisers=compile_denoisers, fp8_matmuls=True)
        figures["worker_fp8_matmuls"] = fp8_worker
        figures["speed_ratio_fp8_worker_vs_diffusers"] = plain["seconds_per_image"] / fp8_worker["seconds_per_image"]
        figures["fp8_latent_relative_error"] = fp8_latent_error(checkpoint, device, mix[0]["params"])
    return figures


def fp8_available(device: str) -> bool:
    import torch

    from horde_worker.inference import fp8

    return device.startswith("cuda") and fp8.supported(torch.device(device))


def fp8_latent_error(checkpoint: Path, device: str, params: dict[str, Any]) -> float:
    """Relative error of one job's final latent with fp8 matmuls against the widened (bf16) layers, same
    weights, same seed."""
    import torch

    from horde_worker.inference import fp8
    from horde_worker.inference.generate import Pass
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.residency import Residency

    request = GenerateRequest(job_id="fp8-check", model_name="fp8-check", model_path=str(checkpoint),
                              baseline="flux_1", prompt="a lighthouse at dawn", negative_prompt="",
                              width=params["width"], height=params["height"], steps=params["steps"],
                              cfg_scale=params["cfg_scale"], sampler_name="k_euler", karras=False, seeds=[7])
    latents = []
    for narrow in (False, True):
        residency = Residency(torch.device(device), torch.float16, None, None, fp8_matmuls=narrow)
        with residency.using(request.model_name, request.model_path) as (model, _source, _seconds), \
                torch.inference_mode():
            pass_ = Pass(model, request, [request.prompt], [""], None)
            latents.append(pass_.sample(pass_.pipe, request.steps, width=request.width, height=request.height,
                                        output_type="latent").images.float().cpu())
        del residency
        torch.cuda.empty_cache()
    return fp8.output_error(latents[0], latents[1])


def report(figures: dict[str, Any]) -> str:
    """One line per baseline."""
    w, d = figures["worker"], figures["plain_diffusers"]
    vram = f", peak VRAM {w['peak_vram_gib']:.1f} GiB" if w.get("peak_vram_gib") else ""
    return (f"{figures['baseline']}: worker {w['seconds_per_image']:.3f} s/image, plain diffusers "
            f"{d['seconds_per_image']:.3f} s/image, ratio {figures['speed_ratio_worker_vs_diffusers']:.2f}x; "
            f"engine busy {w['inference_busy_share'] * 100:.0f}%{vram}; {w['compiled_shapes']:.0f} shapes compiled "
            f"in {w['compile_seconds']:.1f}s beside the jobs ({figures['images']} images, {figures['requests']} requests)"
            + (f"; fp8 matmuls {figures['worker_fp8_matmuls']['seconds_per_image']:.3f} s/image "
               f"(ratio {figures['speed_ratio_fp8_worker_vs_diffusers']:.2f}x, latent error "
               f"{figures['fp8_latent_relative_error']:.4f})" if "worker_fp8_matmuls" in figures else ""))
