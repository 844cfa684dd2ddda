"""Measuring a machine for the settings advisor: SD1.5 at 512², 20 steps, one image and a batch of four, through
the worker's own loading and generation code, on each device; and the machine's RAM.

The model is SD1.5's full-size architecture with random weights (built here, nothing is downloaded: the speed of
an architecture does not depend on its weights). On a CPU the images are 256² and the time is scaled to 512² by
pixels, so that the measurement takes minutes, not an hour. `quick` uses the tiny test model instead: a check
that the advisor runs, whose figures mean nothing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from horde_worker.advisor.recommend import DeviceFigures, Measurement

BATCHES = (1, 4)


def _device_figures(device_name: str, checkpoint: Path) -> DeviceFigures:
    import torch

    from horde_worker.inference.generate import generate_images
    from horde_worker.inference.messages import GenerateRequest
    from horde_worker.inference.pipelines import load_pipeline
    from horde_worker.inference.runner import resolve_device

    device = resolve_device(device_name)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = load_pipeline(checkpoint, device, dtype, name="advisor-sd15")
    size = 256 if device.type == "cpu" else 512
    scale = (512 * 512) / (size * size)
    seconds: dict[int, float] = {}
    for batch in BATCHES:
        request = GenerateRequest(job_id="advisor", model_name="advisor-sd15", model_path=str(checkpoint),
                                  baseline="stable_diffusion_1", prompt="a lighthouse at dusk", negative_prompt="",
                                  width=size, height=size, steps=20, cfg_scale=7.0, sampler_name="k_euler",
                                  karras=False, seeds=list(range(batch)))
        with torch.inference_mode():
            generate_images(model, request)  # warm
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            generate_images(model, request)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds[batch] = (time.perf_counter() - start) / batch * scale
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name, vram = properties.name, int(properties.total_memory)
    elif device.type == "cpu":
        name, vram = "CPU", None
    else:  # DirectML tells no memory size: taken as an 8 GiB card
        name, vram = device_name, 8 * 2**30
    return DeviceFigures(device_name, name, vram, seconds)


def measure(devices: list[str], quick: bool = False) -> Measurement:
    """Each device's figures (one after the other) and the RAM."""
    import psutil

    from horde_worker.bench.fullsize import write_full_sd15_checkpoint
    from horde_worker.inference.tiny import write_tiny_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="horde-advisor-"))
    checkpoint = folder / "sd15.safetensors"
    if quick:
        write_tiny_checkpoint(checkpoint, "stable_diffusion_1")
    else:
        write_full_sd15_checkpoint(checkpoint)
    try:
        figures = [_device_figures(device, checkpoint) for device in devices]
    finally:
        checkpoint.unlink(missing_ok=True)
    return Measurement(int(psutil.virtual_memory().total), figures)
