"""Stable Cascade from the reference's two ComfyUI checkpoints: the UNets' Stability layout round-trips through
diffusers' converter and reads the released sizes back, every part loads with the files' weights, and a job runs
stage C then stage B then stage A on the reference's schedules, reproducibly, with remix conditioning on its
source images; what the baseline cannot do is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import cascade, cascade_run
from horde_worker.inference.checkpoint import load_state_dict
from horde_worker.inference.generate import UnsupportedJob, UnsupportedSampler, generate_images
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny_cascade import PARTS, stability_from_unet, tiny_cascade_components, write_tiny_cascade
from tests.conftest import job_request, png_bytes

CASCADE = dict(baseline="stable_cascade", width=128, height=128, steps=20, cfg_scale=4.0, sampler_name="k_euler_a")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tiny_cascade(tmp_path_factory.mktemp("cascade") / "compvis")


@pytest.fixture(scope="module")
def model(manifest):
    return load_pipeline(manifest, torch.device("cpu"), torch.float32, name="c")


def test_the_unet_layouts_round_trip_and_the_released_sizes_are_read_back():
    from diffusers import StableCascadeUNet

    prior, decoder = tiny_cascade_components()[:2]
    for unet in (prior, decoder):
        back = cascade.unet_weights(stability_from_unet(unet))
        state = unet.state_dict()
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
        rebuilt = StableCascadeUNet(**cascade.unet_config(back))
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    # The released stages, built on the meta device: their configs come back from the tensors' shapes.
    released_c = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
                      conditioning_dim=2048, block_out_channels=[2048, 2048], num_attention_heads=[32, 32],
                      down_num_layers_per_block=[8, 24], up_num_layers_per_block=[24, 8],
                      down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
                      block_types_per_layer=[cascade.PRIOR_TYPES] * 2, clip_text_in_channels=1280,
                      clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4,
                      timestep_conditioning_type=["sca", "crp"], switch_level=[False])
    released_b = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2,
                      conditioning_dim=1280, block_out_channels=[320, 640, 1280, 1280],
                      down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                      down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[3, 3, 2, 2],
                      num_attention_heads=[0, 0, 20, 20], block_types_per_layer=list(cascade.DECODER_TYPES),
                      clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16,
                      pixel_mapper_in_channels=3, timestep_conditioning_type=["sca"], dropout=[0, 0, 0.1, 0.1])
    for released in (released_c, released_b):
        with torch.device("meta"):
            state = StableCascadeUNet(**released).state_dict()
        derived = cascade.unet_config(state)
        assert {k: derived[k] for k in released} == {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in released.items()}


def test_every_part_loads_with_the_files_weights(manifest, model):
    pipe = model.pipeline
    stage_c = load_state_dict(manifest.parent / PARTS["stable_cascade_stage_c"])
    stage_b = load_state_dict(manifest.parent / PARTS["stable_cascade_stage_b"])
    assert any(".attention.attn.in_proj_weight" in k for k in stage_c)  # Stability's fused attention
    for unet, tensors in ((pipe.prior, stage_c), (pipe.decoder, stage_b)):
        expected = cascade.unet_weights(tensors)
        state = unet.state_dict()
        assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    text = pipe.text_encoder
    projection = stage_c["text_encoder.clip_g.text_projection"]
    assert torch.equal(text.text_projection.weight, projection.t())  # ComfyUI's right-multiplied matrix
    embedding = stage_c["text_encoder.clip_g.transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(text.get_input_embeddings().weight, embedding)
    assert torch.equal(pipe.image_encoder.visual_projection.weight, stage_c["clip_l_vision.visual_projection.weight"])
    assert torch.equal(pipe.vqgan.vquantizer.embedding.weight, stage_b["vae.vquantizer.codebook.weight"])
    assert pipe.vqgan.config.scale_factor == cascade.STAGE_A_SCALE


def test_the_schedules_are_the_references():
    # Stage C's levels: the cosine schedule with its log-SNR shifted by 2; stage B's unshifted.
    sigma_max = math.sqrt(0.9999 / 0.0001)
    prior_table, prior = cascade_run.schedule(cascade.PRIOR_SHIFT, 13, karras=False)
    _, decoder = cascade_run.schedule(1.0, 7, karras=False)
    assert len(prior) == 14 and len(decoder) == 8 and prior[-1] == decoder[-1] == 0.0
    assert prior[0] == pytest.approx(sigma_max, rel=1e-3) and prior_table.sigma_max == pytest.approx(sigma_max, rel=1e-4)
    assert all(a > b for a, b in zip(prior[:-1], prior[1:], strict=True))
    middle = cascade_run.sigma_at(0.5, 1.0)
    alpha = math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert middle == pytest.approx(math.sqrt((1 - alpha) / alpha))
    # A shift of 2 lowers the log-SNR by 2 ln 2: sigma doubles wherever the clamp does not act.
    assert cascade_run.sigma_at(0.5, 2.0) == pytest.approx(2 * middle, rel=1e-9)
    assert cascade_run.timestep_ratio(middle) == pytest.approx(0.5, abs=1e-9)
    assert cascade_run.stage_steps(20) == (13, 7) and cascade_run.stage_steps(30) == (20, 10)
    longer = cascade_run.schedule(cascade.PRIOR_SHIFT, 14, karras=False)[1]
    assert cascade_run.schedule(cascade.PRIOR_SHIFT, 13, False, drop_penultimate=True)[1] == longer[:-2] + [0.0]
    _, karras = cascade_run.schedule(cascade.PRIOR_SHIFT, 13, karras=True)
    assert karras[0] == pytest.approx(prior_table.sigma_max, rel=1e-5)
    assert karras[-2] == pytest.approx(prior_table.sigma_min, rel=1e-5)


def _stage_latents(monkeypatch) -> list[torch.Tensor]:
    """Record each stage's result as the job runs."""
    seen: list[torch.Tensor] = []
    real = cascade_run.sample

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(result.clone())
        return result

    monkeypatch.setattr(cascade_run, "sample", recording)
    return seen


def test_txt2img_runs_both_stages_reproducibly_and_prompt_and_cfg_condition_stage_c(model, monkeypatch):
    steps: list[tuple[int, int]] = []
    seen = _stage_latents(monkeypatch)
    first = generate_images(model, job_request(seeds=[4, 5], **CASCADE), on_step=lambda a, b: steps.append((a, b)))
    assert [image.shape for image in first] == [(128, 128, 3)] * 2 and first[0].std() > 5
    assert seen[0].shape == (2, 16, 3, 3) and seen[1].shape == (2, 4, 32, 32)  # 42x, then 4x
    assert steps[-1] == (20, 20) and [s for s, _ in steps] == sorted(s for s, _ in steps)
    assert np.abs(first[0].astype(int) - first[1]).mean() > 5
    again = generate_images(model, job_request(seeds=[4, 5], **CASCADE))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    alone = generate_images(model, job_request(seeds=[5], **CASCADE))
    assert np.abs(alone[0].astype(int) - first[1]).max() <= 1
    base = seen[-2][0]
    other = generate_images(model, job_request(seeds=[4], prompt="a lighthouse on the cliffs at dusk", **CASCADE))
    prompted = seen[-2][0]
    unguided = generate_images(model, job_request(seeds=[4], **{**CASCADE, "cfg_scale": 1.0}))
    assert (prompted - base).norm() / base.norm() > 0.01  # the prompt conditions stage C
    assert (seen[-2][0] - base).norm() / base.norm() > 0.01  # and guidance acts on it
    assert np.abs(other[0].astype(int) - first[0]).mean() > 0 and np.abs(unguided[0].astype(int) - first[0]).mean() > 0


def test_remix_conditions_stage_c_on_its_source_images_and_refusals_are_clear(model, monkeypatch):
    seen = _stage_latents(monkeypatch)
    red, blue = Image.new("RGB", (96, 64), (220, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 220))
    fields = dict(CASCADE, seeds=[3])
    generate_images(model, job_request(**fields))
    plain = seen[-2]
    remixed = generate_images(model, job_request(source_image=png_bytes(red), source_processing="remix", **fields))
    with_red = seen[-2]
    generate_images(model, job_request(source_image=png_bytes(red), source_processing="remix",
                                       extra_images=[(png_bytes(blue), 0.8)], **fields))
    with_blue = seen[-2]
    assert remixed[0].shape == (128, 128, 3)
    # Four image tokens among 85 of a random prior: a small but certain change (none would give exactly 0).
    assert (with_red - plain).norm() / plain.norm() > 0.002 and (with_blue - with_red).norm() / plain.norm() > 0.002
    generate_images(model, job_request(source_image=png_bytes(red), source_processing="remix",
                                       extra_images=[(png_bytes(blue), 0.0)], **fields))
    assert not torch.equal(seen[-2], with_blue)  # the strength reaches the conditioning
    with pytest.raises(UnsupportedJob, match="img2img is not available for Stable Cascade"):
        generate_images(model, job_request(source_image=png_bytes(red), **fields))
    with pytest.raises(UnsupportedJob, match="ControlNet"):
        generate_images(model, job_request(source_image=png_bytes(red), control_type="canny", **fields))
    with pytest.raises(UnsupportedSampler, match="not available for Stable Cascade"):
        generate_images(model, job_request(**{**fields, "sampler_name": "dpmsolver"}))
    karras = generate_images(model, job_request(karras=True, **fields))[0]
    assert np.abs(karras.astype(int) - generate_images(model, job_request(**fields))[0]).mean() > 0.5


def test_bf16_stages_embed_their_timestep_from_float32(manifest):
    from diffusers import StableCascadeUNet

    unet = cascade.build_unet(load_state_dict(manifest.parent / PARTS["stable_cascade_stage_c"]), torch.bfloat16)
    ratio = torch.tensor([0.9973])
    got = unet.get_timestep_ratio_embedding(ratio)
    assert got.dtype == torch.bfloat16
    exact = StableCascadeUNet.get_timestep_ratio_embedding(unet, ratio.double()).float()
    coarse = StableCascadeUNet.get_timestep_ratio_embedding(unet, ratio.to(torch.bfloat16)).float()
    assert (got.float() - exact).abs().max() < 0.01 < (coarse - exact).abs().max()
