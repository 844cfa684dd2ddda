"""`python -m horde_worker.bench.features`: seconds per image of hires fix, LoRA and ControlNet jobs,
through the worker's job code and through plain diffusers doing the same work, in one run.

Tiny models by default (a smoke run anywhere); `--full-size` writes SD1.5 and SDXL checkpoints of
the real sizes with random weights (the same speed as real ones), for a GPU. Hires-fix jobs are
1.5x the native size (768² SD1, 1536² SDXL) at strength 0.5; the LoRA is rank 16 on every
attention projection; the ControlNet is canny (annotator included).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

JOBS = ("txt2img", "hires_fix", "lora", "controlnet")


def _source_png(size: tuple[int, int]) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), outline="black", width=8)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(folder: Path, baseline: str, full_size: bool) -> dict[str, Any]:
    """The checkpoint, a LoRA and a ControlNet fitting it."""
    import torch

    from horde_worker.bench.models import write_checkpoints
    from horde_worker.inference.pipelines import load_pipeline
    from horde_worker.inference.tiny_adapters import write_tiny_lora

    path = write_checkpoints(folder, full_size)[f"{baseline}-a"]
    model = load_pipeline(path, torch.device("cpu"), torch.float32)
    encoders = [model.pipeline.text_encoder] + ([model.pipeline.text_encoder_2] if baseline.endswith("xl") else [])
    lora = write_tiny_lora(folder / f"{baseline}-lora.safetensors", model.pipeline.unet, encoders, rank=16, seed=1,
                           scale=0.01)
    control = None
    if baseline == "stable_diffusion_1":
        from diffusers import ControlNetModel

        from horde_worker.inference import ldm_export

        control = folder / f"{baseline}-controlnet.safetensors"
        if not control.exists():
            ldm_export.save_tensors(control, ldm_export.controlnet_to_ldm(ControlNetModel.from_unet(model.pipeline.unet)))
    del model
    return {"checkpoint": path, "lora": lora, "control": control}


def hires_size(baseline: str) -> int:
    """A hires-fix job's side: one and a half times the baseline's native size."""
    return 1536 if baseline.endswith("xl") else 768


def worker_request(job: str, baseline: str, files: dict[str, Any], size: int, steps: int, seed: int):
    from horde_worker.inference.messages import AdapterFile, GenerateRequest

    big = job == "hires_fix"
    side = hires_size(baseline) if big else size
    fields: dict[str, Any] = dict(
        job_id=job, model_name=baseline, model_path=str(files["checkpoint"]), baseline=baseline, prompt="a house",
        negative_prompt="blurry", width=side, height=side, steps=steps,
        cfg_scale=7.0, sampler_name="k_euler", karras=False, seeds=[seed])
    if big:
        fields.update(hires_fix=True, hires_fix_denoising_strength=0.5)
    if job == "lora":
        fields["loras"] = [AdapterFile("bench", str(files["lora"]))]
    if job == "controlnet":
        fields.update(control_type="canny", control_model_path=str(files["control"]),
                      source_image=_source_png((size, size)))
    return GenerateRequest(**fields)


def plain_diffusers(pipe, job: str, files: dict[str, Any], size: int, steps: int, seed: int, baseline: str) -> None:
    """The same work written directly against diffusers."""
    import torch
    from diffusers import AutoPipelineForImage2Image, EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    common = dict(prompt="a house", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.0,
                  generator=torch.Generator("cpu").manual_seed(seed))
    if job == "txt2img":
        pipe(width=size, height=size, **common)
    elif job == "hires_fix":
        from horde_worker.inference.hires import first_pass_size

        side = hires_size(baseline)
        first = first_pass_size(baseline, side, side)
        low = pipe(width=first[0], height=first[1], output_type="pil", **common).images[0]
        second = AutoPipelineForImage2Image.from_pipe(pipe, torch_dtype=pipe.dtype)
        second(image=low.resize((side, side)), strength=0.5, **common)
    elif job == "lora":
        pipe.load_lora_weights(str(files["lora"]), adapter_name="bench")
        pipe(width=size, height=size, **common)
        pipe.unload_lora_weights()
    elif job == "controlnet":
        from controlnet_aux import CannyDetector
        from diffusers import StableDiffusionControlNetPipeline
        from PIL import Image

        from horde_worker.inference.control import load_controlnet
        from horde_worker.inference.pipelines import LoadedModel

        holder = LoadedModel("bench", baseline, pipe, 0.0, {})
        controlnet = load_controlnet(holder, str(files["control"]))
        source = Image.open(io.BytesIO(_source_png((size, size))))
        control_image = CannyDetector()(source, 100, 200, output_type="pil")
        StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)(
            image=control_image, width=size, height=size, **common)


def measure(baseline: str, files: dict[str, Any], device_name: str, size: int, steps: int,
            repeats: int) -> dict[str, Any]:
    import torch

    from horde_worker.inference.generate import run_job
    from horde_worker.inference.pipelines import load_pipeline

    device = torch.device(device_name)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    worker_model = load_pipeline(files["checkpoint"], device, dtype)
    plain_model = load_pipeline(files["checkpoint"], device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    figures: dict[str, Any] = {}
    for job in JOBS:
        if job == "controlnet" and files["control"] is None:
            continue
        worker_times, plain_times = [], []
        for attempt in range(repeats + 1):  # the first of each is a warm-up
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                run_job(worker_model, worker_request(job, baseline, files, size, steps, attempt))
            sync()
            worker_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.inference_mode():
                plain_diffusers(plain_model.pipeline, job, files, size, steps, attempt, baseline)
            sync()
            plain_times.append(time.perf_counter() - start)
        worker, plain = statistics.median(worker_times[1:]), statistics.median(plain_times[1:])
        figures[job] = {"worker_s_per_image": round(worker, 3), "diffusers_s_per_image": round(plain, 3),
                        "speed_ratio": round(plain / worker, 3)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="real-size SD1.5/SDXL with random weights")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--baseline", action="append", choices=["stable_diffusion_1", "stable_diffusion_xl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, help="image side (default 512 for SD1, 1024 for SDXL; 64 tiny)")
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args(argv)
    folder = args.work_dir or Path(tempfile.mkdtemp(prefix="horde-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "full_size": args.full_size, "steps": args.steps, "results": {}}
    for baseline in args.baseline or ["stable_diffusion_1"]:
        size = args.size or ((1024 if baseline.endswith("xl") else 512) if args.full_size else 64)
        files = prepare(folder, baseline, args.full_size)
        report["results"][baseline] = {"size": size, **measure(baseline, files, args.device, size, args.steps,
                                                                 args.repeats)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
