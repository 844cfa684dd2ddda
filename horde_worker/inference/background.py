"""strip_background: rembg's U^2-Net cuts the subject out; the result carries an alpha channel.

rembg runs the network through onnxruntime on the CPU (320x320 saliency map, scaled to the
image), so it costs no VRAM and does not wait for the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class BackgroundRemover:
    """One rembg session per weights file, kept while the process lives."""

    def __init__(self) -> None:
        self._sessions: dict[str, object] = {}

    def session(self, path: str):
        if path not in self._sessions:
            from rembg import new_session

            # rembg only opens model files under its home folder: make that the file's own folder.
            os.environ["U2NET_HOME"] = str(Path(path).parent)
            self._sessions = {path: new_session("u2net_custom", model_path=path, providers=["CPUExecutionProvider"])}
        return self._sessions[path]

    def apply(self, image: np.ndarray, path: str) -> np.ndarray:
        """HxWx3 (or x4) uint8 in, HxWx4 uint8 out: the subject opaque, the background transparent."""
        from PIL import Image
        from rembg import remove

        cut = remove(Image.fromarray(image[:, :, :3]), session=self.session(path))
        return np.asarray(cut.convert("RGBA"))
