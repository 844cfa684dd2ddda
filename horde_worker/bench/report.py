"""What every benchmark ends with: the GPU's name beside its figures, the JSON printed and, with --json, saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def device_header(device: str, **fields: Any) -> dict[str, Any]:
    """The start of a benchmark's results: the device, the GPU's name on a CUDA device, and `fields`."""
    results: dict[str, Any] = {"device": device, **fields}
    if device.startswith("cuda"):
        import torch

        results["gpu"] = torch.cuda.get_device_name(device)
    return results


def emit(results: dict[str, Any], path: Path | None) -> None:
    """Print the results as JSON and, when `path` is given, write the same text there."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.write_text(text)
