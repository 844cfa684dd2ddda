"""Seconds per image of each horde sampler through the worker's sampling path, against plain diffusers.

    python -m horde_worker.bench.samplers [--device cuda] [--full-size] [--steps 20] [--size 512]

Both sides run the same loaded pipeline, prompt, size, steps and cfg in the same process: the worker's
side is `inference/generate.py` (its own schedules and samplers inside the diffusers pipeline loop),
the plain side a `pipe(...)` call with the diffusers scheduler a diffusers user would pick for the name.
Each figure is the fastest of `--count` timed runs after one warm-up. The ratio is plain seconds /
worker seconds (above 1: the worker is faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from horde_worker.bench.harness import PLAIN_SCHEDULERS

DEFAULT_SAMPLERS = ("k_euler", "k_euler_a", "k_heun", "k_dpmpp_2m", "k_dpmpp_sde", "k_lms")


def fastest(run, count: int) -> float:
    run()
    best = float("inf")
    for _ in range(count):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(checkpoint: Path, device: str, samplers: list[str], steps: int, size: int, count: int) -> list[dict]:
    import diffusers
    import torch

    from horde_worker.inference.generate import generate_images
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.pipelines import load_pipeline

    torch_device = torch.device(device)
    dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
    model = load_pipeline(checkpoint, torch_device, dtype, name="bench")
    pipe = model.pipeline

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for sampler in samplers:
        request = GenerateRequest(job_id="bench", model_name="bench", model_path=str(checkpoint),
                                  baseline=model.baseline, prompt="a lighthouse at dusk", negative_prompt="blurry",
                                  width=size, height=size, steps=steps, cfg_scale=7.0, sampler_name=sampler,
                                  karras=True, seeds=[1])

        def worker(request=request) -> None:
            generate_images(model, request)
            sync()

        def plain(sampler=sampler) -> None:
            scheduler_class = getattr(diffusers, PLAIN_SCHEDULERS[sampler])
            pipe.scheduler = scheduler_class.from_config(model.scheduler_config, use_karras_sigmas=True)
            pipe(prompt="a lighthouse at dusk", negative_prompt="blurry", width=size, height=size,
                 num_inference_steps=steps, guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(1),
                 output_type="np")
            sync()

        plain_seconds = fastest(plain, count)
        worker_seconds = fastest(worker, count)
        rows.append({"sampler": sampler, "worker_s": round(worker_seconds, 3), "plain_s": round(plain_seconds, 3),
                     "ratio": round(plain_seconds / worker_seconds, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="SD1.5's real sizes, random fp16 weights")
    parser.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        if args.full_size:
            from horde_worker.bench.fullsize import write_full_sd15_checkpoint

            checkpoint = write_full_sd15_checkpoint(Path(folder) / "sd15.safetensors")
        else:
            from horde_worker.inference.tiny import write_tiny_checkpoint

            checkpoint = write_tiny_checkpoint(Path(folder) / "tiny.safetensors", "stable_diffusion_1")
        measure(checkpoint, args.device, args.samplers.split(","), args.steps, args.size, args.count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
