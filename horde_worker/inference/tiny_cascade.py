"""A tiny Stable Cascade in the layout of the horde reference's two files (for tests and local mode).

Real architectures with tiny widths and random weights, saved as ComfyUI's all-in-one checkpoints are: stage
C's UNet in Stability's names (fused attention projections) under `model.diffusion_model.` with CLIP-G in
ComfyUI's layout under `text_encoder.` and a CLIP-L image encoder under `clip_l_vision.`; stage B's UNet
likewise with the VQGAN under `vae.`; and the manifest naming the two files.
"""

from __future__ import annotations

from pathlib import Path

from horde_worker.models.manifest import SUFFIX, write_manifest_file

PARTS = {"stable_cascade_stage_c": "stable_cascade_tiny_stage_c.safetensors",
         "stable_cascade_stage_b": "stable_cascade_tiny_stage_b.safetensors"}
WIDTH = 32  # the text and image encoders' width


def tiny_cascade_components(seed: int = 0):
    """(prior, decoder, text encoder, image encoder, vqgan) of Stable Cascade's architectures, tiny."""
    import torch
    from diffusers import StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from horde_worker.inference import cascade

    torch.manual_seed(seed)
    prior = StableCascadeUNet(
        in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=64,
        block_out_channels=[64, 64], num_attention_heads=[1, 1], down_num_layers_per_block=[1, 1],
        up_num_layers_per_block=[1, 1], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
        block_types_per_layer=[cascade.PRIOR_TYPES] * 2, clip_text_in_channels=WIDTH,
        clip_text_pooled_in_channels=WIDTH, clip_image_in_channels=WIDTH, clip_seq=4, kernel_size=3,
        dropout=[0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False])
    decoder = StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=64,
        block_out_channels=[16, 32, 64, 64], num_attention_heads=[0, 0, 1, 1], down_num_layers_per_block=[1, 1, 1, 1],
        up_num_layers_per_block=[1, 1, 1, 1], down_blocks_repeat_mappers=[1, 1, 1, 1],
        up_blocks_repeat_mappers=[2, 2, 1, 1], block_types_per_layer=list(cascade.DECODER_TYPES),
        clip_text_pooled_in_channels=WIDTH, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3,
        kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"])
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=WIDTH))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, patch_size=8,
        image_size=32, hidden_act="quick_gelu", projection_dim=WIDTH))
    vqgan = PaellaVQModel(embed_dim=32, levels=2, bottleneck_blocks=1, latent_channels=4, num_vq_embeddings=16,
                          scale_factor=cascade.STAGE_A_SCALE)
    with torch.no_grad():
        # Random stages do not remove the noise they are given (latents stay near the top sigma, ~100), and stage
        # A's output would be clipped to black and white: take its input down to unit size, centre it on grey.
        vqgan.up_blocks[0][0].weight.mul_(0.03)
        vqgan.out_block[0].weight.mul_(0.5)
        vqgan.out_block[0].bias.fill_(0.5)
        for unet in (prior, decoder):
            # The released init leaves the output at zero (trained models' never is) and the conditioning tiny.
            unet.clf[1].weight.normal_(0, 0.05)
            for name in ("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper"):
                if hasattr(unet, name):
                    getattr(unet, name).weight.normal_(0, 0.5)
        for layer in (decoder.effnet_mapper[0], decoder.effnet_mapper[2]):
            layer.weight.normal_(0, 0.5)
    return tuple(m.eval() for m in (prior, decoder, text, vision, vqgan))


def stability_from_unet(unet) -> dict:
    """A diffusers StableCascadeUNet's tensors in Stability's names (what the horde's files hold)."""
    import torch

    state = unet.state_dict()
    out = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            kind = key.rsplit(".", 1)[1]
            stem = key.replace(f".attention.to_q.{kind}", "")
            out[f"{stem}.attention.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{stem}.attention.to_{p}.{kind}"] for p in "qkv"]).contiguous()
            continue
        key_out = key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")
        if "effnet_mapper.0.weight" in state:  # stage B's pooled-text mapper has its old name
            key_out = key_out.replace("clip_txt_pooled_mapper.", "clip_mapper.")
        out[key_out] = tensor.contiguous()
    return out


def _with_level(tensors: dict, level: str, keep: tuple[str, ...]) -> dict:
    """transformers 5 drops the tower's level from the names; the files have it."""
    return {(k if k.startswith((level, *keep)) else level + k): v.contiguous() for k, v in tensors.items()}


def write_tiny_cascade(compvis: Path, name: str = "Stable Cascade", seed: int = 0) -> Path:
    """The tiny model's two files and its manifest in `compvis`; returns the manifest."""
    from horde_worker.inference import cascade, ldm_export

    compvis = Path(compvis)
    compvis.mkdir(parents=True, exist_ok=True)
    prior, decoder, text, vision, vqgan = tiny_cascade_components(seed)
    stage_c = {cascade.UNET_PREFIX + k: v for k, v in stability_from_unet(prior).items()}
    text_state = _with_level(text.state_dict(), "text_model.", ("text_projection.",))
    projection = text_state.pop("text_projection.weight")
    text_state.pop("text_model.embeddings.position_ids", None)
    stage_c.update({"text_encoder.clip_g.transformer." + k: v for k, v in text_state.items()})
    stage_c["text_encoder.clip_g.text_projection"] = projection.t().contiguous()
    vision_state = _with_level(vision.state_dict(), "vision_model.", ("visual_projection.",))
    vision_state.pop("vision_model.embeddings.position_ids", None)
    stage_c.update({cascade.VISION_PREFIX + k: v for k, v in vision_state.items()})
    stage_b = {cascade.UNET_PREFIX + k: v for k, v in stability_from_unet(decoder).items()}
    stage_b.update({cascade.VAE_PREFIX + k.replace("vquantizer.embedding.", "vquantizer.codebook."): v.contiguous()
                    for k, v in vqgan.state_dict().items()})
    ldm_export.save_tensors(compvis / PARTS["stable_cascade_stage_c"], stage_c)
    ldm_export.save_tensors(compvis / PARTS["stable_cascade_stage_b"], stage_b)
    return write_manifest_file(compvis / f"{name.replace(' ', '_')}{SUFFIX}", name, "stable_cascade",
                               {kind: [file] for kind, file in PARTS.items()})
