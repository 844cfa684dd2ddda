"""Face fixers: find each face, restore it at 512x512, paste it back.

facexlib does the face work (RetinaFace detection with five landmarks, alignment to the FFHQ
template, ParseNet's face mask for a soft paste); spandrel builds the restorer (GFPGAN,
RestoreFormer, CodeFormer) from its weights. `facefixer_strength` s in [0, 1] is how much of the
restored face replaces the original: 0 leaves the image as it was, 1 pastes the restored face
whole. CodeFormer also takes it as its fidelity knob, w = 1 - s (w = 0 restores hardest).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from horde_worker.models.postprocessors import FACE_HELPER_FILES

DEFAULT_STRENGTH = 0.75  # when the job names a face fixer without a strength
FACE_SIZE = 512
DETECTION_SIDE = 640


class FaceFixer:
    """The detector/parser of one inference process and the restorers it has loaded."""

    def __init__(self, face_dir: str, device: torch.device) -> None:
        from facexlib.utils.face_restoration_helper import FaceRestoreHelper

        folder = Path(face_dir)
        for name in FACE_HELPER_FILES:
            if not (folder / name).exists():  # facexlib would fetch it from the internet instead
                raise FileNotFoundError(f"face fixer helper {folder / name} is missing")
        self.device = device
        self.helper = FaceRestoreHelper(upscale_factor=1, face_size=FACE_SIZE, det_model="retinaface_resnet50",
                                        use_parse=True, device=device, model_rootpath=str(folder))
        self._restorers: dict[str, object] = {}

    def restorer(self, path: str):
        if path not in self._restorers:
            from spandrel import ModelLoader

            import_extra_architectures()
            descriptor = ModelLoader().load_from_file(Path(path))
            if descriptor.purpose != "FaceSR":
                raise ValueError(f"{Path(path).name} is a {descriptor.architecture.name} model, not a face restorer")
            descriptor.to(self.device).eval()  # restorers stay fp32: spandrel marks them unsafe in half
            self._restorers = {path: descriptor}
        return self._restorers[path]

    def apply(self, image: np.ndarray, path: str, strength: float | None) -> tuple[np.ndarray, int]:
        """The RGB image with its faces restored, and how many faces were found."""
        strength = DEFAULT_STRENGTH if strength is None else min(1.0, max(0.0, strength))
        if strength == 0:
            return image, 0
        import cv2

        descriptor = self.restorer(path)
        helper = self.helper
        helper.clean_all()
        helper.read_image(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        # Faces are found on a copy whose short side is at most 640 px (landmarks are scaled back):
        # detection on a 4x-upscaled image would otherwise cost more than the restoration.
        short_side = min(image.shape[:2])
        found = helper.get_face_landmarks_5(only_center_face=False, eye_dist_threshold=5,
                                            resize=DETECTION_SIDE if short_side > DETECTION_SIDE else None)
        if not found:
            return image, 0
        helper.align_warp_face()
        for cropped in helper.cropped_faces:
            restored = restore_face(descriptor, cropped, strength, self.device)
            blended = cropped.astype(np.float32) + strength * (restored.astype(np.float32) - cropped)
            helper.add_restored_face(np.clip(blended, 0, 255).round().astype(np.uint8))
        helper.get_inverse_affine()
        pasted = helper.paste_faces_to_input_image()
        return cv2.cvtColor(pasted, cv2.COLOR_BGR2RGB), found


def restore_face(descriptor, face_bgr: np.ndarray, strength: float, device: torch.device) -> np.ndarray:
    """One aligned 512x512 BGR face through the restorer, back as BGR uint8."""
    pixels = torch.from_numpy(face_bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float().div(255).to(device)
    with torch.inference_mode():
        if descriptor.architecture.id == "RestoreFormer":  # spandrel maps its [0, 1] in and out itself
            out = descriptor(pixels)
        elif descriptor.architecture.id == "CodeFormer":
            out = (descriptor.model(pixels * 2 - 1, w=1.0 - strength, adain=True)[0] + 1) / 2
        else:  # GFPGAN works in [-1, 1]
            out = (descriptor(pixels * 2 - 1) + 1) / 2
    rgb = out[0].float().clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


@functools.cache
def import_extra_architectures() -> None:
    """CodeFormer lives in spandrel_extra_arches (its licence keeps it out of spandrel itself); registered once."""
    import spandrel_extra_arches

    spandrel_extra_arches.install()
