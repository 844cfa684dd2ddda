"""The fixed job mix the benchmark serves."""

from __future__ import annotations

from typing import Any


def job_mix(model: str, full_size: bool) -> list[dict[str, Any]]:
    """Requests shaped like the horde's usual traffic: mostly 512-class SD1.5 images, some batches."""
    if full_size:
        shapes = [(512, 512, 20, 1), (512, 768, 25, 1), (512, 512, 30, 2), (768, 512, 20, 1), (512, 512, 20, 1),
                  (640, 640, 25, 1)]
    else:
        shapes = [(256, 256, 8, 1), (256, 384, 8, 1), (256, 256, 10, 2), (384, 256, 8, 1)]
    return [
        {"prompt": f"benchmark picture {i}, detailed ### blurry", "models": [model],
         "params": {"width": w, "height": h, "steps": steps, "n": n, "sampler_name": "k_euler_a",
                    "cfg_scale": 7.0, "karras": False}}
        for i, (w, h, steps, n) in enumerate(shapes)
    ]
