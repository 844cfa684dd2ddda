"""Reading Stable Diffusion checkpoints without any hub.

A single-file checkpoint (the format the horde's model reference lists) only holds tensors.
The architecture is read back from the tensors' names and shapes, written as the original
LDM config that diffusers' own converters take, and the weights are converted by diffusers.
Scheduler and tokenizer come from files shipped in this package, so nothing is fetched.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")

# Latent scaling of the VAE each family was trained with.
VAE_SCALING = {"stable_diffusion_1": 0.18215, "stable_diffusion_2": 0.18215, "stable_diffusion_xl": 0.13025}


class CheckpointError(ValueError):
    """The file is not a checkpoint this worker can load; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the tensors of a checkpoint say about its architecture."""

    baseline: str
    ldm_config: dict[str, Any]
    prediction_type: str


class _SkipRandomInit(TorchFunctionMode):
    """Turns the random fills of weight initialisation into no-ops.

    A torch function mode is thread-local: it changes nothing for another thread that builds or runs
    modules meanwhile (the preload thread and the sampling thread both build modules), unlike patching
    torch.nn.init, which is process-wide and breaks when two threads patch and restore it out of order.
    Only random fills are skipped: zeros/ones/copies stay, as non-persistent buffers may be made by them.
    """

    # The tensor methods random initialisers end in, and the initialisers that dispatch to the mode before
    # reaching them: torch.nn.init's, or transformers' guarded copies of them, which transformers puts in
    # torch.nn.init's place while it initialises a model (so they are known by name, not identity).
    TENSOR_FILLS = (torch.Tensor.uniform_, torch.Tensor.normal_)
    INITIALISERS = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                              "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_"})
    INIT_MODULES = frozenset({"torch.nn.init", "transformers.initialization"})

    @classmethod
    def skipped(cls, func) -> bool:
        if func in cls.TENSOR_FILLS:
            return True
        return getattr(func, "__name__", None) in cls.INITIALISERS and getattr(func, "__module__", None) in cls.INIT_MODULES

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.skipped(func):
            return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        return func(*args, **kwargs)


def skip_weight_init() -> contextlib.AbstractContextManager:
    """Random initialisation is wasted on modules whose every weight is loaded next (and takes
    seconds for full-size models): skip it, in the calling thread only. `_load_exact` then insists
    that every weight was loaded."""
    return _SkipRandomInit()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: safetensors directly, `.ckpt` only through torch's weights-only
    unpickler, which refuses any file that would run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler names the forbidden global
            raise CheckpointError(f"{path.name} cannot be loaded safely (weights only): {exc}") from exc
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path.name}: unknown checkpoint format {path.suffix!r} (use .safetensors)")


def _count_indices(keys: list[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    found = set()
    for key in keys:
        match = regex.match(key)
        if match:
            found.add(int(match.group(1)))
    return found


def inspect_checkpoint(state_dict: dict[str, torch.Tensor]) -> CheckpointInfo:
    """Derive the LDM config of a Stable Diffusion checkpoint from its tensor shapes."""
    keys = list(state_dict)
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("no UNet weights (model.diffusion_model.*) found: not a Stable Diffusion checkpoint")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(state_dict[UNET_PREFIX + "out.2.weight"].shape[0])

    input_ids = _count_indices(keys, re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.")
    downsample_ids = sorted(_count_indices(keys, re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.0\.op\."))
    levels = len(downsample_ids) + 1
    num_res_blocks = (len(input_ids) - 1 - len(downsample_ids)) // levels

    channel_mult, attention_resolutions, transformer_depth = [], [], []
    context_dim = None
    linear_projection = False
    for level in range(levels):
        first = level * (num_res_blocks + 1) + 1
        out_weight = state_dict[f"{UNET_PREFIX}input_blocks.{first}.0.out_layers.3.weight"]
        channel_mult.append(int(out_weight.shape[0]) // model_channels)
        attn_prefix = f"{UNET_PREFIX}input_blocks.{first}.1."
        blocks = _count_indices(keys, re.escape(attn_prefix) + r"transformer_blocks\.(\d+)\.")
        transformer_depth.append(len(blocks))
        if blocks:
            attention_resolutions.append(2**level)
            context_dim = int(state_dict[attn_prefix + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
            linear_projection = state_dict[attn_prefix + "proj_in.weight"].ndim == 2

    adm_key = UNET_PREFIX + "label_emb.0.0.weight"
    is_xl = adm_key in state_dict
    if is_xl:
        baseline = "stable_diffusion_xl"
    elif linear_projection or (context_dim is not None and context_dim >= 1024):
        baseline = "stable_diffusion_2"
    else:
        baseline = "stable_diffusion_1"

    unet_params: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": model_channels,
        "channel_mult": channel_mult,
        "num_res_blocks": num_res_blocks,
        "attention_resolutions": attention_resolutions,
        "context_dim": context_dim,
        "use_linear_in_transformer": linear_projection,
        "transformer_depth": transformer_depth if is_xl else max(transformer_depth),
    }
    if baseline == "stable_diffusion_1":
        unet_params["num_heads"] = 8
    else:
        unet_params["num_head_channels"] = 64
    if is_xl:
        unet_params["num_classes"] = "sequential"
        unet_params["adm_in_channels"] = int(state_dict[adm_key].shape[1])

    vae_conv_in = state_dict.get(VAE_PREFIX + "encoder.conv_in.weight")
    if vae_conv_in is None:
        raise CheckpointError("no VAE weights (first_stage_model.*) found: the checkpoint is incomplete")
    ch = int(vae_conv_in.shape[0])
    vae_levels = sorted(_count_indices(keys, re.escape(VAE_PREFIX) + r"encoder\.down\.(\d+)\."))
    ch_mult = [
        int(state_dict[f"{VAE_PREFIX}encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in vae_levels
    ]
    vae_res_blocks = len(_count_indices(keys, re.escape(VAE_PREFIX) + r"encoder\.down\.0\.block\.(\d+)\."))
    ddconfig = {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": vae_res_blocks,
        "in_channels": int(vae_conv_in.shape[1]),
        "out_ch": int(state_dict[VAE_PREFIX + "decoder.conv_out.weight"].shape[0]),
        "z_channels": int(state_dict[VAE_PREFIX + "decoder.conv_in.weight"].shape[1]),
        "attn_resolutions": [],
    }
    # v-prediction checkpoints carry no marker in their tensors; the model reference says so instead.
    ldm_config = {
        "model": {
            "params": {
                "scale_factor": VAE_SCALING[baseline],
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }
    return CheckpointInfo(baseline=baseline, ldm_config=ldm_config, prediction_type="epsilon")


def build_unet(state_dict: dict[str, torch.Tensor], info: CheckpointInfo, sample_size: int = 512,
               dtype: torch.dtype | None = None):
    """Instantiate a diffusers UNet from an LDM state dict."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_unet_diffusers_config_from_ldm(info.ldm_config, state_dict, image_size=sample_size)
        if info.baseline == "stable_diffusion_xl":
            # diffusers recognises SDXL by its real context width; say it for any width.
            config.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
        if info.baseline == "stable_diffusion_2" and info.prediction_type == "v_prediction":
            config["upcast_attention"] = True  # SD2's 768-v models overflow fp16 attention otherwise
        weights = sfu.convert_ldm_unet_checkpoint(state_dict, config)
    with skip_weight_init():
        unet = UNet2DConditionModel(**config)
    _load_exact(unet, weights, "UNet", dtype)
    return unet


def build_vae(state_dict: dict[str, torch.Tensor], info: CheckpointInfo, sample_size: int = 512,
              dtype: torch.dtype | None = None):
    """Instantiate a diffusers AutoencoderKL from an LDM state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sfu.create_vae_diffusers_config_from_ldm(info.ldm_config, state_dict, image_size=sample_size)
        weights = sfu.convert_ldm_vae_checkpoint(state_dict, config)
    with skip_weight_init():
        vae = AutoencoderKL(**config)
    _load_exact(vae, weights, "VAE", dtype)
    return vae


def build_clip_text_encoder(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = CLIP_PREFIXES,
                            dtype: torch.dtype | None = None):
    """Instantiate a CLIP-L text encoder (SD1, SDXL's first) from an LDM state dict, dimensions read off the tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    weights = {}
    for key, tensor in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if not name.startswith("text_model."):
                    name = "text_model." + name
                weights[name] = tensor
    if not weights:
        raise CheckpointError("no CLIP text encoder (cond_stage_model.transformer.*) found in the checkpoint")
    token_embedding = weights["text_model.embeddings.token_embedding.weight"]
    layers = _count_indices(list(weights), r"text_model\.encoder\.layers\.(\d+)\.")
    hidden = int(token_embedding.shape[1])
    config = CLIPTextConfig(
        vocab_size=int(token_embedding.shape[0]),
        hidden_size=hidden,
        intermediate_size=int(weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(layers),
        # CLIP text towers use 64-dimensional heads (L: 12 heads of 64).
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=int(weights["text_model.embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu",
    )
    weights.pop("text_model.embeddings.position_ids", None)
    with skip_weight_init():
        model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers 5 names the tower's tensors without the `text_model.` level.
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    _load_exact(model, weights, "text encoder", dtype)
    return model


def build_open_clip_text_encoder(state_dict: dict[str, torch.Tensor], prefix: str, with_projection: bool,
                                 drop_last_layer: bool, dtype: torch.dtype | None = None):
    """Instantiate an OpenCLIP text tower (SD2's ViT-H, SDXL's bigG) as a transformers CLIP text model.

    SD2 uses the penultimate layer's output, so its last block is dropped (`drop_last_layer`).
    """
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"no OpenCLIP text encoder ({prefix}*) found in the checkpoint")
    blocks = sorted(_count_indices(keys, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    if drop_last_layer:
        last = f"{prefix}transformer.resblocks.{blocks[-1]}."
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(last)}
        blocks = blocks[:-1]
    token_embedding = state_dict[prefix + "token_embedding.weight"]
    hidden = int(token_embedding.shape[1])
    projection = state_dict.get(prefix + "text_projection")
    config = CLIPTextConfig(
        vocab_size=int(token_embedding.shape[0]), hidden_size=hidden,
        intermediate_size=int(state_dict[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=len(blocks), num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=int(state_dict[prefix + "positional_embedding"].shape[0]), hidden_act="gelu",
        projection_dim=int(projection.shape[1]) if projection is not None else hidden,
    )
    with skip_weight_init():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = sfu.convert_open_clip_checkpoint(model, state_dict, prefix=prefix)
    if not with_projection:
        weights.pop("text_projection.weight", None)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    _load_exact(model, weights, "text encoder", dtype)
    return model


def _load_exact(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str,
                dtype: torch.dtype | None = None) -> None:
    """Every weight of `module` from `weights`. With `dtype`, the tensors are converted to it and taken as the
    module's own (no copy into the module's float32 storage, which was never touched: it is freed unfilled), so
    a half-precision model never exists in float32."""
    if dtype is not None:
        weights = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    missing, unexpected = module.load_state_dict(weights, strict=False, assign=dtype is not None)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{what} weights missing from the checkpoint: {missing[:5]} ({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{what}: tensors the architecture does not have: {unexpected[:5]}")


def downloaded_tokenizer(folder: Path, files: tuple[str, ...], what: str, with_chat_template: bool = False):
    """A fast tokenizer from `tokenizer.json` and `tokenizer_config.json` in `folder` (the Qwen-family tokenizers
    the worker downloads beside a text encoder): its end and pad tokens from the config, padded on the right,
    with the config's chat template when `with_chat_template`."""
    import json

    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    missing = [name for name in files if not (folder / name).exists()]
    if missing:
        raise CheckpointError(f"{what} needs its tokenizer's {', '.join(missing)} in {folder}; the worker downloads "
                              "them with the model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    extra = {}
    if with_chat_template:
        if not config.get("chat_template"):
            raise CheckpointError(f"{folder}/tokenizer_config.json has no chat_template")
        extra["chat_template"] = config["chat_template"]
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   eos_token=config.get("eos_token") or "<|im_end|>",
                                   pad_token=config.get("pad_token") or "<|endoftext|>", padding_side="right", **extra)
