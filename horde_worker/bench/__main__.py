"""`python -m horde_worker.bench`: the real worker on a fixed job mix, against the local horde.

Prints seconds per image, megapixelsteps per second and the share of wall time the inference
process was busy. `--compare-diffusers` times a plain diffusers pipeline of the same
architecture and weights on the same jobs, in the same run, and prints the ratio. On a CPU the
tiny demo model is used; `--full-size` builds SD1.5's full architecture with random weights
(for a GPU: it runs at the speed of the real model).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from loguru import logger

from horde_worker.bench.harness import run_plain_diffusers, run_worker
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
