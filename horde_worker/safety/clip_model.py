"""The horde's CLIP model as the safety checker reads it: image features and text similarities.

The weights are the reference's `ViT-L-14.pt` (OpenAI's release, loaded by open_clip). Weights
saved with an open_clip model config beside them (`<file>.json`) load with that architecture
instead, which is how tiny test models take the same path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def load_clip(path: Path, device: torch.device):
    """(model, preprocess, tokenizer) of the CLIP weights at `path`."""
    import open_clip

    path = Path(path)
    config_path = path.with_suffix(".json")  # an open_clip model config; the model's name is the file's stem
    if config_path.exists():
        from safetensors.torch import load_file

        open_clip.add_model_config(config_path)
        model = open_clip.create_model(config_path.stem, pretrained=None, device="cpu")
        model.load_state_dict(load_file(str(path)))
        tokenizer = open_clip.get_tokenizer(config_path.stem)
    else:
        model = open_clip.load_openai_model(str(path), device="cpu")
        tokenizer = open_clip.get_tokenizer("ViT-L-14")
    model = model.to(device).eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    return model, preprocess, tokenizer


class ClipSimilarity:
    """What the horde's checker asks of an interrogator: image features and their similarities to texts."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = device
        self.model, self.preprocess, self.tokenizer = load_clip(path, device)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @torch.inference_mode()
    def image_to_features(self, image: Image.Image | list[Image.Image]) -> torch.Tensor:
        images = image if isinstance(image, list) else [image]
        pixels = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device)
        features = self.model.encode_image(pixels).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def similarities(self, image_features: torch.Tensor, text_array: list[str]) -> list[float]:
        key = tuple(text_array)
        if key not in self._text_cache:
            tokens = self.tokenizer(list(text_array)).to(self.device)
            text = self.model.encode_text(tokens).float()
            self._text_cache[key] = text / text.norm(dim=-1, keepdim=True)
        return (self._text_cache[key] @ image_features.T).T[0].tolist()
