"""A model on a card smaller than it and its job: the plan chosen from real module sizes, cheapest step first,
and the plan carried out (text encoders and denoiser blocks visiting the device for each forward) gives the
same images as the model fully on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from horde_worker.inference import fit
from horde_worker.inference.generate import generate_images
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import write_tiny_checkpoint, write_tiny_flux_checkpoint
from horde_worker.inference.transfer import _tensors
from horde_worker.inference.vram import job_phases
from tests.conftest import job_request


def _model(tmp_path, baseline):
    if baseline == "qwen_image":
        from horde_worker.inference.tiny_qwen import write_tiny_qwen

        manifest = tmp_path / "compvis" / "Qwen-Image.parts.json"
        path = manifest if manifest.exists() else write_tiny_qwen(tmp_path / "compvis")
    elif baseline == "stable_cascade":
        from horde_worker.inference.tiny_cascade import write_tiny_cascade

        manifest = tmp_path / "compvis" / "Stable_Cascade.parts.json"
        path = manifest if manifest.exists() else write_tiny_cascade(tmp_path / "compvis")
    elif baseline == "flux_1":
        path = write_tiny_flux_checkpoint(tmp_path / "f.safetensors", guidance=True)
    else:
        path = write_tiny_checkpoint(tmp_path / "m.safetensors", baseline)
    return load_pipeline(path, torch.device("cpu"), torch.float32, name=baseline)


def test_the_plan_takes_the_cheapest_steps_that_fit(tmp_path):
    model = _model(tmp_path, "stable_diffusion_xl")
    parts = fit.model_parts(model.pipeline)
    encoders = parts["text_encoder"] + parts["text_encoder_2"]
    assert encoders > 0 and parts["unet"] > 0 and parts["vae"] > 0
    total = sum(parts.values())
    denoise, decode = job_phases("stable_diffusion_xl", 1024, 1024, 1)
    assert fit.plan(parts, denoise, decode, None).full  # nothing known: everything stays
    assert fit.plan(parts, denoise, decode, total + max(denoise, decode)).full
    # A little short: the text encoders wait in RAM, nothing else changes.
    short = fit.plan(parts, denoise, decode, total + max(denoise, decode) - 1)
    assert short == fit.FitPlan(encoders_visit=True)
    resident = total - encoders
    # The decode's peak does not fit beside the rest: tiled VAE too.
    assert fit.plan(parts, 0, decode, resident + decode - 1) == fit.FitPlan(True, True, False)
    # Sampling does not fit even without the encoders: the denoiser's blocks visit, and then the decode fits.
    assert fit.plan(parts, denoise, 0, resident + denoise - 1) == fit.FitPlan(True, False, True)
    assert "denoiser streamed" in fit.plan(parts, denoise, 0, resident).describe()
    assert fit.heavier(fit.FitPlan(True, False, False), fit.FitPlan(False, True, False)) == fit.FitPlan(True, True)


DENOISER = {"flux_1": "transformer", "qwen_image": "transformer", "stable_cascade": "prior"}


@pytest.mark.parametrize("baseline", ["stable_diffusion_1", "stable_diffusion_xl", "flux_1", "qwen_image",
                                      "stable_cascade"])
def test_visiting_encoders_and_blocks_give_the_same_images(tmp_path, baseline):
    full = _model(tmp_path, baseline)
    fitted = _model(tmp_path, baseline)
    request = job_request(baseline=baseline, width=64, height=64, steps=3, seeds=[5, 6],
                          cfg_scale={"flux_1": 3.5, "qwen_image": 2.0}.get(baseline, 7.0))
    expected = generate_images(full, request)
    # On this CPU the "device" is a second copy of each visiting module's weights, made for each forward.
    plan = fit.FitPlan(encoders_visit=True, blocks_visit=True)
    assert fitted.fit.apply(fitted, plan, torch.device("cpu"))
    visitors = fitted.fit.visitors
    assert set(visitors) >= {"text_encoder", DENOISER.get(baseline, "unet")}
    got = generate_images(fitted, request)
    assert fitted.fit.visits() > 0
    for a, b in zip(got, expected, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # Between forwards every visiting module points at its host copy again.
    for visitor in (v for group in visitors.values() for v in group):
        chunks = [(c.data_ptr(), c.data_ptr() + c.numel()) for c in visitor.weights.chunks]
        assert all(any(lo <= t.data_ptr() < hi for lo, hi in chunks)
                   for *_, t in _tensors([visitor.module]) if t.numel())
    # Back to the full plan: no hooks left, same images.
    assert fitted.fit.apply(fitted, fit.FitPlan(), torch.device("cpu"))
    visits = sum(v.visits for group in visitors.values() for v in group)
    again = generate_images(fitted, request)
    assert sum(v.visits for group in visitors.values() for v in group) == visits
    for a, b in zip(again, expected, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_tiled_vae_step_switches_the_vae_to_tiles_and_back(tmp_path):
    model = _model(tmp_path, "stable_diffusion_1")
    model.fit.apply(model, fit.FitPlan(tiled_vae=True), torch.device("cpu"))
    assert model.pipeline.vae.use_tiling
    model.fit.apply(model, fit.FitPlan(), torch.device("cpu"))
    assert not model.pipeline.vae.use_tiling


def test_the_residency_plans_against_what_the_device_can_hold_beside_busy_models(tmp_path):
    from horde_worker.inference.residency import Residency

    model = _model(tmp_path, "stable_diffusion_xl")
    residency = Residency(torch.device("cpu"), torch.float32, ram_budget=None, device_budget=None)
    phases = job_phases("stable_diffusion_xl", 1024, 1024, 1)
    assert residency.capacity("m") is None and residency._plan("m", model, phases).full  # a CPU: nothing to fit
    total = sum(fit.model_parts(model.pipeline).values())
    residency.capacity_override = total + max(phases)
    assert residency._plan("m", model, phases).full
    # Another model in use by a running job takes its share of the card: this one's text encoders must wait.
    residency.sizes["other"] = 1
    residency.on_device["other"] = object()
    residency._pinned["other"] += 1
    assert residency.capacity("m") == total + max(phases) - 1
    assert residency._plan("m", model, phases) == fit.FitPlan(encoders_visit=True)
    residency._pinned.clear()  # not in use: it can be evicted, so it does not count
    assert residency._plan("m", model, phases).full


def test_the_card_benchmark_runs_on_the_cpu_and_its_plans_follow_the_card(tmp_path):
    import json

    from horde_worker.bench.fit import main

    out = tmp_path / "fit.json"
    assert main(["--device", "cpu", "--baselines", "stable_diffusion_1", "--cards", "40,5", "--json", str(out)]) == 0
    cards = json.loads(out.read_text())["baselines"]["stable_diffusion_1"]["cards"]
    assert [c["plan"] for c in cards] == ["all on the device", "text encoders in RAM",
                                          "text encoders in RAM, tiled VAE, denoiser streamed from RAM (slow)"]
    assert all(c["image_s"] > 0 for c in cards)
