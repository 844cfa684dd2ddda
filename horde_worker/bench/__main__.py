"""`python -m horde_worker.bench`: the real worker on a fixed job mix, against the local horde.

Prints seconds per image, megapixelsteps per second and the share of wall time the inference
process was busy. `--compare-diffusers` times a plain diffusers pipeline of the same
architecture and weights on the same jobs, in the same run, and prints the ratio. On a CPU the
tiny demo model is used; `--full-size` builds SD1.5's full architecture with random weights
(for a GPU: it runs at the speed of the real model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

from horde_worker.bench.mix import job_mix

FULL_SIZE_MODEL = "horde-worker-bench-sd15-full"


def build_model(cache: Path, full_size: bool) -> tuple[str, Path]:
    """The benchmark model's (name, checkpoint), written to the cache on first use."""
    from horde_worker.inference.tiny import DEMO_MODEL_NAME, ensure_demo_model

    if not full_size:
        return DEMO_MODEL_NAME, ensure_demo_model(cache)
    path = cache / "compvis" / f"{FULL_SIZE_MODEL}.safetensors"
    if not path.exists():
        from horde_worker.bench.fullsize import write_full_sd15_checkpoint

        write_full_sd15_checkpoint(path)
    return FULL_SIZE_MODEL, path


def run_worker(model: str, checkpoint: Path, device: str, mix: list[dict[str, Any]], work_dir: Path,
               baseline: str = "stable_diffusion_1", max_threads: int = 1, queue_size: int = 1,
               compile_denoisers: str = "off", fp8_matmuls: bool = False) -> dict[str, Any]:
    """Serve the job mix with the real supervisor and inference process; return the figures."""
    from horde_worker.config.bridge_data import BridgeData
    from horde_worker.horde.client import HordeClient, RetryPolicy
    from horde_worker.inference.messages import SlotSpec
    from horde_worker.localhorde import LocalHorde
    from horde_worker.models.catalog import ModelCatalog, ServedModel
    from horde_worker.safety.tiny import write_tiny_clip
    from horde_worker.supervisor.loop import Supervisor
    from horde_worker.supervisor.safety_client import SafetyClient
    from horde_worker.supervisor.stats import SessionStats

    horde = LocalHorde([model]).start()
    try:
        # Warm-up: load the model and run one job before the clock starts.
        warm = dict(mix[0])
        warm["params"] = {**warm["params"], "n": 1}
        for body in [warm]:
            horde.state.add_request(body)
        settings = BridgeData(horde_url=horde.url, api_key=horde.api_key, dreamer_name="bench-worker",
                              max_batch=4, queue_size=queue_size, max_power=64, models_to_load=[model],
                              max_threads=max_threads)
        client = HordeClient(horde.url, horde.api_key, retry=RetryPolicy(attempts=5, base_delay=0.1))
        catalog = ModelCatalog([ServedModel(model, checkpoint, baseline)])
        specs = [SlotSpec(slot=0, device=device, log_dir=str(work_dir / "logs"), max_jobs=max_threads,
                          compile_denoisers=compile_denoisers, cache_home=str(work_dir / "cache"),
                          flux_fp8_matmuls=fp8_matmuls)]
        # Every image is safety-checked, as in service; a tiny CLIP keeps this benchmark about generation.
        safety = SafetyClient(write_tiny_clip(work_dir / "clip" / "bench-clip.safetensors", ["landscape"]), "cpu",
                              str(work_dir / "logs"))
        safety.start()
        supervisor = Supervisor(settings, client, catalog, specs, work_dir / "journal", pop_interval=0.05,
                                safety=safety)
        timings: dict[str, Any] = {}

        async def serve() -> None:
            task = asyncio.get_running_loop().create_task(supervisor.run())
            while supervisor.stats.images < 1:
                await asyncio.sleep(0.05)
            warm_engine = dict(supervisor.stats.engines.get(0, {}))
            timings["warm_engine"] = warm_engine
            supervisor.stats = SessionStats()  # measure from here
            started = time.time()
            for body in mix:
                horde.state.add_request(body)
            supervisor.stop_condition = horde.state.all_done
            await task
            # From the first request to the last image acknowledged (the slot's shutdown is not work).
            timings["wall"] = (supervisor.stats.last_done_at or time.time()) - started

        asyncio.run(serve())
        safety.stop()
    finally:
        horde.stop()
    stats = supervisor.stats
    images = sum(b["params"].get("n", 1) for b in mix)
    engine = stats.engines.get(0, {})
    warm = timings.get("warm_engine", {})
    busy = engine.get("busy_seconds", 0.0) - warm.get("busy_seconds", 0.0)
    return {
        "images": stats.images, "expected_images": images, "wall_seconds": timings["wall"],
        "seconds_per_image": timings["wall"] / max(1, stats.images),
        "megapixelsteps_per_second": stats.megapixelsteps / timings["wall"],
        # The share of wall time the engine was working (every job of it, not one job's latency).
        "inference_busy_share": busy / timings["wall"] if engine else stats.inference_seconds / timings["wall"],
        "kudos": stats.kudos,
        "peak_vram_gib": engine["peak_device_bytes"] / 2**30 if "peak_device_bytes" in engine else None,
        "compiled_shapes": engine.get("compiled_shapes", 0.0),
        "compile_seconds": engine.get("compile_seconds", 0.0),
    }


# The diffusers scheduler a plain diffusers user would pick for a horde sampler name.
PLAIN_SCHEDULERS = {"k_euler": "EulerDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
                    "k_heun": "HeunDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
                    "k_dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
                    "k_dpmpp_2m": "DPMSolverMultistepScheduler", "k_dpmpp_sde": "DPMSolverSDEScheduler"}


def run_plain_diffusers(checkpoint: Path, device: str, mix: list[dict[str, Any]]) -> dict[str, Any]:
    """The same jobs through plain diffusers pipeline calls (SD, SDXL or Flux), one request after the other."""
    import diffusers
    import torch

    from horde_worker.inference.pipelines import load_pipeline

    torch_device = torch.device(device)
    dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
    saved = os.environ.get("HORDE_WORKER_SPEEDUPS")
    os.environ["HORDE_WORKER_SPEEDUPS"] = "none"  # plain diffusers, as it comes
    try:
        loaded = load_pipeline(checkpoint, torch_device, dtype)
    finally:
        if saved is None:
            os.environ.pop("HORDE_WORKER_SPEEDUPS")
        else:
            os.environ["HORDE_WORKER_SPEEDUPS"] = saved
    pipe = loaded.pipeline

    def run(body: dict[str, Any]) -> None:
        p = body["params"]
        prompt, _, negative = body["prompt"].partition("###")
        if loaded.baseline == "flux_1":
            distilled = bool(pipe.transformer.config.guidance_embeds)
            pipe(prompt=prompt, width=p["width"], height=p["height"], num_inference_steps=p["steps"],
                 guidance_scale=p.get("cfg_scale", 3.5) if distilled else 0.0, num_images_per_prompt=p.get("n", 1),
                 generator=torch.Generator("cpu").manual_seed(1), output_type="pil")
            return
        scheduler_class = getattr(diffusers, PLAIN_SCHEDULERS.get(p.get("sampler_name", "k_euler_a"),
                                                                  "EulerAncestralDiscreteScheduler"))
        pipe.scheduler = scheduler_class.from_config(loaded.scheduler_config,
                                                     use_karras_sigmas=bool(p.get("karras", True)))
        generator = torch.Generator("cpu").manual_seed(1)
        pipe(prompt=prompt, negative_prompt=negative or None, width=p["width"], height=p["height"],
             num_inference_steps=p["steps"], guidance_scale=p.get("cfg_scale", 7.0),
             num_images_per_prompt=p.get("n", 1), generator=generator, output_type="pil")

    run(mix[0])
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(torch_device)
    started = time.perf_counter()
    for body in mix:
        run(body)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    images = sum(b["params"].get("n", 1) for b in mix)
    mps = sum(b["params"]["width"] * b["params"]["height"] * b["params"]["steps"] * b["params"].get("n", 1)
              for b in mix) / 1e6
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch_device.type == "cuda" else None
    return {"images": images, "wall_seconds": wall, "seconds_per_image": wall / images,
            "megapixelsteps_per_second": mps / wall, "peak_vram_gib": peak}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures (and write them as JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--full-size", action="store_true", help="full-size SD1.5 with random weights (GPU)")
    parser.add_argument("--compare-diffusers", action="store_true", help="also time plain diffusers; print ratio")
    parser.add_argument("--repeat", type=int, default=1, help="serve the job mix this many times")
    parser.add_argument("--cache", type=Path, help="where the benchmark model is kept (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--speedups", default=os.environ.get("HORDE_WORKER_SPEEDUPS", "none"),
                        help="the worker's GPU speed-ups: none (default), all, or a list of channels_last,fuse_qkv")
    parser.add_argument("--stream", action="store_true",
                        help="a saturated stream of horde-like jobs per baseline, worker vs plain diffusers")
    parser.add_argument("--baselines", default="", help="with --stream: sd15,sdxl,flux (default: all on a GPU, "
                                                         "sd15 on a CPU)")
    parser.add_argument("--images", type=int, default=0, help="with --stream: images per baseline "
                                                              "(default on a GPU: SD1.5 160, SDXL 48, Flux 32)")
    parser.add_argument("--max-threads", type=int, default=8, help="with --stream: jobs the engine holds at once")
    parser.add_argument("--compile", default="auto", help="with --stream: the worker's compile_denoisers")
    args = parser.parse_args(argv)
    os.environ["HORDE_WORKER_SPEEDUPS"] = args.speedups
    logger.remove()
    logger.add(lambda m: print(m, end=""), level=os.environ.get("HORDE_BENCH_LOG", "WARNING"))

    from horde_worker.cli import detect_devices

    device = detect_devices(args.device)[0]
    work = Path(tempfile.mkdtemp(prefix="horde-bench-"))
    if args.stream:
        return stream_main(args, device, work)
    cache = args.cache or work / "cache"
    model, checkpoint = build_model(cache, args.full_size)
    mix = job_mix(model, full_size=args.full_size) * max(1, args.repeat)
    results: dict[str, Any] = {"device": device, "model": model, "jobs": len(mix), "speedups": args.speedups}
    if device.startswith("cuda"):
        import subprocess
        import sys

        name = subprocess.run([sys.executable, "-c", f"import torch; print(torch.cuda.get_device_name({device!r}))"],
                              capture_output=True, text=True).stdout.strip()
        results["gpu"] = name
    if args.compare_diffusers:  # timed before and after the worker; the faster run counts
        before = run_plain_diffusers(checkpoint, device, mix)
    results["worker"] = run_worker(model, checkpoint, device, mix, work)
    if args.compare_diffusers:
        after = run_plain_diffusers(checkpoint, device, mix)
        results["plain_diffusers"] = min(before, after, key=lambda r: r["seconds_per_image"])
        results["plain_diffusers"]["runs_seconds_per_image"] = [before["seconds_per_image"],
                                                                 after["seconds_per_image"]]
        results["speed_ratio_worker_vs_diffusers"] = (
            results["plain_diffusers"]["seconds_per_image"] / results["worker"]["seconds_per_image"])
    print(json.dumps(results, indent=2))
    w = results["worker"]
    print(f"worker: {w['seconds_per_image']:.3f} s/image, {w['megapixelsteps_per_second']:.2f} MPS/s, "
          f"inference busy {w['inference_busy_share'] * 100:.0f}% of wall time ({w['images']} images)")
    if args.compare_diffusers:
        d = results["plain_diffusers"]
        print(f"plain diffusers: {d['seconds_per_image']:.3f} s/image; worker speed / diffusers speed = "
              f"{results['speed_ratio_worker_vs_diffusers']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if w["images"] == w["expected_images"] else 1


def stream_main(args, device: str, work: Path) -> int:
    """`--stream`: one saturated stream per baseline; prints a line each and the JSON."""
    from horde_worker.bench import stream

    on_gpu = device.startswith("cuda")
    names = [n for n in (args.baselines or ("sd15,sdxl,flux" if on_gpu else "sd15")).split(",") if n]
    # Sized so that one baseline's run (worker and plain diffusers) fits a few minutes of an H100.
    default_images = {"sd15": 160, "sdxl": 48, "flux": 32} if on_gpu else {"sd15": 24, "sdxl": 16, "flux": 16}
    if args.cache:
        (work / "cache").symlink_to(args.cache.resolve(), target_is_directory=True)
    results: dict[str, Any] = {"device": device, "full_size": args.full_size or on_gpu, "max_threads": args.max_threads}
    for name in names:
        figures = stream.measure(stream.BASELINES[name], device, args.images or default_images[name],
                                 args.full_size or on_gpu, args.max_threads, work, args.compile)
        results[name] = figures
        print(stream.report(figures), flush=True)
    import json as json_module

    print(json_module.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json_module.dumps(results, indent=2))
    return 0 if all(results[n]["worker"]["images"] == results[n]["worker"]["expected_images"] for n in names) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
