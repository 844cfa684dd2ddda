"""Flux.1 (schnell and dev) from one all-in-one checkpoint, as the horde's reference ships it.

The file holds four parts under prefixes: `model.diffusion_model.` (the transformer in Black
Forest Labs' layout, often fp8), `text_encoders.clip_l.transformer.` (CLIP-L),
`text_encoders.t5xxl.transformer.` (T5-XXL encoder) and `vae.` (the 16-channel autoencoder).
The transformer's layout is mapped onto diffusers' by name, with widths read off the tensors.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from horde_worker.inference.checkpoint import CheckpointError, _count_indices, _load_exact, skip_weight_init
from horde_worker.inference.flux_files import T5_TOKENIZER_DIR, T5_TOKENIZER_URL

TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
ASSETS = Path(__file__).parent / "assets" / "schedulers"


def is_flux(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(TRANSFORMER_PREFIX + "double_blocks.") or k.startswith("double_blocks.")
               for k in state_dict)


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); diffusers' is (scale, shift)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# (BFL name, diffusers name) inside each double block; "qkv" entries are split in three.
_DOUBLE = [
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [("modulation.lin", "norm.linear"), ("linear2", "proj_out")]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
_TOP = [
    ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
]


def _one_to_one(doubles: list[int], singles: list[int]):
    """(BFL tensor name, diffusers tensor name) for every tensor that maps unchanged."""
    pairs = list(_TOP)
    pairs += [(f"double_blocks.{i}.{a}", f"transformer_blocks.{i}.{b}") for i in doubles for a, b in _DOUBLE]
    pairs += [(f"single_blocks.{i}.{a}", f"single_transformer_blocks.{i}.{b}") for i in singles for a, b in _SINGLE]
    for src, dst in pairs:
        for kind in ("weight", "bias"):
            yield f"{src}.{kind}", f"{dst}.{kind}"
    for i in doubles:
        for a, b in _DOUBLE_NORMS:
            yield f"double_blocks.{i}.{a}", f"transformer_blocks.{i}.{b}"
    for i in singles:
        for a, b in _SINGLE_NORMS:
            yield f"single_blocks.{i}.{a}", f"single_transformer_blocks.{i}.{b}"


def _fused(doubles: list[int], singles: list[int]):
    """(BFL tensor name, the diffusers tensors it concatenates, in order). All but the last part are
    `inner` rows wide: q, k, v of the attention, then (in single blocks) the MLP's input."""
    for kind in ("weight", "bias"):
        for i in doubles:
            dst = f"transformer_blocks.{i}.attn."
            yield f"double_blocks.{i}.img_attn.qkv.{kind}", [f"{dst}{n}.{kind}" for n in ("to_q", "to_k", "to_v")]
            yield f"double_blocks.{i}.txt_attn.qkv.{kind}", [
                f"{dst}{n}.{kind}" for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
        for i in singles:
            yield f"single_blocks.{i}.linear1.{kind}", [
                f"single_transformer_blocks.{i}.{n}.{kind}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]


def transformer_weights_from_bfl(bfl: dict[str, torch.Tensor], inner: int) -> dict[str, torch.Tensor]:
    """BFL-layout transformer tensors (no prefix) in diffusers' names."""
    doubles = sorted(_count_indices(list(bfl), r"double_blocks\.(\d+)\."))
    singles = sorted(_count_indices(list(bfl), r"single_blocks\.(\d+)\."))
    out = {dst: bfl[src] for src, dst in _one_to_one(doubles, singles) if src in bfl}
    for src, parts in _fused(doubles, singles):
        fused = bfl[src]
        sizes = [inner] * (len(parts) - 1) + [fused.shape[0] - inner * (len(parts) - 1)]
        out.update(zip(parts, torch.split(fused, sizes, dim=0), strict=True))
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = _swap_halves(bfl[f"final_layer.adaLN_modulation.1.{kind}"])
    return out


def bfl_from_transformer(model) -> dict[str, torch.Tensor]:
    """The inverse mapping, for writing test checkpoints in the layout real files have."""
    state = model.state_dict()
    doubles, singles = list(range(model.config.num_layers)), list(range(model.config.num_single_layers))
    out = {src: state[dst] for src, dst in _one_to_one(doubles, singles) if dst in state}
    for src, parts in _fused(doubles, singles):
        out[src] = torch.cat([state[p] for p in parts])
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    return out


def build_transformer(state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """The Flux transformer, widths read off the tensors; fp8 weights are widened to `dtype`."""
    from diffusers import FluxTransformer2DModel

    prefix = TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in state_dict) else ""
    bfl = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)} if prefix else dict(state_dict)
    bfl = {k: v for k, v in bfl.items() if not k.startswith(("text_encoders.", "vae.", "first_stage_model."))}
    img_in = bfl["img_in.weight"]
    inner, in_channels = int(img_in.shape[0]), int(img_in.shape[1])
    head_dim = int(bfl["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0])
    config = {
        "in_channels": in_channels,
        "num_layers": len(_count_indices(list(bfl), r"double_blocks\.(\d+)\.")),
        "num_single_layers": len(_count_indices(list(bfl), r"single_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": int(bfl["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(bfl["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in bfl,
        # RoPE splits each head over (index, height, width): 16/56/56 of 128 in Flux.1.
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }
    weights = {k: v.to(dtype) for k, v in transformer_weights_from_bfl(bfl, inner).items()}
    with skip_weight_init():
        model = FluxTransformer2DModel(**config)
    _load_exact(model, weights, "Flux transformer")
    return model


def build_t5(state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """The T5 encoder, its size read off the tensors."""
    from transformers import T5Config, T5EncoderModel

    weights = {k[len(T5_PREFIX):]: v.to(dtype) for k, v in state_dict.items() if k.startswith(T5_PREFIX)}
    if not weights:
        raise CheckpointError("no T5 text encoder (text_encoders.t5xxl.transformer.*) in the checkpoint")
    shared = weights.get("shared.weight", weights.get("encoder.embed_tokens.weight"))
    bias = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = int(bias.shape[1])
    config = T5Config(
        vocab_size=int(shared.shape[0]), d_model=int(shared.shape[1]),
        d_kv=int(weights["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads,
        d_ff=int(weights["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
        num_layers=len(_count_indices(list(weights), r"encoder\.block\.(\d+)\.")), num_heads=heads,
        relative_attention_num_buckets=int(bias.shape[0]), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    weights["shared.weight"] = shared
    weights["encoder.embed_tokens.weight"] = shared
    with skip_weight_init():
        model = T5EncoderModel(config)
    _load_exact(model, weights, "T5 text encoder")
    return model


def build_vae(state_dict: dict[str, torch.Tensor]):
    """Flux's 16-channel autoencoder (no quant convolutions), from `vae.*` tensors."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    tensors = {"first_stage_model." + k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    if not tensors:
        raise CheckpointError("no VAE (vae.*) in the checkpoint")
    ch = int(tensors["first_stage_model.encoder.conv_in.weight"].shape[0])
    levels = sorted(_count_indices(list(tensors), r"first_stage_model\.encoder\.down\.(\d+)\."))
    blocks = [int(tensors[f"first_stage_model.encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    config = {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
        "up_block_types": ["UpDecoderBlock2D"] * len(blocks), "block_out_channels": blocks,
        "latent_channels": int(tensors["first_stage_model.decoder.conv_in.weight"].shape[1]),
        "layers_per_block": len(_count_indices(list(tensors), r"first_stage_model\.encoder\.down\.0\.block\.(\d+)\.")),
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
        "sample_size": 1024,
    }
    assert ch == blocks[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = sfu.convert_ldm_vae_checkpoint(tensors, config)
    with skip_weight_init():
        vae = AutoencoderKL(**config)
    _load_exact(vae, {k: v.float() for k, v in weights.items()}, "Flux VAE")
    return vae


def t5_tokenizer(folder: Path):
    """The T5 tokenizer from `folder/tokenizer.json` (downloaded beside the checkpoints)."""
    from transformers import T5TokenizerFast

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"Flux needs the T5 tokenizer at {path}; the worker downloads it with the model "
                              f"(or fetch {T5_TOKENIZER_URL} there)")
    return T5TokenizerFast(tokenizer_file=str(path), eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def scheduler_config(guidance_distilled: bool) -> dict:
    """diffusers' flow-matching Euler, told to run the sigmas it is given unchanged (`schedule` below
    computes them as the reference does)."""
    return json.loads((ASSETS / ("flux_dev.json" if guidance_distilled else "flux_schnell.json")).read_text())


def build_pipeline(state_dict: dict[str, torch.Tensor], checkpoint_path: Path, dtype: torch.dtype):
    """A diffusers FluxPipeline from an all-in-one state dict."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from horde_worker.inference.checkpoint import build_clip_text_encoder
    from horde_worker.inference.pipelines import clip_tokenizer

    transformer = build_transformer(state_dict, dtype)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(transformer.config.guidance_embeds)),
        vae=build_vae(state_dict), text_encoder=build_clip_text_encoder(state_dict, (CLIP_PREFIX,)),
        tokenizer=clip_tokenizer(), text_encoder_2=build_t5(state_dict, dtype),
        tokenizer_2=t5_tokenizer(Path(checkpoint_path).parent / T5_TOKENIZER_DIR), transformer=transformer,
    )
    pipe.fp8_parts = stored_in_fp8(state_dict)
    return pipe, bool(pipe.fp8_parts)


def stored_in_fp8(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Which of transformer / T5 the file keeps in fp8 (the horde's Flux checkpoints keep both)."""
    parts = set()
    probes = {"transformer": TRANSFORMER_PREFIX + "double_blocks.0.img_attn.qkv.weight",
              "t5": T5_PREFIX + "encoder.block.0.layer.0.SelfAttention.q.weight"}
    for part, key in probes.items():
        if key in state_dict and state_dict[key].dtype == torch.float8_e4m3fn:
            parts.add(part)
    return parts


def move_keeping_fp8(pipe, device: torch.device, dtype: torch.dtype) -> None:
    """Keep the transformer's and T5's weights in fp8 on the GPU and widen each layer only while it computes:
    about half the memory of bf16, and no precision is lost because the file held fp8 already. They are
    narrowed before the move, so the GPU never holds the wide copy."""
    from diffusers.hooks import apply_layerwise_casting

    parts = getattr(pipe, "fp8_parts", {"transformer", "t5"})
    narrow = []
    if "transformer" in parts:
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        narrow.append(pipe.transformer)
    if "t5" in parts:
        # T5's feed-forward casts its input to the dtype of `wo`'s weight, so `wo` keeps the compute dtype.
        apply_layerwise_casting(pipe.text_encoder_2, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                skip_modules_pattern=("norm", "wo", "shared", "embed", "relative_attention_bias"))
        narrow.append(pipe.text_encoder_2)
    if "text_encoder" in parts:  # a text encoder of scaled fp8 layers (scaled_fp8.py), narrow already
        narrow.append(pipe.text_encoder)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            if any(component is kept for kept in narrow):
                component.to(device)
            else:
                component.to(device=device, dtype=dtype)


# --- the reference's Flux schedule ----------------------------------------------------------------
# Flux.1 dev samples flow-matching sigmas shifted by a fixed mu of 1.15 (a table of 10000 levels),
# schnell unshifted (1000 levels). The reference's "normal" schedule spaces its timesteps evenly between
# the table's ends and maps them through the shift once more; it does not change with the image size.
DEV_SHIFT = 1.15


def uses_true_cfg(request) -> bool:
    """A negative prompt with cfg > 1 asks for true classifier-free guidance: two transformer passes a step."""
    return bool(request.negative_prompt) and request.cfg_scale > 1


def flow_sigma(t: float, distilled: bool) -> float:
    """The noise level of a Flux model at timestep `t` in (0, 1]."""
    if not distilled:
        return t
    return math.exp(DEV_SHIFT) / (math.exp(DEV_SHIFT) + (1 / t - 1))


def flow_sigmas(steps: int, distilled: bool) -> list[float]:
    """The reference's normal schedule for a Flux model, without the final 0."""
    lowest = flow_sigma(1 / 10000, True) if distilled else 1 / 1000
    return [flow_sigma(float(t), distilled) for t in np.linspace(1.0, lowest, steps, dtype=np.float32)]


def schedule(pipeline, steps: int, denoise: float | None, seeds: list[int], width: int,
             height: int) -> tuple[int, dict]:
    """(num_inference_steps, extra pipeline arguments) that make a diffusers Flux pipeline run the
    reference's sigmas: all of them from pure noise (drawn in float32 from each seed), or from an image the
    last `steps` of the schedule made for int(steps / denoise) steps."""
    from horde_worker.inference.noise import start_noise

    distilled = bool(pipeline.transformer.config.guidance_embeds)
    if denoise is not None and denoise <= 0.9999:
        total = int(steps / denoise)
        # diffusers keeps the last int(total - total * strength) steps: this strength keeps exactly `steps`.
        return total, {"sigmas": flow_sigmas(total, distilled), "strength": (steps - 0.5) / total}
    channels = pipeline.transformer.config.in_channels // 4
    rows, columns = 2 * (height // (pipeline.vae_scale_factor * 2)), 2 * (width // (pipeline.vae_scale_factor * 2))
    noise = start_noise(seeds, (len(seeds), channels, rows, columns))
    packed = pipeline._pack_latents(noise, len(seeds), channels, rows, columns)
    extra: dict = {"sigmas": flow_sigmas(steps, distilled)}
    if denoise is None:
        extra["latents"] = packed.to(pipeline.transformer.device, pipeline.transformer.dtype)
    else:
        extra["strength"] = 1.0
    return steps, extra
