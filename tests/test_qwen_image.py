"""Qwen-Image from the reference's split files in ComfyUI's layouts (fp8 transformer, Wan-layout VAE, scaled-fp8
Qwen2.5-VL): the mappings round-trip bit for bit and read the released sizes back, the parts load with the
files' weights (fp8 kept fp8), and the model makes reproducible images of the requested size with the
reference's schedule and guidance; what the baseline cannot do is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import qwen_image, scaled_fp8
from horde_worker.inference.checkpoint import load_state_dict
from horde_worker.inference.generate import UnsupportedJob, generate_images
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny_qwen import PARTS, write_tiny_qwen
from tests.conftest import job_request, png_bytes

QWEN = dict(baseline="qwen_image", sampler_name="k_euler")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tiny_qwen(tmp_path_factory.mktemp("qwen") / "compvis")


@pytest.fixture(scope="module")
def model(manifest):
    return load_pipeline(manifest, torch.device("cpu"), torch.float32, name="q")


def _meta(module_class, **config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_class(**config).state_dict()


def test_the_vae_layout_round_trips_through_diffusers_converter_at_the_released_size():
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ours = _meta(AutoencoderKLQwenImage)  # base_dim 96, as released
    wan = {qwen_image.wan_vae_key(k): v for k, v in ours.items()}
    assert len(wan) == len(ours)
    assert "decoder.upsamples.4.shortcut.weight" in wan and "encoder.middle.1.to_qkv.weight" in wan
    back = convert_wan_vae_to_diffusers(wan)
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)


def test_the_released_sizes_are_read_back_from_the_tensors():
    from diffusers import QwenImageTransformer2DModel

    full = _meta(QwenImageTransformer2DModel, num_layers=60)  # diffusers' defaults are the released model's
    assert qwen_image.transformer_config(full) == {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56)}
    text = {"embed_tokens.weight": torch.empty(152064, 3584, device="meta"),
            "layers.0.mlp.gate_proj.weight": torch.empty(18944, 3584, device="meta"),
            "layers.0.self_attn.k_proj.weight": torch.empty(512, 3584, device="meta"),
            **{f"layers.{i}.input_layernorm.weight": torch.empty(3584, device="meta") for i in range(28)}}
    config = qwen_image.text_config(text)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (28, 4, 28)
    assert config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_every_part_loads_with_the_files_weights(manifest, model):
    folder = manifest.parent
    pipe = model.pipeline
    transformer_file = load_state_dict((folder / PARTS["unet"]).resolve())
    assert transformer_file[qwen_image.FP8_PROBE].dtype == torch.float8_e4m3fn
    state = pipe.transformer.state_dict()
    assert set(state) == set(transformer_file)
    assert all(torch.equal(state[k], v.float()) for k, v in transformer_file.items())

    vae_file = load_state_dict((folder / PARTS["vae"]).resolve())
    vae_state = pipe.vae.state_dict()
    assert all(torch.equal(vae_state[k], v.float()) for k, v in
               {k2: vae_file[qwen_image.wan_vae_key(k2)] for k2 in vae_state}.items())

    text_file = load_state_dict((folder / PARTS["text_encoders"]).resolve())
    assert "scaled_fp8" in text_file and any(k.startswith("visual.") for k in text_file)
    layer = pipe.text_encoder.layers[0].self_attn.q_proj
    assert isinstance(layer, scaled_fp8.ScaledFp8Linear)
    stored = text_file["model.layers.0.self_attn.q_proj.weight"]
    assert stored.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.float(), stored.float())
    assert layer.scale == float(text_file["model.layers.0.self_attn.q_proj.scale_weight"])
    x = torch.randn(3, layer.in_features)
    expected = torch.nn.functional.linear(x, stored.float() * layer.scale, layer.bias)
    assert torch.allclose(layer(x), expected)
    widened = sum(isinstance(m, scaled_fp8.ScaledFp8Linear) for m in pipe.text_encoder.modules())
    assert widened == 2 * 7  # every attention and MLP projection of both layers


def test_the_schedule_is_the_references_normal_one_shifted_by_3_1():
    sigmas = qwen_image.sigmas(20, karras=False)
    assert qwen_image.SHIFT == 3.1  # the reference's model sampling node for Qwen-Image
    assert len(sigmas) == 21 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    lowest = 3.1 * 0.001 / (1 + 2.1 * 0.001)
    t = float(np.linspace(1.0, lowest, 20, dtype=np.float32)[10])
    assert sigmas[10] == pytest.approx(3.1 * t / (1 + 2.1 * t), rel=1e-6)
    assert all(a > b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    karras = qwen_image.sigmas(20, karras=True)
    assert karras[0] == pytest.approx(1.0) and karras[-2] == pytest.approx(lowest, rel=1e-5) and karras != sigmas


def test_txt2img_makes_the_requested_size_seeds_reproduce_and_cfg_and_prompt_act(model):
    fields = dict(QWEN, width=96, height=64, steps=3, cfg_scale=2.0)
    first = generate_images(model, job_request(seeds=[4, 5], **fields))
    assert [image.shape for image in first] == [(64, 96, 3)] * 2
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1
    again = generate_images(model, job_request(seeds=[4, 5], **fields))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    alone = generate_images(model, job_request(seeds=[5], **fields))
    assert np.abs(alone[0].astype(int) - first[1]).max() <= 1
    # A long prompt: the tiny byte-level tokenizer makes the reference's prompt template most of the tokens.
    long = "a lighthouse on a cliff at dusk " * 8
    other = generate_images(model, job_request(seeds=[4], prompt=long, **fields))
    assert np.abs(other[0].astype(int) - first[0]).mean() > 0.5
    unguided = generate_images(model, job_request(seeds=[4], prompt=long, **{**fields, "cfg_scale": 1.0}))
    assert np.abs(unguided[0].astype(int) - other[0]).mean() > 0.5  # guidance runs at cfg 2


def test_img2img_starts_from_the_source_and_refusals_are_clear(model):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    fields = dict(QWEN, width=64, height=64, steps=3, cfg_scale=1.0, seeds=[2])
    light = generate_images(model, job_request(source_image=png_bytes(source), denoising_strength=0.2, **fields))[0]
    strong = generate_images(model, job_request(source_image=png_bytes(source), denoising_strength=1.0, **fields))[0]
    red = np.array([200, 30, 30])
    assert np.abs(light.astype(int) - red).mean() < np.abs(strong.astype(int) - red).mean()
    again = generate_images(model, job_request(source_image=png_bytes(source), denoising_strength=0.2, **fields))[0]
    assert np.array_equal(light, again)
    mask = Image.new("L", (64, 64), 255)
    with pytest.raises(UnsupportedJob, match="inpainting"):
        generate_images(model, job_request(source_image=png_bytes(source), source_mask=png_bytes(mask),
                                           source_processing="inpainting", **fields))
    with pytest.raises(UnsupportedJob, match="ControlNet"):
        generate_images(model, job_request(source_image=png_bytes(source), control_type="canny", **fields))
    with pytest.raises(Exception, match="k_euler only"):
        generate_images(model, job_request(**{**fields, "sampler_name": "k_dpmpp_2m"}))


def test_half_precision_keeps_the_files_fp8_and_widens_per_layer(manifest, model):
    half = load_pipeline(manifest, torch.device("cpu"), torch.float16, name="q16")
    pipe = half.pipeline
    assert pipe.transformer.transformer_blocks[0].img_mlp.net[0].proj.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.dtype == torch.bfloat16  # computes in bf16: fp16 overflows this baseline
    assert pipe.text_encoder.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert pipe.text_encoder.embed_tokens.weight.dtype == torch.bfloat16
    fields = dict(QWEN, width=64, height=64, steps=3, cfg_scale=2.0, seeds=[3])
    low = generate_images(half, job_request(**fields))[0].astype(float)
    full = generate_images(model, job_request(**fields))[0].astype(float)
    assert np.corrcoef(low.ravel(), full.ravel())[0, 1] > 0.95  # the same image, in fewer bits
