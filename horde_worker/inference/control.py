"""ControlNet: an annotator turns the source image into a control map, which guides a txt2img pass.

The horde's ControlNet files (its `controlnet.json` reference) are LDM `control_model.*` files.
Most SD1.5 ones are kohya's "diff" modules: the parts shared with the UNet are stored as
differences from SD1.5 and marked by a `difference` tensor, so the ControlNet of a job is the
job's own UNet plus the difference, as other workers build it too. The other files hold the
weights outright. Either way the ControlNet is built once per model and file and kept.

Annotators, by the horde's control types (weights under `cache_home/controlnet/annotators`):
    canny          OpenCV Canny edges (controlnet-aux), no weights
    scribble       the requester's drawing, dark strokes turned into white-on-black lines
    hed            HED soft edges (controlnet-aux, ControlNetHED.pth)
    fakescribbles  HED edges thinned into scribbles (controlnet-aux, ControlNetHED.pth)
    hough          M-LSD straight lines (controlnet-aux, mlsd_large_512_fp32.pth)
    openpose       OpenPose body keypoints (controlnet-aux, body/hand/face .pth)
    depth          MiDaS DPT-hybrid depth (transformers, dpt-hybrid-midas/)
    normal         normals from that depth map, as ControlNet 1.0's normal model was trained
    seg            ADE20K segmentation by UperNet-ConvNeXt (transformers), ADE20K colours
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from horde_worker.inference import sources as sources_mod
from horde_worker.models.controlnets import annotator_ready


class ControlUnavailable(RuntimeError):
    """The job's control type cannot run here (missing annotator weights or ControlNet)."""


# --- the ControlNet model ---------------------------------------------------------------------


def load_controlnet(model, path: str):
    """The ControlNet of `path` for this model's UNet, built once and kept on the model."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from horde_worker.inference.checkpoint import load_state_dict

    cache = model.controlnets
    if path in cache:
        return cache[path]
    unet = model.pipeline.unet
    state_dict = load_state_dict(Path(path))
    is_difference = "difference" in state_dict
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=True)
    converted = convert_controlnet_checkpoint(state_dict, dict(controlnet.config))
    own = controlnet.state_dict()
    unet_keys = set(unet.state_dict())
    if set(converted) != set(own):
        missing = sorted(set(own) - set(converted))[:3]
        raise ControlUnavailable(f"{Path(path).name} does not fit this model (missing e.g. {missing})")
    merged = {}
    for key, value in converted.items():
        if value.shape != own[key].shape:
            raise ControlUnavailable(f"{Path(path).name} does not fit this model ({key}: {tuple(value.shape)} "
                                     f"vs {tuple(own[key].shape)})")
        value = value.to(own[key].dtype)
        merged[key] = own[key] + value.to(own[key].device) if is_difference and key in unet_keys else value
    controlnet.load_state_dict(merged)
    controlnet.to(device=unet.device, dtype=unet.dtype).eval()
    cache[path] = controlnet
    return controlnet


# --- annotators --------------------------------------------------------------------------------


def _quiet_import_controlnet_aux() -> None:
    """controlnet-aux re-registers timm models on import, warning once per model: nothing to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux  # noqa: F401


# The annotator of the last ControlNet job, kept: consecutive jobs of one type do not read it again.
_LAST_ANNOTATOR: dict[tuple[str, str, str], object] = {}


def _annotator(kind: str, folder: Path, device: torch.device, load):
    key = (kind, str(folder), str(device))
    if key not in _LAST_ANNOTATOR:
        _LAST_ANNOTATOR.clear()
        _LAST_ANNOTATOR[key] = load()
    return _LAST_ANNOTATOR[key]


def _hed(folder: Path, device: torch.device):
    from controlnet_aux import HEDdetector

    detector = HEDdetector.from_pretrained(str(folder))
    detector.netNetwork.to(device)
    return detector


def control_map(control_type: str, image: Image.Image, folder: Path, device: torch.device) -> Image.Image:
    """The control map of `image` for `control_type`, at the image's size (RGB)."""
    folder = Path(folder)
    if not annotator_ready(control_type, folder):
        raise ControlUnavailable(f"the {control_type} annotator's weights are not in {folder}")
    size = image.size
    resolution = min(512, max(size))
    _quiet_import_controlnet_aux()
    if control_type == "canny":
        from controlnet_aux import CannyDetector

        result = CannyDetector()(image, low_threshold=100, high_threshold=200, detect_resolution=resolution,
                                 image_resolution=resolution, output_type="pil")
    elif control_type == "scribble":
        pixels = np.asarray(image.convert("RGB"))
        lines = np.zeros_like(pixels)
        lines[pixels.min(axis=2) < 127] = 255
        result = Image.fromarray(lines)
    elif control_type in ("hed", "fakescribbles"):
        detector = _annotator("hed", folder, device, lambda: _hed(folder, device))
        result = detector(image, detect_resolution=resolution, image_resolution=resolution,
                          scribble=control_type == "fakescribbles", safe=control_type == "fakescribbles")
    elif control_type == "hough":
        from controlnet_aux import MLSDdetector

        detector = _annotator("hough", folder, device, lambda: MLSDdetector.from_pretrained(str(folder)))
        result = detector(image, detect_resolution=resolution, image_resolution=resolution)
    elif control_type == "openpose":
        from controlnet_aux import OpenposeDetector

        detector = _annotator("openpose", folder, device, lambda: OpenposeDetector.from_pretrained(str(folder)))
        result = detector(image, detect_resolution=resolution, image_resolution=resolution)
    elif control_type in ("depth", "normal"):
        depth = estimate_depth(image, folder / "dpt-hybrid-midas", device)
        result = depth_image(depth) if control_type == "depth" else normal_image(depth)
    elif control_type == "seg":
        result = segment(image, folder / "upernet-convnext-small", device)
    else:
        raise ControlUnavailable(f"unknown control type {control_type!r}")
    return result.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def estimate_depth(image: Image.Image, folder: Path, device: torch.device) -> np.ndarray:
    """Relative inverse depth (MiDaS convention: near is large), HxW float, at 384 on the short side."""
    from transformers import DPTForDepthEstimation

    model = _annotator("depth", folder, device, lambda: DPTForDepthEstimation.from_pretrained(
        str(folder), local_files_only=True).to(device).eval())
    side = 384
    resized = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        depth = model(pixel_values=pixels.to(device)).predicted_depth[0].float().cpu().numpy()
    return depth


def depth_image(depth: np.ndarray) -> Image.Image:
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / max(high - low, 1e-6)
    return Image.fromarray((scaled * 255).astype(np.uint8)).convert("RGB")


def normal_image(depth: np.ndarray, background_threshold: float = 0.4) -> Image.Image:
    """Surface normals from a depth map: depth gradients as x/y, a constant z, the far background flat."""
    import cv2

    depth = depth.astype(np.float32)
    low, high = float(depth.min()), float(depth.max())
    normalized = (depth - low) / max(high - low, 1e-6)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, np.pi * 2.0)
    x[normalized < background_threshold] = 0
    y[normalized < background_threshold] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sqrt(np.sum(normal**2, axis=2, keepdims=True)) + 1e-6
    return Image.fromarray(np.clip(normal * 127.5 + 127.5, 0, 255).astype(np.uint8))


def segment(image: Image.Image, folder: Path, device: torch.device) -> Image.Image:
    """ADE20K classes coloured with ADE20K's palette, as the seg ControlNet was trained."""
    from controlnet_aux.util import ade_palette
    from transformers import UperNetForSemanticSegmentation

    model = _annotator("seg", folder, device, lambda: UperNetForSemanticSegmentation.from_pretrained(
        str(folder), local_files_only=True).to(device).eval())
    side = 512
    resized = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    pixels = torch.from_numpy(((np.asarray(resized, dtype=np.float32) - mean) / std).astype(np.float32))
    with torch.inference_mode():
        logits = model(pixel_values=pixels.permute(2, 0, 1)[None].to(device)).logits[0]
    classes = logits.argmax(dim=0).cpu().numpy()
    palette = np.array(ade_palette(), dtype=np.uint8)
    return Image.fromarray(palette[classes % len(palette)])


# --- the job -----------------------------------------------------------------------------------


def run(pass_, sources: sources_mod.Sources) -> list[np.ndarray]:
    """A ControlNet job: its control map, or the images the map guides."""
    request = pass_.request
    if sources.image is None:
        raise ControlUnavailable("a ControlNet job needs a source image")
    count = len(request.seeds)
    device = next(pass_.pipe.unet.parameters()).device
    annotators = Path(request.extra.get("annotator_dir", ""))
    if request.image_is_control:
        cmap = sources.image
    else:
        cmap = control_map(request.control_type, sources.image, annotators, device)
    if request.return_control_map:
        return [np.asarray(cmap.convert("RGB"))] * count
    from horde_worker.inference.pipelines import derived_pipeline

    controlnet = pass_.model.controlnets[request.control_model_path]
    pipeline = derived_pipeline(pass_.pipe, "controlnet", controlnet=controlnet)
    return pass_.call(pipeline, request.steps, image=[cmap] * count, width=request.width, height=request.height)
