"""A tiny CLIP of open_clip's architecture whose answers are chosen, for tests and local mode.

The text tower is wired so that a text's features are the normalised mean of its words' token
embeddings (random, nearly orthogonal at this width); the image tower ignores the image and
returns one fixed vector: the sum of the features of `concepts`. So every image "looks like"
those concepts, and each branch of the safety check can be reached on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 1, "layers": 1},
}
BOS, EOS = 49406, 49407


def write_tiny_clip(path: Path, concepts: list[str], seed: int = 0) -> Path:
    """Weights at `path` (safetensors) and their open_clip config beside them (`<path>.json`)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_path = path.with_suffix(".json")
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(config_path.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config_path.stem)
    width = TINY_CLIP_CONFIG["text_cfg"]["width"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.token_embedding.weight.copy_(torch.randn(model.token_embedding.weight.shape, generator=generator))
        model.token_embedding.weight[[0, BOS, EOS]] = 0
        model.positional_embedding.zero_()
        block = model.transformer.resblocks[0]
        identity = torch.eye(width)
        # Attention that averages every earlier position (zero queries and keys) and passes values unchanged.
        block.attn.in_proj_weight.copy_(torch.cat([torch.zeros(width, width), torch.zeros(width, width), identity]))
        block.attn.in_proj_bias.zero_()
        block.attn.out_proj.weight.copy_(identity)
        block.attn.out_proj.bias.zero_()
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
        model.text_projection.copy_(identity)
        text = model.encode_text(tokenizer(concepts)).float()
        target = (text / text.norm(dim=-1, keepdim=True)).sum(dim=0)
        visual = model.visual
        visual.ln_post.weight.zero_()
        bias = torch.ones(visual.ln_post.bias.shape[0])
        visual.ln_post.bias.copy_(bias)
        visual.proj.copy_(torch.outer(bias / bias.dot(bias), target))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m horde_worker.safety.tiny OUT.safetensors --concepts "woman,naked"`: a tiny CLIP for
    `safety_model`, so that local mode can show each censorship branch."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the weights (a .json config goes beside them)")
    parser.add_argument("--concepts", required=True,
                        help="comma-separated words every image will look like, e.g. 'landscape' (safe), "
                             "'woman,naked,nude,sexual' (NSFW), 'child,children,toddler,naked,nude,sexual,porn' (CSAM)")
    args = parser.parse_args(argv)
    concepts = [word.strip() for word in args.concepts.split(",") if word.strip()]
    path = write_tiny_clip(args.out, concepts)
    print(f"wrote {path}; use it with: AIWORKER_SAFETY_MODEL={path} ./horde-bridge.sh --local ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
