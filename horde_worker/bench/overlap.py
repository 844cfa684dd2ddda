"""`python -m horde_worker.bench.overlap`: how much post-processing hides behind the next job's sampling.

The inference process's own `ModelRunner` serves the same jobs (txt2img, then post-processing)
twice, in one run: with `post_process_job_overlap` off, then on. Each pass's wall time is from the
first job handed in to the last result out. Hidden share = (wall off - wall on) / post-processing
seconds of the pass without overlap: 1 would mean post-processing costs no time at all.
`--full-size` uses a full-size SD1.5 and full-size post-processors (random weights) for a GPU;
without it everything is tiny (a harness check that runs anywhere).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def run_pass(checkpoint: Path, files: dict[str, str], face_dir: str, args, overlap: bool) -> dict:
    from horde_worker.inference.messages import GenerateFailed, GenerateRequest, GenerateResult, SlotSpec
    from horde_worker.inference.runner import ModelRunner

    runner = ModelRunner(SlotSpec(slot=0, device=args.device, log_dir=tempfile.mkdtemp(), post_process_overlap=overlap))
    steps = [(name, files[name]) for name in args.post_processing.split(",")]
    results: list[GenerateResult] = []
    arrived = threading.Condition()

    def send(message) -> None:
        if isinstance(message, GenerateFailed):
            raise RuntimeError(message.reason)
        if isinstance(message, GenerateResult):
            with arrived:
                results.append(message)
                arrived.notify_all()

    def wait_for(count: int) -> None:
        with arrived:
            if not arrived.wait_for(lambda: len(results) >= count, timeout=3600):
                raise RuntimeError("the jobs did not finish")

    def request(index: int) -> GenerateRequest:
        return GenerateRequest(job_id=f"job-{index}", model_name="bench", model_path=str(checkpoint),
                               baseline="stable_diffusion_1", prompt="a portrait of a woman", negative_prompt="",
                               width=args.size, height=args.size, steps=args.steps, cfg_scale=7.0,
                               sampler_name="k_euler", karras=False, seeds=[index], post_processing=steps,
                               facefixer_strength=1.0, extra={"face_dir": face_dir})

    def serve(index: int) -> None:
        result = runner.generate(request(index), send)
        if result is not None:
            send(result)

    serve(0)  # warm-up: model load, first kernels; not timed
    wait_for(1)
    results.clear()
    started = time.perf_counter()
    for index in range(1, args.jobs + 1):
        serve(index)
    wait_for(args.jobs)
    wall = time.perf_counter() - started
    runner.close()
    return {"overlap": overlap, "jobs": args.jobs, "wall_seconds": round(wall, 3),
            "sample_seconds": round(sum(r.sample_seconds for r in results), 3),
            "postprocess_seconds": round(sum(r.postprocess_seconds for r in results), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side (512 for real figures)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--post-processing", default="RealESRGAN_x4plus,GFPGAN")
    args = parser.parse_args(argv)

    from horde_worker.bench.postprocess import write_full_size, write_tiny

    work = Path(tempfile.mkdtemp(prefix="horde-overlap-bench-"))
    if args.full_size:
        from horde_worker.bench.fullsize import write_full_sd15_checkpoint

        checkpoint = work / "sd15-full.safetensors"
        write_full_sd15_checkpoint(checkpoint)
        files = write_full_size(work / "post")
    else:
        from horde_worker.inference.tiny import write_tiny_checkpoint

        checkpoint = work / "sd15-tiny.safetensors"
        write_tiny_checkpoint(checkpoint, "stable_diffusion_1")
        files = write_tiny(work / "post")
    face_dir = str(work / "post" / "gfpgan")
    off = run_pass(checkpoint, files, face_dir, args, overlap=False)
    on = run_pass(checkpoint, files, face_dir, args, overlap=True)
    hidden = (off["wall_seconds"] - on["wall_seconds"]) / off["postprocess_seconds"] if off["postprocess_seconds"] else 0
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(json.dumps({"device": device, "size": args.size, "steps": args.steps, "post_processing": args.post_processing,
                      "without_overlap": off, "with_overlap": on,
                      "seconds_per_job": {"off": round(off["wall_seconds"] / args.jobs, 3),
                                          "on": round(on["wall_seconds"] / args.jobs, 3)},
                      "hidden_share": round(hidden, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
