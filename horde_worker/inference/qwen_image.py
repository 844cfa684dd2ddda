"""Qwen-Image from the horde reference's split files, in ComfyUI's layouts, offline.

The parts (named by the manifest `models/catalog.py` writes):
- `unet`: the 20-billion-parameter diffusion transformer in diffusers' own names, its linear weights in fp8
  e4m3 (kept so on the GPU and widened per layer, as Flux's are); its size is read from the tensors;
- `vae`: the Wan 2.1-layout autoencoder, turned into diffusers' `AutoencoderKLQwenImage` by diffusers' own Wan
  converter;
- `text_encoders`: Qwen2.5-VL 7B in ComfyUI's scaled fp8 (`scaled_fp8.py`): only its language model is built
  (the vision tower is for image editing, which this baseline does not do); the tokenizer is downloaded
  beside it (`qwen_files`).

Sampling is the reference's: Euler over the flow-matching schedule of a model shifted by SHIFT ("normal", or Karras'
ramp for `karras: true`: the reference sets its scheduler from `karras` for every baseline), with
plain classifier-free guidance whenever cfg is above 1 (the empty negative prompt included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from horde_worker.inference import scaled_fp8
from horde_worker.inference.checkpoint import (
    CheckpointError,
    _count_indices,
    _load_exact,
    downloaded_tokenizer,
    skip_weight_init,
)
from horde_worker.inference.qwen_files import TOKENIZER_DIR, TOKENIZER_FILES

SHIFT = 3.1
TEXT_PREFIX = "model."
# Every Qwen2.5 language model has heads of 128 (their number is not in the tensors' shapes).
TEXT_HEAD_DIM = 128
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8_PROBE = "transformer_blocks.0.img_mlp.net.0.proj.weight"


# --- transformer -------------------------------------------------------------------------------------------
def transformer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's tensors without a checkpoint prefix, if the file has one."""
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return dict(tensors)


def transformer_config(weights: dict[str, torch.Tensor]) -> dict:
    """The transformer's size, from its tensors."""
    inner, in_channels = weights["img_in.weight"].shape
    head_dim = int(weights["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    patch = 2
    return {
        "patch_size": patch, "in_channels": int(in_channels),
        "out_channels": int(weights["proj_out.weight"].shape[0]) // (patch * patch),
        "num_layers": len(_count_indices(list(weights), r"^transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim, "num_attention_heads": int(inner) // head_dim,
        "joint_attention_dim": int(weights["txt_in.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in weights,
        # Rotary axes (frame, height, width) split each head 16/56/56 of 128 in the released model.
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }


def build_transformer(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    from diffusers import QwenImageTransformer2DModel

    weights = transformer_tensors(tensors)
    with skip_weight_init():
        model = QwenImageTransformer2DModel(**transformer_config(weights))
    _load_exact(model, weights, "Qwen-Image transformer", dtype)
    return model


def stored_in_fp8(tensors: dict[str, torch.Tensor]) -> bool:
    probe = transformer_tensors(tensors).get(FP8_PROBE)
    return probe is not None and probe.dtype == torch.float8_e4m3fn


# --- VAE: the Wan 2.1 layout <-> diffusers ------------------------------------------------------------------
_RESIDUAL = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
             ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_FIXED = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
          "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.gamma": "encoder.head.0.gamma",
          "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.gamma": "decoder.head.0.gamma",
          "decoder.conv_out.": "decoder.head.2.", "encoder.mid_block.attentions.0.": "encoder.middle.1.",
          "decoder.mid_block.attentions.0.": "decoder.middle.1."}


def _residual(rest: str) -> str:
    for ours, theirs in _RESIDUAL:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest


def wan_vae_key(key: str) -> str:
    """A diffusers `AutoencoderKLQwenImage` tensor name in the original (Wan 2.1) layout: the inverse of
    diffusers' `convert_wan_vae_to_diffusers`, for writing files in the layout the horde's file has."""
    for ours, theirs in _FIXED.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    parts = key.split(".")
    if parts[1] == "mid_block":  # <side>.mid_block.resnets.<r>.<rest>
        return f"{parts[0]}.middle.{2 * int(parts[3])}.{_residual('.'.join(parts[4:]))}"
    if parts[1] == "down_blocks":
        return f"encoder.downsamples.{parts[2]}.{_residual('.'.join(parts[3:]))}"
    if parts[1] == "up_blocks":  # decoder.up_blocks.<b>.(resnets.<r>|upsamplers.0).<rest>
        block = int(parts[2])
        index = 4 * block + (int(parts[4]) if parts[3] == "resnets" else 3)
        return f"decoder.upsamples.{index}.{_residual('.'.join(parts[5:]))}"
    raise KeyError(f"no Wan layout name for {key}")


def build_vae(tensors: dict[str, torch.Tensor]):
    """The autoencoder (float32) from the Wan-layout file, through diffusers' converter."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    weights = convert_wan_vae_to_diffusers(dict(tensors))
    if "encoder.conv_in.weight" not in weights:
        raise CheckpointError("the VAE file is not in the Wan 2.1 layout Qwen-Image uses")
    config = {"base_dim": int(weights["encoder.conv_in.weight"].shape[0]),
              "z_dim": int(weights["post_quant_conv.weight"].shape[0])}
    with skip_weight_init():
        vae = AutoencoderKLQwenImage(**config)
    _load_exact(vae, {k: v.float() for k, v in weights.items()}, "Qwen-Image VAE")
    return vae


# --- text encoder ----------------------------------------------------------------------------------------
def text_config(weights: dict[str, torch.Tensor]):
    """The language model's config, from its tensors (without the `model.` prefix)."""
    from transformers import Qwen2_5_VLTextConfig

    hidden = int(weights["embed_tokens.weight"].shape[1])
    return Qwen2_5_VLTextConfig(
        vocab_size=int(weights["embed_tokens.weight"].shape[0]), hidden_size=hidden,
        intermediate_size=int(weights["layers.0.mlp.gate_proj.weight"].shape[0]),
        num_hidden_layers=len(_count_indices(list(weights), r"^layers\.(\d+)\.")),
        num_attention_heads=hidden // TEXT_HEAD_DIM,
        num_key_value_heads=int(weights["layers.0.self_attn.k_proj.weight"].shape[0]) // TEXT_HEAD_DIM,
        rms_norm_eps=1e-6, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope(TEXT_HEAD_DIM)},
    )


def build_text_encoder(tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """Qwen2.5-VL's language model (transformers' `Qwen2_5_VLTextModel`) from `model.*` tensors; linear layers
    the file stores as scaled fp8 stay so (`scaled_fp8.ScaledFp8Linear`). The vision tower (`visual.*`) and
    the language-model head are not needed to encode a prompt and are not built."""
    from transformers import Qwen2_5_VLTextModel

    weights, scales = scaled_fp8.split_scales(tensors)
    weights = {k[len(TEXT_PREFIX):]: v for k, v in weights.items() if k.startswith(TEXT_PREFIX)}
    scales = {k[len(TEXT_PREFIX):]: v for k, v in scales.items() if k.startswith(TEXT_PREFIX)}
    if "embed_tokens.weight" not in weights:
        raise CheckpointError("no Qwen2.5-VL language model (model.*) in the text encoder file")
    with skip_weight_init():
        model = Qwen2_5_VLTextModel(text_config(weights))
    rest = scaled_fp8.install(model, weights, scales, dtype)
    rest = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in rest.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(f"{layer}.") for layer in scales)]
    if missing or unexpected:
        raise CheckpointError(f"Qwen2.5-VL text encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _mrope(head_dim: int) -> list[int]:
    """The multimodal rotary sections (16/24/24 of a 128 head's 64 frequencies); text alone uses one position
    for all three, so only their sum matters."""
    half = head_dim // 2
    first = half // 4
    return [first, (half - first) // 2, half - first - (half - first) // 2]


def tokenizer(folder: Path):
    """The Qwen2.5-VL tokenizer from `folder` (downloaded beside the text encoder)."""
    return downloaded_tokenizer(folder, TOKENIZER_FILES, "Qwen-Image (Qwen2.5-VL)")


def build_pipeline(manifest: Path, dtype: torch.dtype):
    """(a diffusers QwenImagePipeline from a split model's manifest, whether its transformer is stored in fp8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from horde_worker.inference.checkpoint import load_state_dict
    from horde_worker.models.manifest import read_manifest

    _, parts = read_manifest(manifest, required=("unet", "vae", "text_encoders"))
    tensors = load_state_dict(parts["unet"][0])
    fp8 = stored_in_fp8(tensors)
    transformer = build_transformer(tensors, dtype)
    del tensors
    vae = build_vae(load_state_dict(parts["vae"][0]))
    text_file = parts["text_encoders"][0]
    text_encoder = build_text_encoder(load_state_dict(text_file), dtype)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
        vae=vae.to(dtype), text_encoder=text_encoder, tokenizer=tokenizer(text_file.parent / TOKENIZER_DIR),
        transformer=transformer)
    # The text encoder's scaled layers are fp8 already and must not be widened by a dtype move.
    pipe.fp8_parts = {"transformer", "text_encoder"} if fp8 else {"text_encoder"}
    return pipe, fp8


# --- sampling ----------------------------------------------------------------------------------------------
def sigmas(steps: int, karras: bool) -> list[float]:
    """The reference's schedule for a job: normal, or Karras' with `karras`; then 0."""
    from horde_worker.inference.schedules import flow_schedule

    return flow_schedule(SHIFT, steps, karras)


def _encode(pipe, text: str, count: int, device: torch.device, dtype: torch.dtype):
    """The prompt's embeddings for `count` images, and their mask (None when every position counts)."""
    embeds, mask = pipe.encode_prompt([text], device=device)
    return embeds.to(dtype).repeat(count, 1, 1), None if mask is None else mask.repeat(count, 1)


def _source_latents(pipe, image, count: int, rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """The source image's normalised latents (the encoder's mean, as the reference encodes), packed."""
    from PIL import Image

    vae = pipe.vae
    size = (columns * pipe.vae_scale_factor, rows * pipe.vae_scale_factor)
    pixels = np.asarray(image if image.size == size else image.resize(size, Image.Resampling.LANCZOS),
                        dtype=np.float32)
    tensor = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None, :, None].to(device, vae.dtype)
    latent = vae.encode(tensor).latent_dist.mode()[:, :, 0].float()
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1)
    latent = ((latent - mean) / std).repeat(count, 1, 1, 1)
    return pipe._pack_latents(latent, count, latent.shape[1], rows, columns)


def _decode(pipe, packed: torch.Tensor, height: int, width: int) -> np.ndarray:
    vae = pipe.vae
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor).float()
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
    images = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
    return ((images.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()


def run(model, request, on_step=None) -> list[np.ndarray]:
    """The job's images, one per seed: txt2img, or img2img from its source image. Inpainting and ControlNet are
    not part of this baseline (the reference lists them as not supported)."""
    from horde_worker.inference import sources as sources_mod
    from horde_worker.inference.conditioning import plain_text
    from horde_worker.inference.decode import to_uint8
    from horde_worker.inference.generate import UnsupportedJob
    from horde_worker.inference.noise import start_noise

    if request.control_type:
        raise UnsupportedJob("ControlNet is not available for Qwen-Image models")
    if request.tiling:
        raise UnsupportedJob("tiling is not available for Qwen-Image models")
    sources = sources_mod.load_sources(request)
    if sources.painting:
        raise UnsupportedJob("inpainting is not available for Qwen-Image models")
    pipe = model.pipeline
    transformer = pipe.transformer
    device, dtype = transformer.img_in.weight.device, transformer.dtype
    count, steps = len(request.seeds), request.steps
    rows = 2 * (request.height // (pipe.vae_scale_factor * 2))
    columns = 2 * (request.width // (pipe.vae_scale_factor * 2))
    channels = transformer.config.in_channels // 4
    guided = request.cfg_scale > 1
    with torch.inference_mode():
        positive, positive_mask = _encode(pipe, plain_text(request.prompt), count, device, dtype)
        if guided:
            negative, negative_mask = _encode(pipe, plain_text(request.negative_prompt or ""), count, device, dtype)
        noise = start_noise(request.seeds, (count, channels, rows, columns))
        x = pipe._pack_latents(noise, count, channels, rows, columns).to(device)
        if sources.image is None:
            schedule = sigmas(steps, request.karras)
        else:
            # As for Flux: the last `steps` levels of the schedule made for int(steps / denoise) steps, the source
            # noised to the first of them.
            denoise = min(1.0, max(0.01, request.denoising_strength or 0.75))
            schedule = sigmas(max(steps, int(steps / denoise)), request.karras)[-(steps + 1):]
            clean = _source_latents(pipe, sources.image, count, rows, columns, device)
            x = schedule[0] * x + (1 - schedule[0]) * clean
        shapes = [[(1, rows // 2, columns // 2)]] * count
        for index, (sigma, following) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
            timestep = torch.full((count,), sigma, device=device, dtype=dtype)

            def velocity(embeds, mask, x=x, timestep=timestep):
                return transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds,
                                   encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0].float()

            v = velocity(positive, positive_mask)
            if guided:
                unguided = velocity(negative, negative_mask)
                v = unguided + request.cfg_scale * (v - unguided)
            x = x + (following - sigma) * v
            if on_step is not None:
                on_step(index + 1, steps)
        return to_uint8(_decode(pipe, x, request.height, request.width))
