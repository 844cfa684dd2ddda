"""Every loadable baseline loads offline from a real single-file checkpoint and generates."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from horde_worker.inference import checkpoint
from horde_worker.inference.generate import generate_images as txt2img
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import tiny_sd2_components, tiny_sdxl_components, write_tiny_checkpoint
from tests.test_checkpoint_and_pipeline import no_network, request  # noqa: F401  (fixture: no outbound traffic)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines")
    return {b: write_tiny_checkpoint(folder / f"{b}.safetensors", b)
            for b in ("stable_diffusion_2", "stable_diffusion_xl")}


def test_sdxl_checkpoint_round_trips_both_text_encoders(checkpoints):
    state = checkpoint.load_state_dict(checkpoints["stable_diffusion_xl"])
    info = checkpoint.inspect_checkpoint(state)
    assert info.baseline == "stable_diffusion_xl"
    unet, _vae, clip_l, big_g = tiny_sdxl_components()
    loaded = [checkpoint.build_unet(state, info),
              checkpoint.build_clip_text_encoder(state, ("conditioner.embedders.0.transformer.",)),
              checkpoint.build_open_clip_text_encoder(state, "conditioner.embedders.1.model.", True, False)]
    for original, rebuilt in zip((unet, clip_l, big_g), loaded, strict=True):
        a, b = original.state_dict(), rebuilt.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sd2_drops_the_text_towers_last_block_as_sd2_does(checkpoints):
    state = checkpoint.load_state_dict(checkpoints["stable_diffusion_2"])
    assert checkpoint.inspect_checkpoint(state).baseline == "stable_diffusion_2"
    encoder = checkpoint.build_open_clip_text_encoder(state, "cond_stage_model.model.", False, True)
    original = tiny_sd2_components()[2]
    assert encoder.config.num_hidden_layers == original.config.num_hidden_layers - 1
    kept = encoder.state_dict()
    assert all(torch.equal(kept[k], original.state_dict()[k]) for k in kept)


@pytest.mark.parametrize(("baseline", "v_prediction", "pipeline_class"), [
    ("stable_diffusion_2", False, "StableDiffusionPipeline"),
    ("stable_diffusion_2", True, "StableDiffusionPipeline"),
    ("stable_diffusion_xl", False, "StableDiffusionXLPipeline"),
])
def test_baseline_generates_offline_and_reproduces(checkpoints, baseline, v_prediction, pipeline_class):
    model = load_pipeline(checkpoints[baseline], torch.device("cpu"), torch.float32, v_prediction=v_prediction)
    assert model.baseline == baseline and type(model.pipeline).__name__ == pipeline_class
    expected = "v_prediction" if v_prediction else "epsilon"
    assert model.pipeline.scheduler.config.prediction_type == expected
    first, second = txt2img(model, request(seeds=[3, 4], width=192, height=128, sampler_name="k_euler_a"))
    assert first.shape == (128, 192, 3) and np.abs(first.astype(int) - second.astype(int)).mean() > 5
    again = txt2img(model, request(seeds=[3], width=192, height=128, sampler_name="k_euler_a"))[0]
    assert np.abs(again.astype(int) - first.astype(int)).max() <= 2


def test_large_and_unsupported_baselines_are_refused_at_start_with_a_reason(tmp_path):
    import copy
    import json

    from horde_worker.models.catalog import plan_catalog
    from horde_worker.models.reference import ModelReference
    from tests.conftest import SHARED_DATA

    entries = json.loads((SHARED_DATA / "stable_diffusion.json").read_text())
    future = copy.deepcopy(entries["SDXL 1.0"])
    future.update(name="Some Future Model", baseline="stable_diffusion_9")
    reference = ModelReference({**entries, "Some Future Model": future}, "test")
    plan = plan_catalog(["Stable Cascade 1.0", "Flux.1-Schnell fp8 (Compact)", "SDXL 1.0", "Some Future Model"], [],
                        tmp_path, reference, {}, load_large_models=True)
    assert any("'stable_diffusion_9' is unknown to this worker" in n for n in plan.notices)
    downloads = [(e.name, t.dest.name) for e, t in plan.to_download]
    assert downloads == [("Stable Cascade 1.0", "stable_cascade_stage_b.safetensors"),
                         ("Stable Cascade 1.0", "stable_cascade_stage_c.safetensors"),
                         ("Flux.1-Schnell fp8 (Compact)", "flux1CompactCLIPAnd_Flux1SchnellFp8.safetensors"),
                         ("Flux.1-Schnell fp8 (Compact)", "tokenizer.json"),
                         ("SDXL 1.0", "sd_xl_base_1.0.safetensors")]
    without = plan_catalog(["Flux.1-Schnell fp8 (Compact)"], [], tmp_path, reference, {})
    assert any("load_large_models" in n for n in without.notices) and not without.to_download


@pytest.fixture(scope="module")
def flux_checkpoints(tmp_path_factory):
    from horde_worker.inference.tiny import write_tiny_flux_checkpoint

    folder = tmp_path_factory.mktemp("flux")
    return {"schnell": write_tiny_flux_checkpoint(folder / "schnell.safetensors", fp8=True),
            "dev": write_tiny_flux_checkpoint(folder / "dev.safetensors", seed=1, guidance=True, fp8=False)}


def test_flux_transformer_layout_round_trips_exactly():
    from horde_worker.inference import flux
    from horde_worker.inference.tiny import tiny_flux_components

    transformer = tiny_flux_components(guidance=True)[0]
    bfl = {flux.TRANSFORMER_PREFIX + k: v for k, v in flux.bfl_from_transformer(transformer).items()}
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in bfl
    assert "model.diffusion_model.single_blocks.0.linear1.weight" in bfl
    rebuilt = flux.build_transformer(bfl, torch.float32)
    assert rebuilt.config.guidance_embeds and rebuilt.config.num_attention_heads == 2
    a, b = transformer.state_dict(), rebuilt.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def dev_sigmas(steps: int) -> list[float]:
    """The reference's normal schedule for Flux.1 dev: timesteps spaced evenly between its 10000-level table's
    ends (both already shifted), each shifted once more by mu = 1.15."""
    def shift(t):
        return math.exp(1.15) / (math.exp(1.15) + (1 / t - 1))

    return [shift(float(t)) for t in np.linspace(1.0, shift(1e-4), steps)]


REFERENCE_FLUX_SIGMAS = {"dev": dev_sigmas, "schnell": lambda steps: list(np.linspace(1.0, 0.001, steps))}


def test_flux_schedules_are_the_references():
    from horde_worker.inference.flux import flow_sigmas

    assert np.allclose(flow_sigmas(4, True), [1.0, 0.86338, 0.61249, 0.00100], atol=2e-5)
    assert np.allclose(flow_sigmas(4, False), [1.0, 0.667, 0.334, 0.001], atol=1e-3)
    for steps in (1, 2, 20, 50):
        assert np.allclose(flow_sigmas(steps, True), dev_sigmas(steps), rtol=1e-5)
        assert np.allclose(flow_sigmas(steps, False), REFERENCE_FLUX_SIGMAS["schnell"](steps), rtol=1e-5)


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_flux_all_in_one_generates_offline(flux_checkpoints, variant):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from horde_worker.inference.samplers import UnsupportedSampler

    model = load_pipeline(flux_checkpoints[variant], torch.device("cpu"), torch.float32)
    assert model.baseline == "flux_1" and type(model.pipeline).__name__ == "FluxPipeline"
    # Built from configs, yet in inference mode: dropout would make every image random.
    assert not any(m.training for c in model.pipeline.components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules())
    schedules: list[np.ndarray] = []
    set_timesteps = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(set_timesteps)  # the pipeline reads its signature
    def recording(self, *args, **kwargs):
        set_timesteps(self, *args, **kwargs)
        schedules.append(self.sigmas.numpy().copy())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", recording)
        first, second = txt2img(model, request(seeds=[5, 6], width=128, height=192, prompt="a red fox"))
    # The reference's Flux schedule, whatever the image size: dev shifted by a fixed mu, schnell not.
    expected = REFERENCE_FLUX_SIGMAS[variant](request().steps)
    assert np.allclose(schedules[-1], expected + [0.0], rtol=1e-5, atol=1e-7)
    assert first.shape == (192, 128, 3) and np.abs(first.astype(int) - second.astype(int)).mean() > 5
    again = txt2img(model, request(seeds=[5], width=128, height=192, prompt="a red fox"))[0]
    assert np.abs(again.astype(int) - first.astype(int)).max() <= 1  # alone vs in a batch of two: rounding only
    guided = txt2img(model, request(seeds=[5], width=128, height=192, prompt="a red fox",
                                    negative_prompt="blue sea", cfg_scale=3.0))[0]
    assert np.abs(guided.astype(int) - first.astype(int)).mean() > 0.5  # true CFG with the negative prompt
    with pytest.raises(UnsupportedSampler, match="k_euler only"):
        txt2img(model, request(sampler_name="k_euler_a", width=128, height=128))


def test_flux_img2img_runs_the_last_steps_of_the_longer_reference_schedule(flux_checkpoints):
    import io

    from PIL import Image

    from horde_worker.inference.flux import flow_sigmas
    from horde_worker.inference.generate import run_job

    model = load_pipeline(flux_checkpoints["dev"], torch.device("cpu"), torch.float32)
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 160, 90)).save(buffer, format="PNG")
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps: list[int] = []
    used = []
    step = FlowMatchEulerDiscreteScheduler.step

    def recording(self, *args, **kwargs):
        used.append(self)
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlowMatchEulerDiscreteScheduler, "step", recording)
        run_job(model, request(seeds=[5], width=128, height=128, steps=4, source_image=buffer.getvalue(),
                               denoising_strength=0.5), lambda step, total: steps.append(step))
    scheduler = used[0]
    assert all(s is scheduler for s in used) and scheduler is not model.pipeline.scheduler  # the job's own
    assert steps == [1, 2, 3, 4]
    assert np.allclose(scheduler.sigmas.numpy(), flow_sigmas(8, True) + [0.0], rtol=1e-5, atol=1e-7)
    assert scheduler.begin_index == 4  # int(4 / 0.5) = 8 steps made, the last 4 run


def test_flux_fp8_weights_stay_fp8_and_widen_per_layer(flux_checkpoints):
    from horde_worker.inference.flux import move_keeping_fp8

    model = load_pipeline(flux_checkpoints["schnell"], torch.device("cpu"), torch.float32)
    assert model.pipeline.fp8_parts == {"transformer", "t5"}
    wide = txt2img(model, request(seeds=[9], width=128, height=128))[0]
    move_keeping_fp8(model.pipeline, torch.device("cpu"), torch.float32)  # what a GPU gets
    pipe = model.pipeline
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    narrow = txt2img(model, request(seeds=[9], width=128, height=128))[0]
    assert np.abs(narrow.astype(int) - wide.astype(int)).max() <= 2  # the file held fp8: nothing is lost


def test_flux_read_into_ram_for_a_gpu_keeps_its_fp8_weights(flux_checkpoints):
    from horde_worker.inference.residency import Residency

    # The residency of a GPU slot reads models into RAM first and moves them module by module later:
    # the fp8 parts must already be narrow in RAM, or the GPU would get the wide copy.
    residency = Residency(torch.device("cuda"), torch.float16, ram_budget=None, device_budget=None)
    residency.preload("flux", str(flux_checkpoints["schnell"]))
    pipe = residency.in_ram["flux"].pipeline
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
