"""What the inference process keeps on its device, counted from the tensors themselves; the budget frees the
post-processing models before models, and never one in use."""

from __future__ import annotations

import pytest
import torch

from horde_worker.inference import vram
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.residency import Residency


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


def test_weights_are_counted_from_their_storages_once(model):
    pipe = model.pipeline
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    by_hand = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    assert vram.model_bytes(model) == vram.tensors_bytes(modules) == by_hand
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert vram.tensors_bytes([tied]) == 8 * 8 * 4  # one storage, counted once


def test_a_controlnet_built_for_the_model_counts_as_its_weights(model, tmp_path):
    from horde_worker.inference import control
    from horde_worker.inference.tiny_control import write_tiny_controlnets

    before = vram.model_bytes(model)
    path = next(p for p in write_tiny_controlnets(tmp_path, model.pipeline.unet) if not p.name.startswith("diff_"))
    controlnet = control.load_controlnet(model, str(path))
    assert vram.model_bytes(model) == before + vram.tensors_bytes([controlnet])
    model.controlnets.clear()


def test_activation_estimates_grow_with_size_and_cover_the_measured_peaks():
    sd = vram.job_need("stable_diffusion_1", 512, 512, 1)
    assert vram.job_need("stable_diffusion_1", 512, 768, 1) > sd and vram.job_need("stable_diffusion_1", 512, 512, 2) > sd
    # H100 peaks above the fp16 weights (docs/benchmarks.md): SD1.5 1.1 GiB on 512-640 px jobs of up to
    # 2 images, SDXL 4.6 GiB at 1024x1024.
    assert vram.job_need("stable_diffusion_1", 640, 640, 2) >= 1.1 * 2**30
    assert 4.6 * 2**30 <= vram.job_need("stable_diffusion_xl", 1024, 1024, 1) <= 1.5 * 4.6 * 2**30


def test_the_budget_frees_post_processing_models_first_and_never_one_in_use():
    residency = Residency(torch.device("cpu"), torch.float32, ram_budget=None, device_budget=100 * 2**20)
    released: list[str] = []
    busy = {"faces": True}

    def release(name: str):
        def go() -> bool:
            if busy.get(name):
                return False
            released.append(name)
            return True
        return go

    residency.account_extra("upscaler", 40 * 2**20, release("upscaler"))
    residency.account_extra("faces", 30 * 2**20, release("faces"))
    assert residency.device_bytes() == 70 * 2**20
    residency.make_room(20 * 2**20)
    assert released == []  # 70 + 20 fits in 100
    residency.make_room(50 * 2**20)
    assert released == ["upscaler"] and residency.device_bytes() == 30 * 2**20  # faces are in use
    busy["faces"] = False
    residency.make_room(90 * 2**20)
    assert released == ["upscaler", "faces"] and residency.device_bytes() == 0
