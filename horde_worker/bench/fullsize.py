"""SD1.5's full architecture with random weights, written as a real single-file checkpoint."""

from __future__ import annotations

from pathlib import Path


def write_full_sd15_checkpoint(path: Path) -> Path:
    """Create an SD1.5-sized checkpoint (860M UNet, CLIP-L text encoder, KL VAE) with random fp16 weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from horde_worker.inference.ldm_export import save_sd_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    for module in (unet, vae, text_encoder):
        module.to(torch.float16)
    return save_sd_checkpoint(Path(path), unet, vae, text_encoder)


def write_full_flux_checkpoint(path: Path) -> Path:
    """Flux.1 schnell's full architecture (12B transformer and T5-XXL kept in fp8, CLIP-L, VAE) with random
    weights, in the horde's all-in-one layout, plus a stand-in T5 tokenizer beside it. Built on the GPU when
    there is one (filling 17 billion random weights on a CPU takes long)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from horde_worker.inference import flux, ldm_export
    from horde_worker.inference.checkpoint import skip_weight_init
    from horde_worker.inference.tiny import write_tiny_t5_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(0)

    def randomised(module: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0, 0.02, generator=generator)
        return module

    tensors: dict[str, torch.Tensor] = {}
    with skip_weight_init(), torch.device(device):
        transformer = randomised(FluxTransformer2DModel().to(torch.bfloat16))
    tensors.update({flux.TRANSFORMER_PREFIX + k: v.to(torch.float8_e4m3fn).cpu()
                    for k, v in flux.bfl_from_transformer(transformer).items()})
    del transformer
    with skip_weight_init(), torch.device(device):
        t5 = randomised(T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                num_heads=64, feed_forward_proj="gated-gelu",
                                                is_encoder_decoder=False)).to(torch.bfloat16))
    tensors.update({flux.T5_PREFIX + k: v.to(torch.float8_e4m3fn).cpu() for k, v in t5.state_dict().items()
                    if k != "encoder.embed_tokens.weight"})
    del t5
    with skip_weight_init():
        clip_l = randomised(CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, hidden_act="quick_gelu")).to(device))
        vae = randomised(AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False).to(device))
    tensors.update({k.replace("cond_stage_model.transformer.", flux.CLIP_PREFIX): v.half().cpu()
                    for k, v in ldm_export.text_encoder_to_ldm(clip_l).items()})
    tensors.update({k.replace("first_stage_model.", flux.VAE_PREFIX, 1): v.float().cpu()
                    for k, v in ldm_export.vae_to_ldm(vae).items()})
    write_tiny_t5_tokenizer(Path(path).parent / flux.T5_TOKENIZER_DIR)
    return ldm_export.save_tensors(Path(path), tensors)
