"""Sample requests the local horde is fed in `--local` mode."""

from __future__ import annotations

from typing import Any

_PROMPTS = (
    "a lighthouse at dusk, oil painting ### blurry",
    "a red fox in fresh snow, photograph",
    "a cozy reading nook with plants, watercolor ### text, watermark",
    "an old steam train crossing a stone bridge",
    "a bowl of ramen, studio lighting ### lowres",
    "a castle on a cliff above the sea, matte painting",
)


def sample_requests(count: int, model: str, width: int = 512, height: int = 512, steps: int = 20,
                    start: int = 0) -> list[dict[str, Any]]:
    """`count` /v2/generate/async bodies for `model`, one image each, the first using sample prompt `start`."""
    return [
        {
            "prompt": _PROMPTS[(start + i) % len(_PROMPTS)],
            "models": [model],
            "params": {"n": 1, "steps": steps, "width": width, "height": height,
                       "sampler_name": "k_euler_a", "cfg_scale": 7.0},
            "r2": True,
        }
        for i in range(count)
    ]
