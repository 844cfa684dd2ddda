"""Post-processing of finished images, in the order the job lists them.

Upscalers are loaded by spandrel, which recognises the architecture (ESRGAN, Real-ESRGAN with
its pixel-unshuffle, the 6-block anime variant, ...) from the weights themselves. Large images are
upscaled in overlapping tiles, each tile's border discarded, so memory stays bounded whatever
the image size and no seam shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TILE = 512
OVERLAP = 32


class PostProcessors:
    """Loaded post-processing models of one inference process, kept while they are used."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._models: dict[str, object] = {}

    def model(self, path: str):
        if path not in self._models:
            from spandrel import ModelLoader

            descriptor = ModelLoader().load_from_file(Path(path))
            descriptor.to(self.device).eval()
            if self.dtype == torch.float16 and descriptor.supports_half:
                descriptor.half()
            self._models = {path: descriptor}  # one at a time: they are small, VRAM is not
        return self._models[path]

    def apply(self, image: np.ndarray, names_and_paths: list[tuple[str, str]]) -> np.ndarray:
        """Run each post-processor in turn on an HxWx3 uint8 image."""
        for _name, path in names_and_paths:
            image = upscale(self.model(path), image, self.device)
        return image


def upscale(descriptor, image: np.ndarray, device: torch.device, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """`image` through the upscaler, tile by tile."""
    scale = descriptor.scale
    dtype = next(descriptor.model.parameters()).dtype
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    _, _, height, width = pixels.shape
    out = torch.zeros(1, 3, height * scale, width * scale)
    step = tile - 2 * overlap
    with torch.inference_mode():
        for top in range(0, height, step):
            for left in range(0, width, step):
                # The tile with `overlap` of context on every side that has any.
                y0, x0 = max(0, top - overlap), max(0, left - overlap)
                y1, x1 = min(height, top + step + overlap), min(width, left + step + overlap)
                result = descriptor(pixels[:, :, y0:y1, x0:x1].to(device=device, dtype=dtype)).float().cpu()
                keep_y, keep_x = (top - y0) * scale, (left - x0) * scale
                h, w = (min(top + step, height) - top) * scale, (min(left + step, width) - left) * scale
                out[:, :, top * scale:top * scale + h, left * scale:left * scale + w] = \
                    result[:, :, keep_y:keep_y + h, keep_x:keep_x + w]
    return (out[0].clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().numpy())
