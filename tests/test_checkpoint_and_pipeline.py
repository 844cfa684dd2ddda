"""Checkpoints load offline through the real path, and txt2img honours prompt, seeds and samplers."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch

from horde_worker.inference import checkpoint
from horde_worker.inference.generate import generate_images as txt2img
from horde_worker.inference.messages import GenerateRequest
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import tiny_sd15_components
from horde_worker.supervisor.jobspec import split_prompt
from tests.conftest import job_request


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any outbound connection fails the test: loading must never contact a hub."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"outbound connection attempted to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


def request(**overrides) -> GenerateRequest:
    return job_request(**{"width": 256, "height": 256, **overrides})


def test_single_file_round_trip_gives_identical_weights(tiny_checkpoint):
    unet, vae, text_encoder = tiny_sd15_components()
    state = checkpoint.load_state_dict(tiny_checkpoint)
    info = checkpoint.inspect_checkpoint(state)
    assert info.baseline == "stable_diffusion_1"
    for original, loaded in ((unet, checkpoint.build_unet(state, info)), (vae, checkpoint.build_vae(state, info)),
                             (text_encoder, checkpoint.build_clip_text_encoder(state))):
        a, b = original.state_dict(), loaded.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_folder_loads_and_matches_single_file(tmp_path, model, tiny_checkpoint):
    model.pipeline.save_pretrained(tmp_path / "folder")
    folder_model = load_pipeline(tmp_path / "folder", torch.device("cpu"), torch.float32)
    a = txt2img(model, request())[0]
    b = txt2img(folder_model, request())[0]
    assert np.array_equal(a, b)


def test_ckpt_loads_weights_only_and_refuses_code(tmp_path):
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2)}}, good)
    assert torch.equal(checkpoint.load_state_dict(good)["a.weight"], torch.ones(2))

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded safely"):
        checkpoint.load_state_dict(bad)


def test_not_a_checkpoint_is_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "random.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(checkpoint.CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_pipeline(path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("sampler", ["k_euler", "k_euler_a", "k_dpmpp_sde"])
def test_batch_images_differ_and_each_seed_reproduces_alone(model, sampler):
    batch = txt2img(model, request(seeds=[10, 11, 12], sampler_name=sampler))
    assert len(batch) == 3 and all(img.shape == (256, 256, 3) and img.dtype == np.uint8 for img in batch)
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).mean() > 5
    alone = txt2img(model, request(seeds=[11], sampler_name=sampler))[0]
    assert np.abs(alone.astype(int) - batch[1].astype(int)).max() <= 2


def test_prompt_negative_prompt_sampler_and_karras_change_the_image(model):
    base = txt2img(model, request())[0].astype(int)
    variants = {
        "prompt": request(prompt="a dog"),
        "negative": request(negative_prompt="blurry"),
        "sampler": request(sampler_name="k_euler_a"),
        "karras": request(karras=True),
        "cfg": request(cfg_scale=2.0),
    }
    for what, req in variants.items():
        other = txt2img(model, req)[0].astype(int)
        # Karras' ramp shares the normal schedule's ends: a subtler change than the others.
        assert np.abs(other - base).mean() > (0.1 if what == "karras" else 0.2), f"{what} made no difference"
    assert np.array_equal(txt2img(model, request())[0], base.astype(np.uint8))


def test_every_listed_sampler_runs(model):
    from horde_worker.inference.samplers import SAMPLERS, UnsupportedSampler

    for name in SAMPLERS:
        img = txt2img(model, request(sampler_name=name, steps=3, width=128, height=128))[0]
        assert img.shape == (128, 128, 3)
    with pytest.raises(UnsupportedSampler, match="k_unknown"):
        txt2img(model, request(sampler_name="k_unknown"))


def test_split_prompt():
    assert split_prompt("a cat ### blurry, dark") == ("a cat", "blurry, dark")
    assert split_prompt("a cat") == ("a cat", "")
    assert split_prompt("a ### b ### c") == ("a", "b   c")


def test_choices_are_picked_from_each_images_seed(model):
    from horde_worker.inference.prompts import expand_choices

    assert expand_choices("a {red|blue|green} {cat|dog}", 5) == expand_choices("a {red|blue|green} {cat|dog}", 5)
    picks = {expand_choices("{a|b|c|d|e|f}", seed) for seed in range(40)}
    assert picks == set("abcdef")
    assert expand_choices("{x|{y|z}}", 3) in ("x", "y", "z")
    assert expand_choices("no {braces} here", 1) == "no {braces} here"
    batch = txt2img(model, request(prompt="a {red|blue} {cat|dog|fox} ### {blur|noise}", seeds=[20, 21, 22]))
    for index, seed in enumerate((20, 21, 22)):
        alone = txt2img(model, request(prompt="a {red|blue} {cat|dog|fox} ### {blur|noise}", seeds=[seed]))[0]
        assert np.abs(alone.astype(int) - batch[index].astype(int)).max() <= 2
