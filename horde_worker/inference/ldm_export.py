"""Writing diffusers components back as one LDM-layout checkpoint.

The horde's models are single-file checkpoints in the original (LDM) tensor layout. The demo
and test models are built as diffusers modules and saved in that same layout, so that they are
loaded through exactly the path a downloaded model takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from horde_worker.inference.checkpoint import UNET_PREFIX, VAE_PREFIX

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET.get(head, head)}.{tail}"


def _ldm_unet_name(key: str, per_level: int, has_attention: list[bool]) -> str | None:
    """LDM's name (without prefix) of a diffusers UNet tensor, or None when it has none."""
    parts = key.split(".")
    for diffusers_name, ldm_name in _UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if parts[0] == "down_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{level * per_level + index + 1}.0.{_rename_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{level * per_level + index + 1}.1.{rest}"
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
    elif parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_rename_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    elif parts[0] == "up_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{level * per_level + index}.0.{_rename_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{level * per_level + index}.1.{rest}"
        if kind == "upsamplers":
            slot = 2 if has_attention[level] else 1
            return f"output_blocks.{level * per_level + per_level - 1}.{slot}.{rest}"
    return None


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Map a diffusers UNet2DConditionModel's state dict onto LDM's `model.diffusion_model.*` names."""
    per_level = unet.config.layers_per_block + 1
    has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        new = _ldm_unet_name(key, per_level, has_attention)
        if new is None:
            raise ValueError(f"no LDM name known for UNet tensor {key}")
        out[UNET_PREFIX + new] = tensor
    return out


def controlnet_to_ldm(controlnet, base_unet=None) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel as an LDM `control_model.*` file. With `base_unet`, the parts the
    ControlNet shares with a UNet are stored as differences from it, with the `difference` marker,
    as the horde's `diff_control_*` files are."""
    per_level = controlnet.config.layers_per_block + 1
    base = base_unet.state_dict() if base_unet is not None else {}
    hint_blocks = 2 * (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in controlnet.state_dict().items():
        parts = key.split(".")
        if key.startswith("controlnet_cond_embedding."):
            if parts[1] == "conv_in":
                index = 0
            elif parts[1] == "conv_out":
                index = 2 * hint_blocks + 2
            else:
                index = 2 * (int(parts[2]) + 1)
            new = f"input_hint_block.{index}.{parts[-1]}"
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{parts[-1]}"
        elif parts[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{parts[-1]}"
        else:
            new = _ldm_unet_name(key, per_level, [])
            if new is None:
                raise ValueError(f"no LDM name known for ControlNet tensor {key}")
            if key in base:
                tensor = tensor - base[key]
        out["control_model." + new] = tensor
    if base_unet is not None:
        out["difference"] = torch.tensor([0.0])
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """Map a diffusers AutoencoderKL's state dict onto LDM's `first_stage_model.*` names."""
    levels = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in vae.state_dict().items():
        parts = key.split(".")
        new = key
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            side, level, kind, rest = parts[0], int(parts[2]), parts[3], ".".join(parts[4:])
            ldm_level = level if side == "encoder" else levels - 1 - level
            group = "down" if side == "encoder" else "up"
            if kind == "resnets":
                index, rest = rest.split(".", 1)
                new = f"{side}.{group}.{ldm_level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{group}.{ldm_level}.{sampler}.{rest.split('.', 1)[1]}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            side, kind, index, rest = parts[0], parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                for diffusers_name, ldm_name in _VAE_ATTENTION.items():
                    if rest.startswith(diffusers_name + "."):
                        rest = ldm_name + rest[len(diffusers_name) :]
                new = f"{side}.mid.attn_1.{rest}"
                if tensor.ndim == 2:  # LDM keeps these projections as 1x1 convolutions
                    tensor = tensor[:, :, None, None]
        elif len(parts) > 1 and parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{parts[2]}"
        out[VAE_PREFIX + new] = tensor
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP-L text encoder under SD1's `cond_stage_model.transformer.*` names."""
    out = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + name] = tensor
    return out


def open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text tower in OpenCLIP's layout (fused q/k/v, resblocks), under `prefix`."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            for ours, theirs in names.items():
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors as a `.safetensors` file, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def save_sd2_checkpoint(path: Path, unet, vae, text_encoder) -> Path:
    """SD2 layout: OpenCLIP ViT-H text tower under `cond_stage_model.model.`."""
    return save_tensors(path, {**unet_to_ldm(unet), **vae_to_ldm(vae),
                               **open_clip_to_ldm(text_encoder, "cond_stage_model.model.")})


def save_sdxl_checkpoint(path: Path, unet, vae, text_encoder, text_encoder_2) -> Path:
    """SDXL layout: CLIP-L under `conditioner.embedders.0.transformer.`, bigG under `conditioner.embedders.1.model.`."""
    clip_l = {k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v
              for k, v in text_encoder_to_ldm(text_encoder).items()}
    return save_tensors(path, {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_l,
                               **open_clip_to_ldm(text_encoder_2, "conditioner.embedders.1.model.")})


def save_sd_checkpoint(path: Path, unet, vae, text_encoder) -> Path:
    """Save SD1-layout components as one `.safetensors` checkpoint."""
    return save_tensors(path, {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoder_to_ldm(text_encoder)})
