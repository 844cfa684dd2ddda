"""Stable Cascade from the horde reference's two files (ComfyUI's all-in-one checkpoints), offline.

`stable_cascade_stage_c.safetensors` holds the prior (stage C, `model.diffusion_model.`), the CLIP-G text
encoder (`text_encoder.`) and the CLIP-L image encoder used by remix (`clip_l_vision.`);
`stable_cascade_stage_b.safetensors` holds the decoder (stage B, `model.diffusion_model.`) and the VQGAN
(stage A, `vae.`). The UNets' tensors keep Stability's names and go through diffusers' own converter; their
sizes are read from the tensors.

A job runs as the reference runs it: stage C on a 42× compressed latent for 2/3 of the steps with the job's
cfg, stage B on a 4× latent for the other third without guidance (its text input zeroed), conditioned on stage
C's result, then stage A decodes (`cascade_run.py`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from horde_worker.inference.checkpoint import CheckpointError, _count_indices, _load_exact, skip_weight_init

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = ("text_encoder.clip_g.transformer.", "text_encoder.")
TEXT_PROJECTION = ("text_encoder.clip_g.text_projection", "text_encoder.text_projection.weight")
VISION_PREFIX = "clip_l_vision."
VAE_PREFIX = "vae."
COMPRESSION = 42  # image pixels per stage C latent pixel, as the reference's empty latent makes it
STAGE_B_COMPRESSION = 4
PRIOR_SHIFT = 2.0
PRIOR_SHARE = 0.67  # of the job's steps run by stage C (the rest by stage B)
STAGE_A_SCALE = 0.43  # stage B's latents are multiplied by this before stage A decodes them
COSINE_S = 0.008
TABLE = 10_000
HEAD_DIM = 64
# The block types of each level, per stage (Stability's released layouts).
PRIOR_TYPES = ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]
DECODER_TYPES = (["SDCascadeResBlock", "SDCascadeTimestepBlock"],) * 2 + (PRIOR_TYPES,) * 2


# --- reading the files -------------------------------------------------------------------------------------
def under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def unet_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage's UNet tensors (without the checkpoint prefix) in diffusers' names, by diffusers' converter;
    attention already split into q/k/v (ComfyUI's own saving) is renamed the same way."""
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    unet = under(tensors, UNET_PREFIX) or dict(tensors)
    unet = {re.sub(r"\.attention\.attn\.(to_[qkv])\.", r".attention.\1.", k)
            .replace(".attention.attn.out_proj.", ".attention.to_out.0."): v for k, v in unet.items()}
    return convert_stable_cascade_unet_single_file_to_diffusers(unet)


def unet_config(weights: dict[str, torch.Tensor]) -> dict:
    """A stage's UNet size from its tensors (diffusers' names): levels, widths, depths, mappers."""
    prior = "clip_txt_mapper.weight" in weights
    keys = list(weights)
    levels = len(_count_indices(keys, r"^down_blocks\.(\d+)\."))
    types = [PRIOR_TYPES] * levels if prior else list(DECODER_TYPES[:levels])
    widths = [int(weights[f"down_blocks.{i}.0.channelwise.0.weight"].shape[1]) for i in range(levels)]
    patch = 1 if prior else 2
    pooled = weights["clip_txt_pooled_mapper.weight"]
    clip_seq = 4
    config = {
        "in_channels": int(weights["embedding.1.weight"].shape[1]) // patch**2,
        "out_channels": int(weights["clf.1.weight"].shape[0]) // patch**2,
        "timestep_ratio_embedding_dim": 64, "patch_size": patch,
        "conditioning_dim": int(pooled.shape[0]) // clip_seq, "block_out_channels": widths,
        "num_attention_heads": [max(1, w // HEAD_DIM) if "SDCascadeAttnBlock" in t else 0
                                for w, t in zip(widths, types, strict=True)],
        "down_num_layers_per_block": [len(_count_indices(keys, rf"^down_blocks\.{i}\.(\d+)\.")) // len(types[i])
                                      for i in range(levels)],
        "up_num_layers_per_block": [len(_count_indices(keys, rf"^up_blocks\.{j}\.(\d+)\."))
                                    // len(types[levels - 1 - j]) for j in range(levels)],
        "down_blocks_repeat_mappers": [1 + len(_count_indices(keys, rf"^down_repeat_mappers\.{i}\.(\d+)\."))
                                       for i in range(levels)],
        "up_blocks_repeat_mappers": [1 + len(_count_indices(keys, rf"^up_repeat_mappers\.{j}\.(\d+)\."))
                                     for j in range(levels)],
        "block_types_per_layer": types, "clip_text_pooled_in_channels": int(pooled.shape[1]), "clip_seq": clip_seq,
        "kernel_size": 3, "self_attn": True,
        "dropout": [0.1] * levels if prior else [0.0, 0.0, 0.1, 0.1][:levels],
    }
    if prior:
        config.update(clip_text_in_channels=int(weights["clip_txt_mapper.weight"].shape[1]),
                      clip_image_in_channels=int(weights["clip_img_mapper.weight"].shape[1]),
                      timestep_conditioning_type=["sca", "crp"], switch_level=[False])
    else:
        config.update(effnet_in_channels=int(weights["effnet_mapper.0.weight"].shape[1]),
                      pixel_mapper_in_channels=int(weights["pixels_mapper.0.weight"].shape[1]),
                      timestep_conditioning_type=["sca"])
    return config


def build_unet(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    from diffusers import StableCascadeUNet

    weights = unet_weights(tensors)
    with skip_weight_init():
        model = StableCascadeUNet(**unet_config(weights))
    _load_exact(model, weights, "Stable Cascade UNet", dtype)
    embed_timesteps_in_float32(model)
    return model


def embed_timesteps_in_float32(unet) -> None:
    """The timestep fraction is multiplied by 10000 before its sin/cos embedding: in bf16 (spacing ~0.004 near 1)
    that is off by ~20, as the reference's float32 is not. Embed from float32, hand the model its own precision."""
    import types

    embed = unet.get_timestep_ratio_embedding

    def in_float32(self, timestep_ratio, max_positions=10000):
        return embed(timestep_ratio.float(), max_positions).to(self.dtype)

    unet.get_timestep_ratio_embedding = types.MethodType(in_float32, unet)


def _tower_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], level: str) -> dict[str, torch.Tensor]:
    """transformers 5 names a CLIP tower's tensors without the `text_model.`/`vision_model.` level."""
    if any(k.startswith(level) for k in model.state_dict()):
        return weights
    return {k.removeprefix(level): v for k, v in weights.items()}


def build_text_encoder(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """CLIP-G with its projection (transformers' `CLIPTextModelWithProjection`), from stage C's file."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prefix = next((p for p in TEXT_PREFIXES if f"{p}text_model.embeddings.token_embedding.weight" in tensors), None)
    projection = next((tensors[k] for k in TEXT_PROJECTION if k in tensors), None)
    if prefix is None or projection is None:
        raise CheckpointError("no CLIP-G text encoder (text_encoder.*) in the stage C file")
    weights = {k: v for k, v in under(tensors, prefix).items() if k.startswith("text_model.")}
    weights.pop("text_model.embeddings.position_ids", None)
    # ComfyUI keeps the projection as the matrix that multiplies from the right; a linear layer holds its transpose.
    weights["text_projection.weight"] = projection.t().contiguous() if TEXT_PROJECTION[0] in tensors else projection
    hidden = int(weights["text_model.embeddings.token_embedding.weight"].shape[1])
    config = CLIPTextConfig(
        vocab_size=int(weights["text_model.embeddings.token_embedding.weight"].shape[0]), hidden_size=hidden,
        intermediate_size=int(weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(_count_indices(list(weights), r"text_model\.encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // HEAD_DIM), hidden_act="gelu",
        max_position_embeddings=int(weights["text_model.embeddings.position_embedding.weight"].shape[0]),
        projection_dim=int(weights["text_projection.weight"].shape[0]))
    with skip_weight_init():
        model = CLIPTextModelWithProjection(config)
    _load_exact(model, _tower_weights(model, weights, "text_model."), "CLIP-G text encoder", dtype)
    return model


def build_image_encoder(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """The CLIP-L image encoder remix conditions on (transformers' layout in the file), or None without it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    weights = under(tensors, VISION_PREFIX)
    if not weights:
        return None
    weights.pop("vision_model.embeddings.position_ids", None)
    patch = weights["vision_model.embeddings.patch_embedding.weight"]
    positions = int(weights["vision_model.embeddings.position_embedding.weight"].shape[0])
    hidden = int(patch.shape[0])
    config = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=int(weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(_count_indices(list(weights), r"vision_model\.encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // HEAD_DIM), patch_size=int(patch.shape[-1]),
        image_size=int(patch.shape[-1]) * math.isqrt(positions - 1), hidden_act="quick_gelu",
        projection_dim=int(weights["visual_projection.weight"].shape[0]))
    with skip_weight_init():
        model = CLIPVisionModelWithProjection(config)
    _load_exact(model, _tower_weights(model, weights, "vision_model."), "CLIP-L image encoder", dtype)
    return model


def build_vqgan(tensors: dict[str, torch.Tensor]):
    """Stage A (diffusers' `PaellaVQModel`, float32) from stage B's file; only the codebook's name differs."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    weights = {k.replace("vquantizer.codebook.", "vquantizer.embedding."): v for k, v in under(tensors, VAE_PREFIX).items()}
    if "vquantizer.embedding.weight" not in weights:
        raise CheckpointError("no stage A (vae.vquantizer.*) in the stage B file")
    codebook = weights["vquantizer.embedding.weight"]
    config = {"embed_dim": int(weights["up_blocks.0.0.weight"].shape[0]), "levels": 2,
              "bottleneck_blocks": len(_count_indices(list(weights), r"^up_blocks\.(\d+)\.")) - 3,
              "latent_channels": int(codebook.shape[1]), "num_vq_embeddings": int(codebook.shape[0]),
              "scale_factor": STAGE_A_SCALE}
    with skip_weight_init():
        model = PaellaVQModel(**config)
    _load_exact(model, {k: v.float() for k, v in weights.items()}, "Stable Cascade stage A")
    return model


def pipeline_class():
    """A diffusers pipeline holding the three stages' modules (it is run by `cascade_run.run`)."""
    from diffusers import DiffusionPipeline

    class StableCascadePipeline(DiffusionPipeline):
        def __init__(self, prior, decoder, text_encoder, tokenizer, vqgan, scheduler, image_encoder=None):
            super().__init__()
            self.register_modules(prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer,
                                  vqgan=vqgan, scheduler=scheduler, image_encoder=image_encoder)

    return StableCascadePipeline


def build_pipeline(manifest: Path, dtype: torch.dtype):
    """The three stages from a Cascade model's manifest (stage C's and stage B's files)."""
    from diffusers import DDPMWuerstchenScheduler

    from horde_worker.inference.checkpoint import load_state_dict
    from horde_worker.inference.pipelines import clip_tokenizer
    from horde_worker.models.manifest import read_manifest

    _, parts = read_manifest(manifest, required=("stable_cascade_stage_c", "stable_cascade_stage_b"))
    stage_c = load_state_dict(parts["stable_cascade_stage_c"][0])
    prior = build_unet(stage_c, dtype)
    text_encoder = build_text_encoder(stage_c, dtype)
    image_encoder = build_image_encoder(stage_c, dtype)
    del stage_c
    stage_b = load_state_dict(parts["stable_cascade_stage_b"][0])
    decoder = build_unet(stage_b, dtype)
    vqgan = build_vqgan(stage_b)
    return pipeline_class()(prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                            vqgan=vqgan, scheduler=DDPMWuerstchenScheduler(), image_encoder=image_encoder)
