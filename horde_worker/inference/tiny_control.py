"""Small random ControlNets and annotator weights in the layouts the worker downloads.

ControlNets are written as LDM `control_model.*` files under the reference's file names, the
`diff_control_*` ones as differences from the given UNet; they fit that tiny UNet. Annotators:
HED and M-LSD are their real (small) architectures with random weights in `.pth` files; depth
(DPT) and segmentation (UperNet) are transformers folders with tiny configs. OpenPose's three
networks are large and left out: local mode runs openpose with `image_is_control` only.
"""

from __future__ import annotations

from pathlib import Path


def write_tiny_controlnets(folder: Path, unet, baseline: str = "stable_diffusion_1", seed: int = 0) -> list[Path]:
    """One file per reference ControlNet of `baseline`, fitting `unet`."""
    import torch
    from diffusers import ControlNetModel

    from horde_worker.inference import ldm_export
    from horde_worker.models.controlnets import reference_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, control in enumerate(f for f in reference_files() if f.baseline == baseline):
        path = folder / control.file_name
        if path in written:
            continue
        torch.manual_seed(seed + index)
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            for name, parameter in controlnet.named_parameters():
                # The zero convolutions start at zero; give them weight so the control visibly steers.
                strength = 0.5 if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                                 "controlnet_cond_embedding.conv_out")) else 0.05
                parameter.add_(torch.randn_like(parameter) * strength)
        base = unet if control.file_name.startswith("diff_") else None
        ldm_export.save_tensors(path, ldm_export.controlnet_to_ldm(controlnet, base))
        written.append(path)
    return written


def write_tiny_annotators(folder: Path, seed: int = 0) -> None:
    """HED, M-LSD, DPT depth and UperNet segmentation weights under `folder` (an annotator folder)."""
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from transformers import (
        ConvNextConfig,
        DPTConfig,
        DPTForDepthEstimation,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    torch.save(MobileV2_MLSD_Large().state_dict(), folder / "mlsd_large_512_fp32.pth")
    depth = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=384,
        patch_size=16, neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=32, backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1))
    depth.save_pretrained(folder / "dpt-hybrid-midas")
    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    seg = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=16,
                                                       auxiliary_in_channels=32, num_labels=150))
    seg.save_pretrained(folder / "upernet-convnext-small")
