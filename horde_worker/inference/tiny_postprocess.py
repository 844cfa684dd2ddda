"""Weights for every post-processor that need no download: local mode and the tests use them.

Upscalers and RestoreFormer are the real architectures at tiny widths with random weights.
GFPGAN, CodeFormer, the RetinaFace detector and ParseNet have sizes fixed by their loaders, so they
are full size (random weights, stored in fp16 to halve the disk they take), except that the
detector's output heads are set by hand: every anchor of the coarsest level reports a face with the
same five landmarks around its centre and a box four times its size, so exactly one face is found
in any image up to about 1000 px.
Background removal gets a small ONNX network with the input and output of rembg's U^2-Net that
treats bright pixels as the subject. All files are written where the real ones would be.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from horde_worker.models.postprocessors import BY_HAND, FACE_DIR, FACE_HELPER_FILES, U2NET

# Landmarks (eyes, nose, mouth corners) in pixels around the anchor centre: a face about 40 px tall.
FACE_LANDMARKS = ((-8, -6), (8, -6), (0, 2), (-7, 10), (7, 10))


def write_tiny_upscaler(path: Path, scale: int, seed: int = 0) -> Path:
    """An ESRGAN of 16 filters and one block (Real-ESRGAN's pixel-unshuffle form for x2)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(num_filters=16, num_blocks=1, scale=scale, shuffle_factor=2 if scale == 2 else None)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # random weights give a near-black picture: lift it into a visible range
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    return save_weights(model, path)


def write_face_helpers(folder: Path, seed: int = 0) -> None:
    """RetinaFace (ResNet-50) with hand-set heads and a random ParseNet, under their reference names."""
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    detector = RetinaFace(network_name="resnet50", half=False, device="cpu")
    prior_size = 512  # the second anchor of the stride-32 level
    with torch.no_grad():
        for level in range(3):
            for head in (detector.ClassHead[level], detector.BboxHead[level], detector.LandmarkHead[level]):
                head.conv1x1.weight.zero_()
                head.conv1x1.bias.zero_()
            # (background, face) logits of the level's two anchors: only the 512-px anchor of level 2 is a face
            face_logit = 10.0 if level == 2 else -10.0
            detector.ClassHead[level].conv1x1.bias.copy_(torch.tensor([10.0, -10.0, -face_logit, face_logit]))
        detector.BboxHead[2].conv1x1.bias[6:8] = math.log(4.0) / 0.2  # box 4x the anchor: one face survives NMS
        offsets = [v / (0.1 * prior_size) for point in FACE_LANDMARKS for v in point]
        detector.LandmarkHead[2].conv1x1.bias[10:20] = torch.tensor(offsets)
    torch.save(half(detector.state_dict()), folder / "detection_Resnet50_Final.pth")
    torch.save(half(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict()), folder / "parsing_parsenet.pth")


def write_restorer(path: Path, architecture: str, seed: int = 0) -> Path:
    """A face restorer with random weights: "GFPGAN", "RestoreFormer" (tiny) or "CodeFormer"."""

    torch.manual_seed(seed)
    if architecture == "GFPGAN":
        from spandrel.architectures.GFPGAN import GFPGAN

        model = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                       fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    elif architecture == "RestoreFormer":
        from spandrel.architectures.RestoreFormer import RestoreFormer

        model = RestoreFormer(n_embed=32, embed_dim=32, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1, 1, 2), num_res_blocks=1,
                              attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=32,
                              double_z=False, enable_mid=True, head_size=8)
    elif architecture == "CodeFormer":
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

        model = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, latent_size=256,
                           connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    else:
        raise ValueError(f"unknown face restorer {architecture}")
    return save_weights(model, path, stored_half=True)


def write_background_remover(path: Path) -> Path:
    """An ONNX network with U^2-Net's input and first output (1x3x320x320 -> 1x1x320x320): brightness
    decides the subject."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mean, std, luma = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (0.299, 0.587, 0.114)
    sharpness = 20.0
    # rembg feeds (x - mean) / std: undo that inside the 1x1 convolution, then sigmoid(k * (luma - 0.5)).
    weight = torch.tensor([sharpness * c * s for c, s in zip(luma, std, strict=True)]).reshape(1, 3, 1, 1)
    bias = torch.tensor([sharpness * (sum(c * m for c, m in zip(luma, mean, strict=True)) - 0.5)])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "w", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["mask"])],
        "brightness_saliency",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_all(cache_home: Path) -> None:
    """Every post-processor's weights under `cache_home`, where the worker looks for them."""
    from horde_worker.models.postprocessors import reference_files

    cache_home = Path(cache_home)
    face_dir = cache_home / FACE_DIR
    if not all((face_dir / name).exists() for name in FACE_HELPER_FILES):
        write_face_helpers(face_dir)
    targets = {f.name: cache_home / f.relative for f in reference_files() if f.relative.name not in FACE_HELPER_FILES}
    for name, (folder, candidates) in BY_HAND.items():
        targets[name] = cache_home / folder / candidates[-1 if folder == "esrgan" else 0]
    restorers = {"GFPGAN": "GFPGAN", "GFPGANv1.3": "GFPGAN", "RestoreFormer": "RestoreFormer",
                 "CodeFormers": "CodeFormer"}
    for seed, (name, path) in enumerate(sorted(targets.items())):
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "GFPGANv1.3" and targets["GFPGAN"].exists():
            os.link(targets["GFPGAN"], path)  # the same architecture: one file on disk for both
        elif name in restorers:
            write_restorer(path, restorers[name], seed)
        else:
            write_tiny_upscaler(path, 2 if name.startswith("2x") or "x2" in name else 4, seed)
    if not (cache_home / U2NET.dest).exists():
        write_background_remover(cache_home / U2NET.dest)


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors stored in fp16: half the disk for random full-size weights; loaders widen them back."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_weights(model: torch.nn.Module, path: Path, stored_half: bool = False) -> Path:
    """The model's state dict at `path`: safetensors, or a plain torch file for the reference's .pth names."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in (half(model.state_dict()) if stored_half else model.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # the reference's .pth names: a plain state dict, read weights-only
        torch.save(state, path)
    return path
