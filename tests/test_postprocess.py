"""Post-processing: upscalers of the real architectures (tiny widths, random weights) loaded by
spandrel from weight files, applied in the job's order, tiled without seams; and what is offered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from horde_worker.inference.messages import GenerateRequest, SlotSpec
from horde_worker.inference.postprocess import PostProcessors, upscale
from horde_worker.models.postprocessors import HORDE_POSTPROCESSORS, PostProcessSetup, plan_postprocessors


def write_upscaler(path, scale: int, seed: int):
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    # Real-ESRGAN x2plus feeds a pixel-unshuffled image to a x4 network; spandrel reads that from the weights.
    model = ESRGAN(num_filters=16, num_blocks=1, scale=scale, shuffle_factor=2 if scale == 2 else None)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # random weights give a near-black picture: lift it into a visible range
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("esrgan")
    return {"x4": str(write_upscaler(folder / "x4.safetensors", 4, 1)),
            "x2": str(write_upscaler(folder / "x2.safetensors", 2, 2))}


def picture(height: int = 40, width: int = 56) -> np.ndarray:
    generator = np.random.default_rng(0)
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + generator.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def test_scales_and_order(upscalers):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image = picture()
    assert processors.apply(image, [("RealESRGAN_x4plus", upscalers["x4"])]).shape == (160, 224, 3)
    assert processors.apply(image, [("RealESRGAN_x2plus", upscalers["x2"])]).shape == (80, 112, 3)
    a = processors.apply(image, [("x2", upscalers["x2"]), ("x4", upscalers["x4"])])
    b = processors.apply(image, [("x4", upscalers["x4"]), ("x2", upscalers["x2"])])
    assert a.shape == b.shape == (320, 448, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # the job's order is the order applied


def test_tiles_leave_no_seams(upscalers):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    model = processors.model(upscalers["x4"])
    image = picture(90, 130)
    whole = upscale(model, image, torch.device("cpu"), tile=4096)
    tiled = upscale(model, image, torch.device("cpu"), tile=48, overlap=16)
    assert tiled.shape == whole.shape == (360, 520, 3)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 2


def test_reference_upscalers_and_what_is_offered(tmp_path):
    setup, tasks = plan_postprocessors(tmp_path)
    names = {task.dest.name for task in tasks}
    assert {"RealESRGAN_x4plus.pth", "RealESRGAN_x2plus.pth", "RealESRGAN_x4plus_anime_6B.pth", "NMKD_Siax.pth",
            "4x_AnimeSharp.pth"} <= names
    assert all(task.sha256 for task in tasks)
    ready = PostProcessSetup({name: tmp_path / "x" for name in HORDE_POSTPROCESSORS if "GFPGAN" not in name})
    assert not ready.complete  # face fixers missing: the horde must not be told "post-processing: yes"
    assert ready.refusal(["RealESRGAN_x4plus", "GFPGAN"]) == "post-processors not available on this worker: GFPGAN"
    assert ready.refusal(["RealESRGAN_x4plus"]) is None


def test_runner_post_processes_after_generation(tiny_checkpoint, upscalers, tmp_path):
    from horde_worker.inference.runner import ModelRunner

    runner = ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path)))
    request = GenerateRequest(job_id="j", model_name="tiny", model_path=str(tiny_checkpoint),
                              baseline="stable_diffusion_1", prompt="a cat", negative_prompt="", width=64, height=64,
                              steps=2, cfg_scale=7.0, sampler_name="k_euler", karras=False, seeds=[1, 2],
                              post_processing=[("RealESRGAN_x4plus", upscalers["x4"])])
    result = runner.generate(request, send=lambda message: None)
    assert [img.shape for img in result.images] == [(256, 256, 3), (256, 256, 3)]
