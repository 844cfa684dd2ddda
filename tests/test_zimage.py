"""Z-Image-Turbo from the reference's split files in ComfyUI's layouts: the mappings round-trip bit for bit,
the model loads through its manifest as a real one does, and makes reproducible images of the requested
size (txt2img and img2img) with the reference's schedule; what the baseline cannot do is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import zimage
from horde_worker.inference.checkpoint import load_state_dict
from horde_worker.inference.generate import UnsupportedJob, generate_images
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny_zimage import PARTS, tiny_zimage_components, write_tiny_zimage
from tests.conftest import job_request, png_bytes


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tiny_zimage(tmp_path_factory.mktemp("zimage") / "compvis")


@pytest.fixture(scope="module")
def model(manifest):
    return load_pipeline(manifest, torch.device("cpu"), torch.float32, name="z")


def test_the_transformer_layout_round_trips_bit_for_bit():
    transformer = tiny_zimage_components(vocab_size=300)[0]
    comfy = zimage.comfy_from_transformer(transformer)
    assert any(".attention.qkv.weight" in k for k in comfy) and not any(".to_q." in k for k in comfy)
    assert "x_embedder.weight" in comfy and "final_layer.linear.weight" in comfy
    back = zimage.transformer_weights(comfy)
    theirs = transformer.state_dict()
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    config = zimage.transformer_config(back)
    assert {k: config[k] for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim",
                                   "in_channels", "axes_dims")} == {
        k: transformer.config[k] for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads",
                                           "cap_feat_dim", "in_channels", "axes_dims")}


def test_every_part_loads_with_the_files_weights(manifest, model):
    pipe = model.pipeline
    assert model.baseline == "z_image_turbo" and type(pipe).__name__ == "ZImagePipeline"
    folder = manifest.parent
    text = load_state_dict((folder / PARTS["text_encoders"]).resolve())
    ours = pipe.text_encoder.state_dict()
    assert all(torch.equal(ours[k.removeprefix("model.")], v) for k, v in text.items())
    transformer = zimage.transformer_weights(load_state_dict((folder / PARTS["unet"]).resolve()))
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in transformer.items())
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.1159)


def test_the_schedules_are_the_references():
    # shift 3: sigma(t) = 3t / (1 + 2t); "normal" spaces t evenly from 1 down to the lowest level's sigma.
    lowest = 3 * 0.001 / 1.002
    normal = zimage.sigmas(9, karras=False)
    assert len(normal) == 9 and normal[0] == 1.0
    expected = [3 * t / (1 + 2 * t) for t in np.linspace(1.0, lowest, 9)]
    assert normal == pytest.approx(expected, rel=1e-6)
    karras = zimage.sigmas(9, karras=True)
    assert karras[0] == pytest.approx(1.0) and karras[-1] == pytest.approx(lowest, rel=1e-5)
    ramp = [(1 + i / 8 * (lowest ** (1 / 7) - 1)) ** 7 for i in range(9)]
    assert karras == pytest.approx(ramp, rel=1e-5)


def test_txt2img_makes_the_requested_size_and_each_seed_reproduces(model):
    request = job_request(baseline="z_image_turbo", width=96, height=64, steps=3, cfg_scale=1.0, seeds=[4, 5])
    first = generate_images(model, request)
    assert [image.shape for image in first] == [(64, 96, 3)] * 2
    assert np.abs(first[0].astype(int) - first[1]).mean() > 1  # two seeds, two images
    again = generate_images(model, request)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    alone = generate_images(model, job_request(baseline="z_image_turbo", width=96, height=64, steps=3,
                                               cfg_scale=1.0, seeds=[5]))
    assert np.abs(alone[0].astype(int) - first[1]).max() <= 1  # a seed's image does not depend on its batch
    other = generate_images(model, job_request(baseline="z_image_turbo", width=96, height=64, steps=3,
                                               cfg_scale=1.0, seeds=[4], prompt="a different prompt"))
    assert np.abs(other[0].astype(int) - first[0]).mean() > 0.5  # the prompt reaches the image


def test_img2img_starts_from_the_source_and_refusals_are_clear(model):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    fields = dict(baseline="z_image_turbo", width=64, height=64, steps=3, cfg_scale=1.0, seeds=[2])
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


def test_the_new_baselines_benchmark_runs_on_the_cpu(tmp_path):
    import json

    from horde_worker.bench.new_baselines import main

    out = tmp_path / "z.json"
    assert main(["--device", "cpu", "--images", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for baseline, steps in (("z_image_turbo", 9), ("qwen_image", 20), ("stable_cascade", 20)):
        figures = results[baseline]
        assert figures["steps"] == steps and figures["worker_s_per_image"] > 0
        assert figures["plain_diffusers_s_per_image"] > 0 and figures["ratio_plain_over_worker"] > 0
