"""Prompt text to text-encoder conditioning, with weights and without the 77-token limit.

The horde's requesters write weights the way most Stable Diffusion front ends read them:
`(word)` is x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` exactly 1.3, `\\(` a literal
bracket. A prompt is cut into chunks of 75 tokens; each chunk is encoded on its own (with its
start and end tokens) and the chunks are joined along the sequence, which the UNet's
cross-attention reads at any length. Weights scale each token's embedding; the chunk is then
rescaled to its unweighted mean so that weights change emphasis, not overall strength.
"""

from __future__ import annotations

import re
from typing import Any

import torch

CHUNK_TOKENS = 75
UP, DOWN = 1.1, 1 / 1.1

_TOKEN = re.compile(
    r"\\[()\[\]\\]"                                   # escaped bracket or backslash
    r"|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"      # ":1.3)" closes a weighted group
    r"|[()\[\]]"
    r"|[^\\()\[\]:]+|:|\\"
)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs."""
    parts: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _TOKEN.finditer(text):
        token, number = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            parts.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif number is not None and round_open:
            scale(round_open.pop(), float(number))
        elif token == ")" and round_open:
            scale(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:  # text, or a bracket with nothing open to close
            parts.append([token, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[tuple[str, float]] = []
    for text_part, weight in parts:
        if merged and abs(merged[-1][1] - weight) < 1e-9:
            merged[-1] = (merged[-1][0] + text_part, weight)
        elif text_part:
            merged.append((text_part, weight))
    return merged


def plain_text(text: str) -> str:
    """The prompt with its weighting syntax removed (for encoders that do not take weights)."""
    return "".join(part for part, _ in parse_weighted(text))


def _chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    ids: list[int] = []
    weights: list[float] = []
    for part, weight in parse_weighted(text):
        tokens = tokenizer(part, add_special_tokens=False, truncation=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    chunks = []
    for start in range(0, max(1, len(ids)), CHUNK_TOKENS):
        chunks.append((ids[start:start + CHUNK_TOKENS], weights[start:start + CHUNK_TOKENS]))
    return chunks


def _padded(tokenizer, chunk: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    ids, weights = chunk
    pad = CHUNK_TOKENS - len(ids)
    full_ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    return full_ids, [1.0, *weights, 1.0] + [1.0] * pad


def _encode_chunks(text_encoder, tokenizer, chunks, layer: int | None, normalize: bool) -> tuple[torch.Tensor, Any]:
    """(1, 77 x chunks, dim) hidden states and the first chunk's pooled output."""
    padded = [_padded(tokenizer, chunk) for chunk in chunks]
    device = text_encoder.device
    ids = torch.tensor([p[0] for p in padded], device=device)
    weights = torch.tensor([p[1] for p in padded], device=device, dtype=text_encoder.dtype)
    output = text_encoder(ids, output_hidden_states=True)
    if layer is None:
        hidden = output[0] if normalize else output.hidden_states[-1]
    else:
        hidden = output.hidden_states[layer]
        if normalize:
            hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    if bool((weights != 1.0).any()):  # unweighted text stays exactly as the encoder gave it
        original_mean = hidden.mean(dim=(1, 2), keepdim=True)
        hidden = hidden * weights[..., None]
        weighted_mean = hidden.mean(dim=(1, 2), keepdim=True)
        # A mean at (or next to) zero gives no scale to restore: dividing by it would blow the text up to inf/NaN.
        usable = weighted_mean.abs() > 1e-6
        ratio = torch.where(usable, original_mean / torch.where(usable, weighted_mean, torch.ones_like(weighted_mean)),
                            torch.ones_like(weighted_mean))
        hidden = hidden * ratio
    pooled = output[0][0:1] if output[0].ndim == 2 else None
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


def _even(chunk_lists: list[list]) -> list[list]:
    """Every prompt of a batch, negatives included, needs the same number of chunks."""
    longest = max(len(c) for c in chunk_lists)
    return [c + [([], [])] * (longest - len(c)) for c in chunk_lists]


def encode_prompts(pipe, baseline: str, prompts: list[str], negatives: list[str], clip_skip: int,
                   zero_empty_negative: bool = False) -> dict[str, torch.Tensor]:
    """Keyword arguments `prompt_embeds` / `negative_prompt_embeds` (and SDXL's pooled ones) for a
    Stable Diffusion pipeline call. `clip_skip` is the horde's: 1 uses the last layer."""
    texts = prompts + negatives
    if baseline == "stable_diffusion_xl":
        encoders = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
        layer, normalize = -(clip_skip + 1), False
    else:
        encoders = [(pipe.text_encoder, pipe.tokenizer)]
        layer, normalize = (None if clip_skip <= 1 else -clip_skip), True
    per_encoder_hidden, pooled_list = [], []
    for text_encoder, tokenizer in encoders:
        chunk_lists = _even([_chunks(tokenizer, text) for text in texts])
        # Each distinct text is encoded once (a job's images mostly share their prompt and negative prompt).
        by_text: dict[str, tuple[torch.Tensor, Any]] = {}
        for text, chunks in zip(texts, chunk_lists, strict=True):
            if text not in by_text:
                by_text[text] = _encode_chunks(text_encoder, tokenizer, chunks, layer, normalize)
        encoded = [by_text[text] for text in texts]
        per_encoder_hidden.append(torch.cat([hidden for hidden, _ in encoded]))
        pooled_list.append([pooled for _, pooled in encoded])
    hidden = torch.cat(per_encoder_hidden, dim=-1)
    count = len(prompts)
    result = {"prompt_embeds": hidden[:count], "negative_prompt_embeds": hidden[count:]}
    if baseline == "stable_diffusion_xl":
        pooled = torch.cat(pooled_list[-1])
        result["pooled_prompt_embeds"] = pooled[:count]
        result["negative_pooled_prompt_embeds"] = pooled[count:]
        if zero_empty_negative:
            for i, negative in enumerate(negatives):
                if not negative.strip():
                    result["negative_prompt_embeds"][i].zero_()
                    result["negative_pooled_prompt_embeds"][i].zero_()
    return result
