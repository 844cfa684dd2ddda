"""Loading Stable Diffusion pipelines offline and running a horde job through them.

A job's run through a loaded pipeline is `inference/generate.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from horde_worker.inference import checkpoint
from horde_worker.inference.fit import FittedModel
from horde_worker.inference.samplers import scheduler_config
from horde_worker.models.manifest import SUFFIX as MANIFEST_SUFFIX

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer from the files shipped in the package. OpenCLIP towers (SD2, SDXL's second)
    use the same vocabulary but pad with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"),
        str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )


@dataclass
class LoadedModel:
    """A pipeline resident on the slot's device."""

    name: str
    baseline: str
    pipeline: Any
    load_seconds: float
    # The training noise schedule; every job's sampler starts from it, not from the last job's.
    scheduler_config: dict[str, Any]
    # ControlNets built for this model's UNet, by file path (see inference/control.py).
    controlnets: dict[str, Any] = field(default_factory=dict)
    # The one-copy layouts of its components' weights for moves between RAM and a GPU (inference/transfer.py),
    # by component name, once it has been to a GPU.
    weights: dict[str, Any] = field(default_factory=dict)
    # How it runs on a card smaller than it and its job (inference/fit.py).
    fit: FittedModel = field(default_factory=FittedModel)


def load_pipeline(path: Path, device: torch.device, dtype: torch.dtype, name: str = "",
                  v_prediction: bool = False) -> LoadedModel:
    """Load a single-file checkpoint or a diffusers folder onto `device` without contacting any hub.

    `v_prediction` comes from the model reference: the tensors of SD2's 768-v models do not say it.
    """
    start = time.perf_counter()
    path = Path(path)
    fp8 = False
    if path.is_dir():
        pipe, baseline = _load_folder(path)
    elif path.name.endswith(MANIFEST_SUFFIX):  # a split model: its parts are separate files
        pipe, baseline, fp8 = _load_split(path, dtype)
    else:
        pipe, baseline, fp8 = _load_single_file(path, v_prediction, dtype)
    if baseline in BF16_BASELINES and dtype == torch.float16:
        dtype = torch.bfloat16  # these overflow fp16
    if fp8 and dtype != torch.float32:
        # A half-precision run is a GPU run, even when the residency reads the model into RAM first: narrow
        # now, so that the later module-by-module move to the GPU carries fp8 weights.
        from horde_worker.inference.flux import move_keeping_fp8

        move_keeping_fp8(pipe, device, dtype)
    else:
        pipe = pipe.to(device=device, dtype=dtype)
    if device.type == "cuda" and getattr(pipe, "vae", None) is not None:
        run_vae_in(pipe.vae, vae_dtype(device, pipe.vae.dtype))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # Modules built from a config start in training mode: their dropout would make every image random.
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    apply_speedups(pipe, device)
    return LoadedModel(name=name or path.stem, baseline=baseline, pipeline=pipe,
                       load_seconds=time.perf_counter() - start, scheduler_config=dict(pipe.scheduler.config))


# Baselines computed in bf16 on a GPU (fp16 overflows them), as the reference runs them.
BF16_BASELINES = frozenset({"flux_1", "z_image_turbo", "qwen_image", "stable_cascade"})


def _load_split(path: Path, dtype: torch.dtype):
    """(pipeline, baseline, whether parts of it stay in fp8) of a split model's manifest."""
    from horde_worker.models.manifest import read_manifest

    baseline, _ = read_manifest(path)
    load_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    if baseline == "z_image_turbo":
        from horde_worker.inference import zimage

        return zimage.build_pipeline(path, load_dtype), baseline, False
    if baseline == "qwen_image":
        from horde_worker.inference import qwen_image

        pipe, _ = qwen_image.build_pipeline(path, load_dtype)
        return pipe, baseline, bool(pipe.fp8_parts)
    if baseline == "stable_cascade":
        from horde_worker.inference import cascade

        return cascade.build_pipeline(path, load_dtype), baseline, False
    raise checkpoint.CheckpointError(f"{path}: {baseline} models are not supported by this worker")


def _load_folder(path: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not (path / "model_index.json").exists():
        raise checkpoint.CheckpointError(f"{path} is a folder without model_index.json: not a diffusers model")
    is_xl = (path / "text_encoder_2").exists()
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    extra: dict[str, Any] = {}
    if not (path / "tokenizer").exists():
        extra["tokenizer"] = clip_tokenizer()
    if is_xl and not (path / "tokenizer_2").exists():
        extra["tokenizer_2"] = clip_tokenizer("!")
    if not is_xl:
        extra.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(str(path), local_files_only=True, **extra)
    return pipe, "stable_diffusion_xl" if is_xl else "stable_diffusion_1"


def _load_single_file(path: Path, v_prediction: bool, dtype: torch.dtype):
    from dataclasses import replace

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from horde_worker.inference import flux

    state_dict = checkpoint.load_state_dict(path)
    if flux.is_flux(state_dict):
        load_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
        pipe, fp8 = flux.build_pipeline(state_dict, path, load_dtype)
        return pipe, "flux_1", fp8
    info = checkpoint.inspect_checkpoint(state_dict)
    if v_prediction:
        info = replace(info, prediction_type="v_prediction")
    config = scheduler_config(info.baseline)
    config["prediction_type"] = info.prediction_type
    scheduler = EulerDiscreteScheduler.from_config(config)
    # Built straight in the run's precision: a half-precision model never exists in float32 on the way.
    unet = checkpoint.build_unet(state_dict, info, dtype=dtype)
    vae = checkpoint.build_vae(state_dict, info, dtype=dtype)
    if info.baseline == "stable_diffusion_xl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=checkpoint.build_clip_text_encoder(state_dict, ("conditioner.embedders.0.transformer.",),
                                                            dtype=dtype),
            text_encoder_2=checkpoint.build_open_clip_text_encoder(
                state_dict, "conditioner.embedders.1.model.", with_projection=True, drop_last_layer=False,
                dtype=dtype),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"),
        )
    else:
        if info.baseline == "stable_diffusion_2":
            text_encoder = checkpoint.build_open_clip_text_encoder(
                state_dict, "cond_stage_model.model.", with_projection=False, drop_last_layer=True, dtype=dtype)
            tokenizer = clip_tokenizer("!")
        else:
            text_encoder, tokenizer = checkpoint.build_clip_text_encoder(state_dict, dtype=dtype), clip_tokenizer()
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    del state_dict
    return pipe, info.baseline, False


# The pipeline a job's task needs, over the same modules (diffusers' `from_pipe` would cast every module
# to float32 on the way, the shared ones included).
DERIVED_PIPELINES = {
    ("StableDiffusionPipeline", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("StableDiffusionPipeline", "inpaint"): "StableDiffusionInpaintPipeline",
    ("StableDiffusionPipeline", "controlnet"): "StableDiffusionControlNetPipeline",
    ("StableDiffusionXLPipeline", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("StableDiffusionXLPipeline", "inpaint"): "StableDiffusionXLInpaintPipeline",
    ("FluxPipeline", "img2img"): "FluxImg2ImgPipeline",
    ("FluxPipeline", "inpaint"): "FluxInpaintPipeline",
    ("ZImagePipeline", "img2img"): "ZImageImg2ImgPipeline",
}


def derived_pipeline(pipe, task: str | None = None, **overrides):
    """A new pipeline object for `task` ("img2img", "inpaint", "controlnet"; None: the same kind) over `pipe`'s
    modules, each left exactly as it is (device, precision, hooks); `overrides` replace or add components."""
    import inspect

    import diffusers

    name = type(pipe).__name__ if task is None else DERIVED_PIPELINES.get((type(pipe).__name__, task))
    if name is None:  # a pipeline kind this table does not know: diffusers' way, keeping the UNet's precision
        auto = {"img2img": diffusers.AutoPipelineForImage2Image, "inpaint": diffusers.AutoPipelineForInpainting,
                "controlnet": diffusers.AutoPipelineForText2Image}[task]
        derived = auto.from_pipe(pipe, torch_dtype=pipe.dtype, **overrides)
    else:
        cls = getattr(diffusers, name)
        parameters = list(inspect.signature(cls.__init__).parameters)[1:]
        components = pipe.components
        kwargs = {}
        for parameter in parameters:
            if parameter in overrides:
                kwargs[parameter] = overrides[parameter]
            elif parameter in components:
                kwargs[parameter] = components[parameter]
            elif parameter in pipe.config and not isinstance(pipe.config[parameter], list | tuple):
                kwargs[parameter] = pipe.config[parameter]
        if "requires_safety_checker" in parameters:
            kwargs["requires_safety_checker"] = False
        derived = cls(**kwargs)
    derived.set_progress_bar_config(disable=True)
    return derived


def vae_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision on `device`, as the reference runs it: bf16 on NVIDIA GPUs of compute capability 8+
    (Ampere and later), float32 on older ones (fp16 overflows SDXL's VAE); elsewhere `dtype`, as it is."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return dtype
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float32


def run_vae_in(vae, dtype: torch.dtype) -> None:
    """Keep the VAE's weights in `dtype` and let it take and give tensors of any precision: its inputs are cast
    to `dtype`, its outputs back to the input's precision (the pipelines hand it their own)."""
    vae.to(dtype=dtype)
    if dtype != torch.float16:
        # Only fp16 overflows: the pipelines' float32 round trips (which would leave the VAE in their own
        # precision afterwards) are not wanted.
        vae.register_to_config(force_upcast=False)
    if getattr(vae, "_runs_in_own_precision", False):
        return
    vae._runs_in_own_precision = True
    encode, decode = vae.encode, vae.decode

    def own() -> torch.dtype:
        return next(vae.parameters()).dtype

    def encode_in(x: torch.Tensor, *args, **kwargs):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        output = encode(x.to(own()), *args, **kwargs)
        dist = output[0] if isinstance(output, tuple) else output.latent_dist
        back = DiagonalGaussianDistribution(dist.parameters.to(x.dtype), deterministic=dist.deterministic)
        if isinstance(output, tuple):
            return (back, *output[1:])
        output.latent_dist = back
        return output

    def decode_in(z: torch.Tensor, *args, **kwargs):
        output = decode(z.to(own()), *args, **kwargs)
        if isinstance(output, tuple):
            return (output[0].to(z.dtype), *output[1:])
        output.sample = output.sample.to(z.dtype)
        return output

    vae.encode, vae.decode = encode_in, decode_in


SPEEDUPS = ("channels_last", "fuse_qkv")


def enabled_speedups() -> set[str]:
    """Speed-ups to apply: HORDE_WORKER_SPEEDUPS=all, none (the default) or a comma list."""
    import os

    text = os.environ.get("HORDE_WORKER_SPEEDUPS", "none").strip().lower()
    if text == "all":
        return set(SPEEDUPS)
    return {part.strip() for part in text.split(",") if part.strip() in SPEEDUPS}


def apply_speedups(pipe, device: torch.device) -> None:
    """Exact-arithmetic speed-ups on GPUs: they change memory layout and kernel choice, not the maths."""
    if device.type != "cuda" or getattr(pipe, "unet", None) is None:  # the UNet baselines only
        return
    wanted = enabled_speedups()
    if "channels_last" in wanted:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if "fuse_qkv" in wanted:
        pipe.fuse_qkv_projections()
