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


def tiny_sd15_components(seed: int = 0):
    """Return (unet, vae, text_encoder) of SD1.5's architecture with tiny widths and random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    # Random init leaves the VAE's latent statistics far from SD's; scale the decoder input so that
    # pictures have visible structure instead of saturating to flat colour.
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(4.0)
    return unet.eval(), vae.eval(), text_encoder.eval()


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=scaling_factor,
    )
    import torch

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


def write_tiny_checkpoint(path: Path, baseline: str, seed: int = 0) -> Path:
    """A tiny single-file checkpoint of `baseline` (stable_diffusion_1, _2 or _xl) at `path`."""
    from horde_worker.inference import ldm_export

    if baseline == "stable_diffusion_1":
        return ldm_export.save_sd_checkpoint(Path(path), *tiny_sd15_components(seed))
    if baseline == "stable_diffusion_2":
        return ldm_export.save_sd2_checkpoint(Path(path), *tiny_sd2_components(seed))
    if baseline == "stable_diffusion_xl":
        return ldm_export.save_sdxl_checkpoint(Path(path), *tiny_sdxl_components(seed))
    raise ValueError(f"no tiny model for baseline {baseline!r}")


def write_tiny_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """Create (or re-create) the tiny SD1.5 single-file checkpoint at `path`."""
    from horde_worker.inference.ldm_export import save_sd_checkpoint

    unet, vae, text_encoder = tiny_sd15_components(seed)
    return save_sd_checkpoint(Path(path), unet, vae, text_encoder)


def ensure_demo_model(models_dir: Path) -> Path:
    """The demo model's file under `models_dir`, created on first use.

    It is built in a short-lived child process, so that the supervisor never imports torch.
    """
    import multiprocessing as mp

    path = Path(models_dir) / "compvis" / DEMO_MODEL_FILE
    if not path.exists():
        process = mp.get_context("spawn").Process(target=write_tiny_sd15_checkpoint, args=(path,))
        process.start()
        process.join()
        if process.exitcode != 0 or not path.exists():
            raise RuntimeError(f"could not create the demo model at {path} (exit code {process.exitcode})")
    return path
