"""`python -m horde_worker.bench.fit`: peak VRAM and seconds per image on cards of the volunteers' sizes.

For SD1.5 at 512², SDXL at 1024² and Flux.1 (fp8 file) at 1024², each simulated card size (the process is
held to that share of the GPU, so a plan that does not fit really runs out of memory) gets the worker's own
plan (inference/fit.py) from the model's real module sizes; one warm image and one timed image follow, with
the peak memory allocated. RAM -> GPU switch times are measured both ways: the worker's one-copy layout
(pinned chunks) and module-by-module `.to()` from pageable memory, on the same model.

With `--full-size` (GPU) the checkpoints are full-size architectures with random weights; without it, tiny
ones (a check that the script runs, on any device).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

CARDS_GIB = (8, 12, 16, 24)
JOBS = {"stable_diffusion_1": (512, 20, 7.0), "stable_diffusion_xl": (1024, 20, 7.0), "flux_1": (1024, 4, 1.0)}


def checkpoint(folder: Path, baseline: str, full_size: bool) -> Path:
    from horde_worker.bench import fullsize
    from horde_worker.bench.models import full_sdxl_components
    from horde_worker.inference import ldm_export
    from horde_worker.inference.tiny import write_tiny_checkpoint, write_tiny_flux_checkpoint

    path = folder / f"{baseline}-{'full' if full_size else 'tiny'}.safetensors"
    if path.exists():
        return path
    if not full_size:
        return write_tiny_flux_checkpoint(path) if baseline == "flux_1" else write_tiny_checkpoint(path, baseline)
    if baseline == "stable_diffusion_1":
        return fullsize.write_full_sd15_checkpoint(path)
    if baseline == "flux_1":
        return fullsize.write_full_flux_checkpoint(path)
    ldm_export.save_sdxl_checkpoint(path, *full_sdxl_components())
    return path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def switch_times(model, device) -> dict[str, float]:
    """RAM -> device: the one-copy layout vs module by module from pageable memory."""
    import torch

    from horde_worker.inference.residency import move
    from horde_worker.inference.vram import modules_of

    figures = {"packed_to_device_s": move(model, device)}
    figures["packed_back_to_ram_s"] = move(model, "cpu")
    model.weights.clear()
    for module in modules_of(model):
        module.to("cpu")
    gc.collect()
    start = time.perf_counter()
    for module in modules_of(model):
        module.to(device)
    _sync(device)
    figures["module_by_module_to_device_s"] = time.perf_counter() - start
    for module in modules_of(model):
        module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def one_card(model, baseline: str, device, card_gib: float | None) -> dict[str, Any]:
    """The worker's plan for a card of `card_gib` (None: the whole device), then a timed image."""
    import torch

    from horde_worker.inference import fit
    from horde_worker.inference.generate import generate_images
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.residency import move
    from horde_worker.inference.vram import device_capacity, job_phases

    size, steps, cfg = JOBS[baseline]
    if device.type != "cuda":
        size //= 4
    request = GenerateRequest(job_id="b", model_name=model.name, model_path="", baseline=baseline,
                              prompt="a lighthouse at dusk", negative_prompt="", width=size, height=size,
                              steps=steps, cfg_scale=cfg, sampler_name="k_euler", karras=False, seeds=[1])
    capacity = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        card = int(card_gib * 2**30) if card_gib else total
        torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), device)
        torch.cuda.empty_cache()
        capacity = min(device_capacity(device), card - max(512 * 2**20, card // 25))
    elif card_gib:
        capacity = int(card_gib * 2**20)  # tiny models: MiB for GiB, so that the plans change
    plan = fit.plan(fit.model_parts(model.pipeline), *job_phases(baseline, size, size, 1), capacity)
    model.fit.apply(model, plan, device)
    figures: dict[str, Any] = {"card_gib": card_gib, "plan": plan.describe(), "image_size": size, "steps": steps}
    try:
        figures["ram_to_device_s"] = move(model, device)
        with torch.inference_mode():
            generate_images(model, request)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.inference_mode():
            generate_images(model, request)
        _sync(device)
        figures["image_s"] = time.perf_counter() - start
        if device.type == "cuda":
            figures["peak_vram_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError as error:
        figures["out_of_memory"] = str(error).splitlines()[0]
    finally:
        move(model, "cpu")
        model.fit.apply(model, fit.FitPlan(), device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return figures


def measure(folder: Path, device_name: str, full_size: bool, baselines: list[str], cards: list[float]) -> dict:
    import torch

    from horde_worker.inference.pipelines import load_pipeline, run_vae_in, vae_dtype

    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {}
    for baseline in baselines:
        path = checkpoint(folder, baseline, full_size)
        model = load_pipeline(path, torch.device("cpu"), dtype, name=baseline)
        run_vae_in(model.pipeline.vae, vae_dtype(device, model.pipeline.vae.dtype))
        entry: dict[str, Any] = {"switch": switch_times(model, device)}
        entry["cards"] = [one_card(model, baseline, device, card) for card in [None, *cards]]
        results[baseline] = entry
        del model
        gc.collect()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full-size", action="store_true", help="full-size architectures (GPU)")
    parser.add_argument("--baselines", default="stable_diffusion_1,stable_diffusion_xl,flux_1")
    parser.add_argument("--cards", default=",".join(map(str, CARDS_GIB)), help="card sizes in GiB to simulate")
    parser.add_argument("--cache", type=Path, help="where the checkpoints are kept (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from horde_worker.bench.report import device_header, emit
    from horde_worker.cli import detect_devices

    device = detect_devices(args.device)[0]
    folder = args.cache or Path(tempfile.mkdtemp(prefix="horde-fit-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = device_header(device, full_size=args.full_size)
    results["baselines"] = measure(folder, device, args.full_size, args.baselines.split(","),
                                   [float(c) for c in args.cards.split(",") if c])
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
