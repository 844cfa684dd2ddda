"""Small random-weight models of the real architectures.

They give the local demo horde something to serve and the tests something to load, with the
same tensor layout and code path as the real checkpoints: only the widths are small. The VAE
keeps four blocks (8x downsampling) so that a 512x512 image is a 64x64 latent, as in SD1.5.
"""

from __future__ import annotations

from pathlib import Path

# The model name the local demo horde and its workers use for the tiny SD1.5-class model.
DEMO_MODEL_NAME = "horde-worker-tiny-sd15"
DEMO_MODEL_FILE = "horde-worker-tiny-sd15.safetensors"
INPAINTING_MODEL_NAME = "horde-worker-tiny-sd15-inpainting"


def tiny_sd15_components(seed: int = 0, inpainting: bool = False):
    """Return (unet, vae, text_encoder) of SD1.5's architecture with tiny widths and random weights; an
    inpainting UNet reads 9 channels (latents, mask, masked-image latents) as sd-v1-5-inpainting does."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval(), _tiny_vae(0.18215), _tiny_text_tower("quick_gelu", layers=2)


def _tiny_vae(scaling_factor: float):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=scaling_factor,
    )
    # Random init leaves the VAE's latent statistics far from SD's; scale the decoder input so that
    # pictures have visible structure instead of saturating to flat colour.
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(4.0)
    return vae.eval()


def _tiny_text_tower(hidden_act: str, layers: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act=hidden_act,
                            projection_dim=64)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_sd2_components(seed: int = 0):
    """(unet, vae, text_encoder) of SD2's architecture: linear attention projections, 64-wide heads, an
    OpenCLIP-style text tower whose last block SD2 does not use (three blocks, two used)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
    )
    return unet.eval(), _tiny_vae(0.18215), _tiny_text_tower("gelu", layers=3)


def tiny_sdxl_components(seed: int = 0):
    """(unet, vae, text_encoder, text_encoder_2) of SDXL's architecture with tiny widths."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=64 + 6 * 256,
    )
    return (unet.eval(), _tiny_vae(0.13025), _tiny_text_tower("quick_gelu", layers=2),
            _tiny_text_tower("gelu", layers=2, projection=True))


def write_tiny_checkpoint(path: Path, baseline: str, seed: int = 0, inpainting: bool = False) -> Path:
    """A tiny single-file checkpoint of `baseline` (stable_diffusion_1, _2 or _xl) at `path`."""
    from horde_worker.inference import ldm_export

    if baseline == "stable_diffusion_1":
        return ldm_export.save_sd_checkpoint(Path(path), *tiny_sd15_components(seed, inpainting))
    if baseline == "stable_diffusion_2":
        return ldm_export.save_sd2_checkpoint(Path(path), *tiny_sd2_components(seed))
    if baseline == "stable_diffusion_xl":
        return ldm_export.save_sdxl_checkpoint(Path(path), *tiny_sdxl_components(seed))
    raise ValueError(f"no tiny model for baseline {baseline!r}")


def _create_in_child(target, folder: Path, what: str) -> None:
    """Build models in a short-lived child process, so that the supervisor never imports torch."""
    import multiprocessing as mp

    process = mp.get_context("spawn").Process(target=_quietly, args=(target, folder))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"could not create {what} in {folder} (exit code {process.exitcode})")


def _quietly(target, folder: Path) -> None:
    """Run `target(folder)` with other libraries' warnings and progress bars kept off the console."""
    import os

    from loguru import logger

    from horde_worker.ui.logs import capture_third_party

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    logger.remove()
    logger.add(lambda message: None, level="WARNING")  # the files are written or the exit code says why not
    capture_third_party()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    target(folder)


def ensure_demo_model(models_dir: Path) -> Path:
    """The demo model's file under `models_dir`, created on first use."""
    folder = Path(models_dir) / "compvis"
    if not (folder / DEMO_MODEL_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        _create_in_child(_write_demo_model, folder, "the demo model")
    return folder / DEMO_MODEL_FILE


def _write_demo_model(folder: Path) -> None:
    write_tiny_checkpoint(folder / DEMO_MODEL_FILE, "stable_diffusion_1")


def write_tiny_t5_tokenizer(folder: Path) -> Path:
    """A small T5-style (unigram, metaspace) tokenizer.json for tests and the demo: the real T5 vocabulary
    is not shipped with the worker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = ("a the of and in on with to at photo picture lighthouse cat dog fox red blue castle sea").split()
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -2.0) for w in words] + [("\u2581", -3.0)] + [(c, -4.0) for c in letters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = Path(folder) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def tiny_flux_components(seed: int = 0, guidance: bool = False):
    """(transformer, vae, clip_l, t5) of Flux.1's architecture with tiny widths (dev when `guidance`)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=64, guidance_embeds=guidance, axes_dims_rope=(4, 14, 14),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=512, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    return transformer.eval(), vae.eval(), _tiny_text_tower("quick_gelu", layers=2), t5.eval()


def write_tiny_flux_checkpoint(path: Path, seed: int = 0, guidance: bool = False, fp8: bool = True) -> Path:
    """A tiny all-in-one Flux checkpoint (transformer in fp8 like the horde's), with its T5 tokenizer beside."""
    import torch

    from horde_worker.inference import flux, ldm_export

    transformer, vae, clip_l, t5 = tiny_flux_components(seed, guidance)
    storage = torch.float8_e4m3fn if fp8 else torch.float32
    tensors = {flux.TRANSFORMER_PREFIX + k: v.to(storage) for k, v in flux.bfl_from_transformer(transformer).items()}
    tensors.update({k.replace("cond_stage_model.transformer.", flux.CLIP_PREFIX): v
                    for k, v in ldm_export.text_encoder_to_ldm(clip_l).items()})
    tensors.update({flux.T5_PREFIX + k: v.to(storage) if ".layer." in k and "norm" not in k else v
                    for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    tensors.update({k.replace("first_stage_model.", flux.VAE_PREFIX, 1): v for k, v in ldm_export.vae_to_ldm(vae).items()})
    write_tiny_t5_tokenizer(Path(path).parent / flux.T5_TOKENIZER_DIR)
    return ldm_export.save_tensors(Path(path), tensors)


# Local mode's tiny models, one per baseline: name -> (file name, baseline).
LOCAL_MODELS = {
    DEMO_MODEL_NAME: (DEMO_MODEL_FILE, "stable_diffusion_1"),
    "horde-worker-tiny-sd2": ("horde-worker-tiny-sd2.safetensors", "stable_diffusion_2"),
    "horde-worker-tiny-sdxl": ("horde-worker-tiny-sdxl.safetensors", "stable_diffusion_xl"),
    "horde-worker-tiny-flux": ("horde-worker-tiny-flux.safetensors", "flux_1"),
    # A split model: its manifest in compvis/, its parts in vae/ and text_encoders/ (tiny_zimage.py).
    "horde-worker-tiny-zimage": ("horde-worker-tiny-zimage.parts.json", "z_image_turbo"),
    "horde-worker-tiny-qwen": ("horde-worker-tiny-qwen.parts.json", "qwen_image"),
    "horde-worker-tiny-cascade": ("horde-worker-tiny-cascade.parts.json", "stable_cascade"),
    INPAINTING_MODEL_NAME: (f"{INPAINTING_MODEL_NAME}.safetensors", "stable_diffusion_1"),
}


LOCAL_ADAPTER_DIR = "local-adapters"
# Local mode's safety model: a tiny CLIP that finds nothing unsafe in any image (see safety/tiny.py).
LOCAL_SAFETY_MODEL = "horde-worker-tiny-clip.safetensors"
LOCAL_CONTROL_MARKER = ".local-mode-complete"
# Written under cache_home once every post-processor has local weights (tiny_postprocess.write_all).
LOCAL_POSTPROCESS_MARKER = ".local-postprocessors-complete"


def _write_local_control(folder: Path) -> None:
    """ControlNets fitting the tiny SD1 model, and the annotators that have small weights."""
    from horde_worker.inference.tiny_control import write_tiny_annotators, write_tiny_controlnets

    if (folder / LOCAL_CONTROL_MARKER).exists():
        return
    write_tiny_controlnets(folder, tiny_sd15_components()[0])
    write_tiny_annotators(folder / "annotators")
    (folder / LOCAL_CONTROL_MARKER).write_text("tiny ControlNets and annotators of local mode\n")


def _write_local_models(folder: Path) -> None:
    from horde_worker.inference.tiny_adapters import write_local_adapters

    write_local_adapters(folder / LOCAL_ADAPTER_DIR)
    _write_local_control(folder.parent / "controlnet")
    if not (folder.parent / LOCAL_POSTPROCESS_MARKER).exists():
        from horde_worker.inference.tiny_postprocess import write_all

        write_all(folder.parent)
        (folder.parent / LOCAL_POSTPROCESS_MARKER).write_text("tiny post-processors of local mode\n")
    if not (folder / LOCAL_SAFETY_MODEL).exists():
        from horde_worker.safety.tiny import write_tiny_clip

        write_tiny_clip(folder / LOCAL_SAFETY_MODEL, ["landscape", "mountain"])
    for name, (file_name, baseline) in LOCAL_MODELS.items():
        path = folder / file_name
        if path.exists():
            continue
        if baseline == "z_image_turbo":
            from horde_worker.inference.tiny_zimage import write_tiny_zimage

            write_tiny_zimage(folder, name)
        elif baseline == "qwen_image":
            from horde_worker.inference.tiny_qwen import write_tiny_qwen

            write_tiny_qwen(folder, name)
        elif baseline == "stable_cascade":
            from horde_worker.inference.tiny_cascade import write_tiny_cascade

            write_tiny_cascade(folder, name)
        elif baseline == "flux_1":
            write_tiny_flux_checkpoint(path)
        else:
            write_tiny_checkpoint(path, baseline, inpainting="inpainting" in file_name)


def ensure_local_models(models_dir: Path) -> dict[str, tuple[Path, str]]:
    """Every local-mode model's (file, baseline), created on first use."""
    folder = Path(models_dir) / "compvis"
    folder.mkdir(parents=True, exist_ok=True)
    from horde_worker.inference.tiny_adapters import LOCAL_ADAPTERS

    adapters = [folder / LOCAL_ADAPTER_DIR / entry[3] for entry in LOCAL_ADAPTERS.values()]
    control_done = folder.parent / "controlnet" / LOCAL_CONTROL_MARKER
    if (not all((folder / f).exists() for f, _ in LOCAL_MODELS.values()) or not all(p.exists() for p in adapters)
            or not control_done.exists() or not (folder / LOCAL_SAFETY_MODEL).exists()
            or not (folder.parent / LOCAL_POSTPROCESS_MARKER).exists()):
        _create_in_child(_write_local_models, folder, "the local models")
    return {name: (folder / file_name, baseline) for name, (file_name, baseline) in LOCAL_MODELS.items()}
