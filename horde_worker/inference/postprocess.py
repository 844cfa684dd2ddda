"""Post-processing of finished images, in the order the job lists them.

Upscalers are loaded by spandrel, which recognises the architecture (ESRGAN, Real-ESRGAN with
its pixel-unshuffle, the 6-block anime variant, SPAN, RealPLKSR, DAT, ...) from the weights
themselves. Large images are upscaled in overlapping tiles, each tile's border discarded, so
memory stays bounded whatever the image size and no seam shows. Face fixers (`facefix.py`) and
background removal (`background.py`) take the same place in the chain; a step whose weights this
worker does not have is skipped and the image says so in gen_metadata.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from horde_worker.models.postprocessors import kind_of

TILE = 512
OVERLAP = 32
Note = tuple[str, str, str]


class PostProcessors:
    """Loaded post-processing models of one inference process, kept while they are used."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._models: dict[str, object] = {}
        self._face_fixer = None
        self._background = None
        self._in_use = threading.Lock()

    def device_bytes(self) -> int:
        """Bytes of the post-processing models held on the device (the background remover runs on the CPU)."""
        from horde_worker.inference.vram import tensors_bytes

        modules = [d.model for d in self._models.values()]
        if self._face_fixer is not None:
            modules += [d.model for d in self._face_fixer._restorers.values()]
            helper = self._face_fixer.helper
            modules += [m for m in (getattr(helper, "face_det", None), getattr(helper, "face_parse", None))
                        if isinstance(m, torch.nn.Module)]
        return tensors_bytes(modules) if self.device.type != "cpu" else 0

    def release(self) -> bool:
        """Drop every model (loaded again when next needed); False, and nothing dropped, while one is in use."""
        if not self._in_use.acquire(blocking=False):
            return False
        try:
            self._models, self._face_fixer = {}, None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return True
        finally:
            self._in_use.release()

    def model(self, path: str):
        if path not in self._models:
            from spandrel import ModelLoader

            descriptor = ModelLoader().load_from_file(Path(path))
            descriptor.to(self.device).eval()
            if self.dtype == torch.float16 and descriptor.supports_half:
                descriptor.half()
            self._models = {path: descriptor}  # one at a time: they are small, VRAM is not
        return self._models[path]

    def face_fixer(self, face_dir: str):
        if self._face_fixer is None:
            from horde_worker.inference.facefix import FaceFixer

            self._face_fixer = FaceFixer(face_dir, self.device)
        return self._face_fixer

    def apply(self, image: np.ndarray, steps: list[tuple[str, str]], facefixer_strength: float | None = None,
              face_dir: str = "") -> tuple[np.ndarray, list[Note]]:
        """Run each post-processor in turn on an HxWx3 (or x4 once the background is gone) uint8 image."""
        with self._in_use:
            return self._apply(image, steps, facefixer_strength, face_dir)

    def _apply(self, image: np.ndarray, steps: list[tuple[str, str]], facefixer_strength: float | None,
               face_dir: str) -> tuple[np.ndarray, list[Note]]:
        notes: list[Note] = []
        for name, path in steps:
            if not path:
                notes.append(("information", "see_ref", f"post-processing skipped: {name} has no weights on this worker"))
                continue
            kind = kind_of(name)
            if kind == "background":
                if self._background is None:
                    from horde_worker.inference.background import BackgroundRemover

                    self._background = BackgroundRemover()
                image = self._background.apply(image, path)
            elif kind == "facefixer":
                rgb, _faces = self.face_fixer(face_dir).apply(np.ascontiguousarray(image[:, :, :3]), path,
                                                              facefixer_strength)
                image = with_alpha(rgb, image)
            else:
                rgb = upscale(self.model(path), np.ascontiguousarray(image[:, :, :3]), self.device)
                image = with_alpha(rgb, image)
        return image, notes


def with_alpha(rgb: np.ndarray, original: np.ndarray) -> np.ndarray:
    """`rgb` with the original's alpha channel, resized to match, when it had one."""
    if original.shape[2] < 4:
        return rgb
    from PIL import Image

    alpha = Image.fromarray(original[:, :, 3]).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.LANCZOS)
    return np.dstack([rgb, np.asarray(alpha)])


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
