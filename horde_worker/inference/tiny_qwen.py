"""A tiny Qwen-Image in the horde reference's split-file layout (for tests and local mode).

Real architectures with tiny widths and random weights, saved as the reference's files are: the transformer
with its linear weights in fp8 e4m3 under `compvis/`, the autoencoder in the Wan 2.1 layout under `vae/`, the
Qwen2.5-VL language model in ComfyUI's scaled fp8 (plus a few vision-tower tensors the worker must skip) under
`text_encoders/` with a byte-level tokenizer beside it, and the manifest naming them.
"""

from __future__ import annotations

from pathlib import Path

from horde_worker.models.manifest import SUFFIX, write_manifest_file

PARTS = {"unet": "qwen_image_tiny_fp8_e4m3fn.safetensors", "vae": "../vae/qwen_image_vae_tiny.safetensors",
         "text_encoders": "../text_encoders/qwen_2.5_vl_tiny_fp8_scaled.safetensors"}


def tiny_qwen_components(vocab_size: int, seed: int = 0):
    """(transformer, vae, text encoder) of Qwen-Image's architecture with tiny widths."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from horde_worker.inference.qwen_image import TEXT_HEAD_DIM, _mrope

    torch.manual_seed(seed)
    text_width = TEXT_HEAD_DIM
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=text_width, axes_dims_rope=(4, 14, 14))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=vocab_size, hidden_size=text_width, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6, use_cache=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope(TEXT_HEAD_DIM)}))
    with torch.no_grad():
        # Random init leaves the output layers at zero (trained models never are), and its near-uniform attention
        # averages the prompt away: sharpen the attention (its q/k norms) and weigh the text's values more.
        for module in (transformer.proj_out, transformer.norm_out.linear):
            module.weight.normal_(0, 0.05)
        for block in transformer.transformer_blocks:
            for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_q, block.attn.norm_added_k):
                norm.weight.mul_(4)
            block.attn.add_v_proj.weight.mul_(3)
    return transformer.eval(), vae.eval(), text_encoder.eval()


def transformer_file(transformer) -> dict:
    """The transformer's tensors as the horde's fp8 file holds them: 2-D weights in fp8, the rest in bf16."""
    import torch

    out = {}
    for key, tensor in transformer.state_dict().items():
        kind = torch.float8_e4m3fn if tensor.ndim == 2 and key.endswith(".weight") else torch.bfloat16
        out[key] = tensor.to(kind).contiguous()
    return out


def text_encoder_file(text_encoder) -> dict:
    """The language model's tensors in ComfyUI's scaled fp8 form under `model.`, with the scale marker and a
    vision-tower tensor beside them."""
    import torch

    from horde_worker.inference import qwen_image, scaled_fp8

    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
           "visual.patch_embed.proj.weight": torch.zeros(8, 3, 2, 14, 14, dtype=torch.bfloat16)}
    linear_layers = {name for name, module in text_encoder.named_modules() if isinstance(module, torch.nn.Linear)}
    for key, tensor in text_encoder.state_dict().items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and name in linear_layers:
            weight, scale = scaled_fp8.quantize(tensor)
            out[qwen_image.TEXT_PREFIX + key] = weight.contiguous()
            out[qwen_image.TEXT_PREFIX + name + scaled_fp8.SCALE_SUFFIX] = scale
        else:
            out[qwen_image.TEXT_PREFIX + key] = tensor.to(torch.bfloat16).contiguous()
    return out


def write_tiny_qwen(compvis: Path, name: str = "Qwen-Image", seed: int = 0) -> Path:
    """The tiny model's files under `compvis/..` and its manifest in `compvis`; returns the manifest."""
    from horde_worker.inference import ldm_export, qwen_image
    from horde_worker.inference.qwen_files import TOKENIZER_DIR
    from horde_worker.inference.tiny_zimage import write_tiny_tokenizer

    compvis = Path(compvis)
    paths = {kind: (compvis / relative).resolve() for kind, relative in PARTS.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(paths["text_encoders"].parent / TOKENIZER_DIR)
    transformer, vae, text_encoder = tiny_qwen_components(vocab, seed)
    ldm_export.save_tensors(paths["unet"], transformer_file(transformer))
    ldm_export.save_tensors(paths["vae"], {qwen_image.wan_vae_key(k): v.contiguous()
                                           for k, v in vae.state_dict().items()})
    ldm_export.save_tensors(paths["text_encoders"], text_encoder_file(text_encoder))
    return write_manifest_file(compvis / f"{name.replace(' ', '_')}{SUFFIX}", name, "qwen_image",
                               {kind: [relative] for kind, relative in PARTS.items()})
