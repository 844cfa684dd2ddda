"""The two sides of every benchmark run: the real worker serving a job mix against the local horde, and the
same requests made by plain diffusers pipeline calls on the same weights."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any


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
