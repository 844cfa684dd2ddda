"""A tiny Z-Image-Turbo in the horde reference's split-file layout (for tests and local mode).

Real architectures with tiny widths and random weights, saved as the reference's files are: the transformer
in ComfyUI's layout under `compvis/`, the Flux autoencoder in its original layout under `vae/`, Qwen3 under
`text_encoders/` with a byte-level tokenizer and a chat template beside it, and the manifest naming them.
"""

from __future__ import annotations

import json
from pathlib import Path

from horde_worker.models.manifest import SUFFIX, write_manifest_file

# A chat template of the released tokenizer's form for one user turn with the assistant's turn opened.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PARTS = {"unet": "z_image_turbo_tiny.safetensors", "vae": "../vae/ae_tiny_zimage.safetensors",
         "text_encoders": "../text_encoders/qwen_3_tiny.safetensors"}


def write_tiny_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer (every byte a token, Qwen's special tokens) and its config; its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from horde_worker.inference.zimage_files import TOKENIZER_FILES

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILES[0]))
    (folder / TOKENIZER_FILES[1]).write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def tiny_zimage_components(vocab_size: int, seed: int = 0):
    """(transformer, vae, text encoder) of Z-Image's architecture with tiny widths."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from horde_worker.inference.tiny import tiny_flux_components

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4,
                                           n_kv_heads=4, cap_feat_dim=32, axes_dims=[4, 6, 6])
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True))
    vae = tiny_flux_components(seed)[1]
    return transformer.eval(), vae.eval(), text_encoder.eval()


def write_tiny_zimage(compvis: Path, name: str = "Z-Image-Turbo", seed: int = 0) -> Path:
    """The tiny model's files under `compvis/..` and its manifest in `compvis`; returns the manifest."""
    from horde_worker.inference import ldm_export, zimage
    from horde_worker.inference.zimage_files import TOKENIZER_DIR

    compvis = Path(compvis)
    paths = {kind: (compvis / relative).resolve() for kind, relative in PARTS.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(paths["text_encoders"].parent / TOKENIZER_DIR)
    transformer, vae, text_encoder = tiny_zimage_components(vocab, seed)
    ldm_export.save_tensors(paths["unet"], zimage.comfy_from_transformer(transformer))
    ldm_export.save_tensors(paths["vae"], {k.removeprefix("first_stage_model."): v
                                           for k, v in ldm_export.vae_to_ldm(vae).items()})
    ldm_export.save_tensors(paths["text_encoders"], {zimage.TEXT_PREFIX + k: v.contiguous()
                                                     for k, v in text_encoder.state_dict().items()})
    return write_manifest_file(compvis / f"{name.replace(' ', '_')}{SUFFIX}", name, "z_image_turbo",
                               {kind: [relative] for kind, relative in PARTS.items()})
