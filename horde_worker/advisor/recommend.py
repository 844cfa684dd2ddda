"""From a measurement of this machine to the settings a volunteer should start with.

The measurement is the worker's own SD1.5 pipeline at 512², 20 steps, one image and a batch of four per
device, and the machine's memory (`advisor/measure.py`). The rules:

- speed: megapixelsteps per second of a single image (5.24 MPS an image);
- `extra_slow_worker`: on when a 512² job of 50 steps would not finish within 80 % of the horde's shortest time
  limit (150 s): such a worker's jobs would be aborted. With it the limits triple, and the horde hands the
  worker only requests whose requester allowed extra-slow workers (below 0.5 MPS/s the horde counts a worker
  as slow anyway);
- `max_power`: the largest size whose 30-step job this GPU holds (4 GiB and 1.5 GiB per 512² of image) and
  finishes within 80 % of the horde's usual time limit (30 s + 2 s per step per 512² area, at least 150 s;
  not the tripled limit of extra-slow workers, whose requesters still wait);
- `max_batch`: batches only when a batch of four made each image at least 10 % faster, as many as the card holds
  (3 GiB per image at 512² on top of the model);
- `queue_size` 2 on fast machines (3 MPS/s and more: the next job is in hand when one ends), `max_threads` 2 when such
  a machine also has 20 GiB or more; `safety_on_gpu` and `post_process_job_overlap` from 12 GiB;
- baselines by VRAM and RAM (SD1.5/SD2 everywhere, SDXL 8 GiB, Flux and Cascade 12 GiB, Z-Image 16 GiB,
  Qwen-Image 24 GiB; RAM at least their weights while loading);
- kudos per hour: the horde's reward of a 512² 20-step image (about 2.33 + 0.66 per MPS) at the measured pace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
IMAGE_MPS = 512 * 512 * 20 / 1e6
SLOW_MPS = 0.5
POWERS = (8, 16, 24, 32, 48, 64)  # max_power: pixels = power x 8 x 64 x 64
# Baseline -> (VRAM GiB, RAM GiB) it needs at least (the worker's fit plan lets a card hold less than the weights).
NEEDS = {"stable_diffusion_1": (0, 8), "stable_diffusion_2": (0, 8), "stable_diffusion_xl": (8, 16),
         "flux_1": (12, 32), "stable_cascade": (12, 24), "z_image_turbo": (16, 32), "qwen_image": (24, 48)}
LARGE = {"flux_1", "stable_cascade", "z_image_turbo", "qwen_image"}


@dataclass
class DeviceFigures:
    """One device's measurement: seconds per image of SD1.5 512² 20 steps by batch size."""

    device: str
    name: str
    vram_bytes: int | None  # None: a CPU
    seconds_per_image: dict[int, float]


@dataclass
class Measurement:
    ram_bytes: int
    devices: list[DeviceFigures]


@dataclass
class Recommendation:
    settings: dict[str, Any]
    baselines: list[str]
    megapixelsteps_per_second: float
    kudos_per_hour: float
    notes: list[str] = field(default_factory=list)


def time_limit(pixels: int, steps: int, extra_slow: bool) -> float:
    """The horde's time limit for a job of `pixels` and `steps` (shared/horde-api.md)."""
    limit = max(150.0, 30 + steps * 2 * pixels / (512 * 512))
    return limit * 3 if extra_slow else limit


def image_reward(megapixelsteps: float) -> float:
    return 2.33 + 0.66 * megapixelsteps


def recommend(measurement: Measurement) -> Recommendation:
    """The settings for this machine, from its measurement."""
    gpus = [d for d in measurement.devices if d.vram_bytes]
    devices = gpus or measurement.devices
    single = [d.seconds_per_image[1] for d in devices]
    mps = sum(IMAGE_MPS / s for s in single)  # every device works at once
    slowest = max(single)
    vram = min((d.vram_bytes or 0) for d in gpus) / GIB if gpus else 0.0
    ram = measurement.ram_bytes / GIB
    extra_slow = slowest * 50 / 20 > 0.8 * time_limit(512 * 512, 50, extra_slow=False)
    notes = []
    device_mps = IMAGE_MPS / slowest
    power = POWERS[0]
    for candidate in POWERS:
        pixels = candidate * 8 * 64 * 64
        holds = not gpus or vram >= 4 + 1.5 * pixels / (512 * 512)
        seconds = pixels * 30 / 1e6 / device_mps
        if holds and seconds <= 0.8 * time_limit(pixels, 30, extra_slow=False):
            power = candidate
    batched = {b: s for d in devices for b, s in d.seconds_per_image.items() if b > 1}
    best = min(batched, key=batched.get) if batched else 1
    gain = batched and batched[best] <= 0.9 * max(single)
    max_batch = max(1, min(8, int((vram - 4) // 3) if gpus else 1)) if gain else 1
    big = bool(gpus) and vram >= 20
    fast = device_mps >= 3.0
    baselines = [b for b, (need_vram, need_ram) in NEEDS.items()
                 if (vram >= need_vram if gpus else need_vram == 0) and ram >= need_ram]
    if extra_slow:
        notes.append(f"a 512x512 50-step job takes about {slowest * 2.5:.0f} s here, past the horde's 150 s limit: "
                     "extra_slow_worker must be on (limits tripled; only requests that allow extra-slow workers)")
    elif device_mps < SLOW_MPS:
        notes.append(f"{device_mps:.2f} MPS/s: the horde counts this worker as slow and sends it only requests that "
                     "allow slow workers")
    if not gpus:
        notes.append("no GPU found: the worker runs on the CPU, for trying it rather than serving")
    settings = {
        "max_power": power, "max_batch": max_batch, "max_threads": 2 if big and fast else 1,
        "queue_size": 2 if fast else 1, "safety_on_gpu": bool(gpus) and vram >= 12,
        "post_process_job_overlap": bool(gpus) and vram >= 12, "extra_slow_worker": extra_slow,
        "load_large_models": any(b in LARGE for b in baselines),
    }
    per_hour = sum(3600 / s for s in single) * image_reward(IMAGE_MPS)
    return Recommendation(settings, baselines, round(mps, 3), round(per_hour, 1), notes)


def report(measurement: Measurement, advice: Recommendation) -> str:
    """The advisor's answer, as printed."""
    lines = ["measured (SD1.5, 512x512, 20 steps, the worker's own pipeline):"]
    for d in measurement.devices:
        vram = f"{d.vram_bytes / GIB:.0f} GiB" if d.vram_bytes else "CPU"
        speeds = ", ".join(f"batch {b}: {s:.2f} s/image" for b, s in sorted(d.seconds_per_image.items()))
        lines.append(f"  {d.device} ({d.name}, {vram}): {speeds}")
    lines.append(f"  RAM {measurement.ram_bytes / GIB:.0f} GiB")
    lines.append("recommended settings:")
    lines += [f"  {key}: {str(value).lower() if isinstance(value, bool) else value}"
              for key, value in advice.settings.items()]
    lines.append(f"baselines that fit: {', '.join(advice.baselines)}")
    lines.append(f"expected: {advice.megapixelsteps_per_second:.2f} MPS/s, about {advice.kudos_per_hour:.0f} kudos/hour "
                 "(SD1.5 512x512 20-step jobs, kept busy)")
    lines += [f"note: {note}" for note in advice.notes]
    return "\n".join(lines)
