"""Z-Image-Turbo from the horde reference's split files, in ComfyUI's layouts, offline.

The parts (see `models/catalog.py` for the manifest that names them):
- `unet`: the diffusion transformer, ComfyUI's keys (fused qkv, `x_embedder`, `final_layer`), turned into
  diffusers' `ZImageTransformer2DModel` by diffusers' own single-file converter; its size is read from the
  tensors;
- `vae`: `ae.safetensors`, the Flux autoencoder in its original layout (`flux.build_vae`);
- `text_encoders`: `qwen_3_4b.safetensors`, Qwen3 in transformers' own names under `model.`; its tokenizer
  (with the chat template the pipeline applies) is downloaded beside it (`zimage_files`).

Sampling is the reference's: Euler over the flow-matching schedule of a model shifted by 3 ("normal", or
Karras' ramp for `karras: true`; the reference sets its scheduler from `karras` for every baseline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from horde_worker.inference.checkpoint import (
    CheckpointError,
    _count_indices,
    _load_exact,
    downloaded_tokenizer,
    skip_weight_init,
)
from horde_worker.inference.zimage_files import TOKENIZER_DIR, TOKENIZER_FILES

SHIFT = 3.0
TEXT_PREFIX = "model."
_TO_COMFY = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
             (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
             (".attention.norm_q.", ".attention.q_norm."))


def transformer_weights(comfy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Z-Image transformer tensors in diffusers' names (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy))


def comfy_from_transformer(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer's tensors in ComfyUI's layout (what the horde's file holds)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            stem = key.replace(".attention.to_q.weight", "")
            out[f"{stem}.attention.qkv.weight"] = torch.cat(
                [state[f"{stem}.attention.to_{part}.weight"] for part in "qkv"]).contiguous()
            continue
        for ours, theirs in _TO_COMFY:
            key = key.replace(ours, theirs)
        out[key] = tensor.contiguous()
    return out


def transformer_config(weights: dict[str, torch.Tensor]) -> dict:
    """The transformer's size, from its tensors (diffusers' names)."""
    keys = list(weights)
    dim, patch_in = weights["all_x_embedder.2-1.weight"].shape
    head_dim = int(weights["layers.0.attention.norm_q.weight"].shape[0])
    third, eighth = head_dim // 4, head_dim * 3 // 8
    return {
        "in_channels": int(patch_in) // 4, "dim": int(dim),
        "n_layers": len(_count_indices(keys, r"^layers\.(\d+)\.")),
        "n_refiner_layers": len(_count_indices(keys, r"^noise_refiner\.(\d+)\.")),
        "n_heads": int(dim) // head_dim, "n_kv_heads": int(weights["layers.0.attention.to_k.weight"].shape[0]) // head_dim,
        "cap_feat_dim": int(weights["cap_embedder.0.weight"].shape[0]),
        # The rotary axes split each head as the released model does (32/48/48 of 128).
        "axes_dims": [third, eighth, head_dim - third - eighth],
    }


def build_transformer(comfy: dict[str, torch.Tensor], dtype: torch.dtype):
    from diffusers import ZImageTransformer2DModel

    weights = transformer_weights(comfy)
    weights.pop("norm_final.weight", None)
    with skip_weight_init():
        model = ZImageTransformer2DModel(**transformer_config(weights))
    _load_exact(model, weights, "Z-Image transformer", dtype)
    return model


def build_text_encoder(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """Qwen3 (the transformers model without its language-model head) from `model.*` tensors."""
    from transformers import Qwen3Config, Qwen3Model

    weights = {k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    if not weights:
        raise CheckpointError("no Qwen3 text encoder (model.*) in the text encoder file")
    keys = list(weights)
    hidden = int(weights["embed_tokens.weight"].shape[1])
    head_dim = int(weights["layers.0.self_attn.q_norm.weight"].shape[0])
    config = Qwen3Config(
        vocab_size=int(weights["embed_tokens.weight"].shape[0]), hidden_size=hidden,
        intermediate_size=int(weights["layers.0.mlp.gate_proj.weight"].shape[0]),
        num_hidden_layers=len(_count_indices(keys, r"^layers\.(\d+)\.")), head_dim=head_dim,
        num_attention_heads=int(weights["layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
        num_key_value_heads=int(weights["layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True,
    )
    with skip_weight_init():
        model = Qwen3Model(config)
    _load_exact(model, weights, "Qwen3 text encoder", dtype)
    return model


def tokenizer(folder: Path):
    """The Qwen3 tokenizer and its chat template from `folder` (downloaded beside the text encoder)."""
    return downloaded_tokenizer(folder, TOKENIZER_FILES, "Z-Image (Qwen3)", with_chat_template=True)


def scheduler():
    """Flow-matching Euler that runs the sigmas it is given unchanged (`sigmas` computes them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def build_pipeline(manifest: Path, dtype: torch.dtype):
    """A diffusers ZImagePipeline from a split model's manifest."""
    from diffusers import ZImagePipeline

    from horde_worker.inference import flux
    from horde_worker.inference.checkpoint import load_state_dict
    from horde_worker.models.manifest import read_manifest

    _, parts = read_manifest(manifest, required=("unet", "vae", "text_encoders"))
    transformer = build_transformer(load_state_dict(parts["unet"][0]), dtype)
    vae_tensors = load_state_dict(parts["vae"][0])
    vae = flux.build_vae({flux.VAE_PREFIX + k: v for k, v in vae_tensors.items()})
    text_file = parts["text_encoders"][0]
    text_encoder = build_text_encoder(load_state_dict(text_file), dtype)
    return ZImagePipeline(scheduler=scheduler(), vae=vae.to(dtype), text_encoder=text_encoder,
                          tokenizer=tokenizer(text_file.parent / TOKENIZER_DIR), transformer=transformer)


def sigmas(steps: int, karras: bool) -> list[float]:
    """The reference's schedule for a job (normal, or Karras' with `karras`) without the final 0, which the
    scheduler adds."""
    from horde_worker.inference.schedules import flow_schedule

    return flow_schedule(SHIFT, steps, karras)[:-1]


def _start(pipe, request) -> torch.Tensor:
    """Each seed's start noise (float32, drawn on the CPU), in the pipeline's latent shape."""
    from horde_worker.inference.noise import start_noise

    scale = pipe.vae_scale_factor * 2
    shape = (len(request.seeds), pipe.transformer.in_channels, 2 * (request.height // scale),
             2 * (request.width // scale))
    return start_noise(request.seeds, shape)


def run(model, request, on_step=None) -> list[np.ndarray]:
    """The job's images, one per seed: txt2img, or img2img from its source image. Inpainting and ControlNet are
    not in this baseline's pipelines (the reference lists them as not supported)."""
    from horde_worker.inference import sources as sources_mod
    from horde_worker.inference.conditioning import plain_text
    from horde_worker.inference.decode import to_uint8
    from horde_worker.inference.generate import UnsupportedJob
    from horde_worker.inference.pipelines import derived_pipeline

    if request.control_type:
        raise UnsupportedJob("ControlNet is not available for Z-Image models")
    if request.tiling:
        raise UnsupportedJob("tiling is not available for Z-Image models")
    sources = sources_mod.load_sources(request)
    if sources.painting:
        raise UnsupportedJob("inpainting is not available for Z-Image models")
    pipe = model.pipeline
    count = len(request.seeds)
    steps = request.steps

    def step_end(_pipe, step: int, _timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(min(step + 1, steps), steps)
        return tensors

    common = {"prompt": [plain_text(request.prompt)] * count,
              "negative_prompt": [plain_text(request.negative_prompt or "")] * count,
              "height": request.height, "width": request.width, "guidance_scale": request.cfg_scale,
              "output_type": "np", "callback_on_step_end": step_end}
    own = derived_pipeline(pipe, scheduler=scheduler())  # this job's own scheduler state
    if sources.image is None:
        output = own(num_inference_steps=steps, sigmas=sigmas(steps, request.karras),
                     latents=_start(pipe, request).to(pipe.transformer.device), **common)
    else:
        # As for Flux: the last `steps` levels of the schedule made for int(steps / denoise) steps.
        denoise = min(1.0, max(0.01, request.denoising_strength or 0.75))
        total = max(steps, int(steps / denoise))
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in request.seeds]
        output = derived_pipeline(own, "img2img")(
            image=[sources.image] * count, strength=(steps - 0.5) / total, num_inference_steps=total,
            sigmas=sigmas(total, request.karras), generator=generators, **common)
    return to_uint8(output.images)
