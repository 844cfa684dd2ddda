"""ControlNet: the horde's file layouts (diff and full), every annotator from local weights, control maps
returned on request, and the guided images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import ldm_export
from horde_worker.inference.control import ControlUnavailable, control_map, load_controlnet
from horde_worker.inference.generate import run_job
from horde_worker.inference.messages import AdapterFile, GenerateRequest
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import tiny_sd2_components, tiny_sd15_components
from horde_worker.inference.tiny_adapters import write_tiny_lora
from horde_worker.inference.tiny_control import write_tiny_annotators, write_tiny_controlnets
from horde_worker.models.controlnets import CONTROL_TYPES, ControlSetup, plan_control, ready_setup
from tests.conftest import SHARED_DATA

SOURCE = SHARED_DATA / "images" / "test_inpaint_original.png"
POSE = SHARED_DATA / "images" / "test_openpose_control_map.png"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


@pytest.fixture(scope="module")
def control_home(tmp_path_factory, model):
    home = tmp_path_factory.mktemp("cache")
    write_tiny_controlnets(home / "controlnet", model.pipeline.unet)
    write_tiny_annotators(home / "controlnet" / "annotators")
    setup, missing = plan_control(home, {"stable_diffusion_1"})
    return home, ready_setup(setup), missing


def png(path: Path, size=(128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


def request(setup: ControlSetup, control_type: str = "canny", **overrides) -> GenerateRequest:
    fields = dict(job_id="j", model_name="tiny", model_path="", baseline="stable_diffusion_1", prompt="a house",
                  negative_prompt="", width=128, height=128, steps=3, cfg_scale=7.0, sampler_name="k_euler",
                  karras=False, seeds=[7], source_image=png(SOURCE), control_type=control_type,
                  control_model_path=str(setup.files.get((control_type, "stable_diffusion_1"), "")) or None,
                  extra={"annotator_dir": str(setup.annotator_dir)})
    fields.update(overrides)
    return GenerateRequest(**fields)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_every_sd15_control_type_has_its_file_and_only_openpose_lacks_local_annotators(control_home):
    _home, setup, missing = control_home
    assert {t for t, _ in setup.files} == set(CONTROL_TYPES)
    assert {Path(task.dest).name for task in missing} == {"body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"}
    assert setup.refusal("openpose", "stable_diffusion_1", image_is_control=False) == \
        "the openpose annotator's weights are missing"
    assert setup.refusal("openpose", "stable_diffusion_1", image_is_control=True) is None
    assert "no canny ControlNet for stable_diffusion_xl" in setup.refusal("canny", "stable_diffusion_xl", False)


def test_diff_and_full_files_rebuild_the_same_controlnet(tmp_path, model):
    from diffusers import ControlNetModel

    torch.manual_seed(11)
    original = ControlNetModel.from_unet(model.pipeline.unet)
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    full = ldm_export.save_tensors(tmp_path / "full.safetensors", ldm_export.controlnet_to_ldm(original))
    difference = ldm_export.save_tensors(tmp_path / "diff.safetensors",
                                         ldm_export.controlnet_to_ldm(original, model.pipeline.unet))
    expected = original.state_dict()
    for path in (full, difference):
        loaded = load_controlnet(model, str(path)).state_dict()
        assert max((loaded[k] - expected[k]).abs().max().item() for k in expected) < 1e-6


def test_controlnet_of_another_architecture_is_refused(tmp_path, model):
    from diffusers import ControlNetModel

    other = ControlNetModel.from_unet(tiny_sd2_components()[0])
    path = ldm_export.save_tensors(tmp_path / "sd2.safetensors", ldm_export.controlnet_to_ldm(other))
    with pytest.raises(ControlUnavailable, match="does not fit"):
        load_controlnet(model, str(path))


def test_canny_map_is_returned_on_request_and_image_is_control_skips_the_annotator(model, control_home):
    _home, setup, _ = control_home
    out = run_job(model, request(setup, return_control_map=True, seeds=[1, 2]))
    edge_map = out.images[0]
    assert len(out.images) == 2 and edge_map.shape == (128, 128, 3)
    assert set(np.unique(edge_map)) <= {0, 255} and 0.01 < (edge_map > 0).mean() < 0.6
    source = np.asarray(Image.open(io.BytesIO(png(SOURCE))).convert("RGB"))
    as_is = run_job(model, request(setup, return_control_map=True, image_is_control=True)).images[0]
    assert np.array_equal(as_is, source)


def test_control_guides_the_image(model, control_home):
    _home, setup, _ = control_home
    plain = run_job(model, request(setup, control_type=None, control_model_path=None, source_image=None)).images[0]
    guided = run_job(model, request(setup)).images[0]
    assert diff(plain, guided) > 2
    assert np.array_equal(run_job(model, request(setup)).images[0], guided)  # the seed reproduces it
    other_map = run_job(model, request(setup, source_image=png(POSE), image_is_control=True)).images[0]
    assert diff(other_map, guided) > 0.5  # the map itself steers (an unchanged map changes nothing)


@pytest.mark.parametrize("control_type", ["scribble", "hed", "fakescribbles", "hough", "depth", "normal", "seg"])
def test_annotators_run_from_local_weights(control_home, control_type):
    _home, setup, _ = control_home
    image = Image.open(SOURCE).convert("RGB").resize((160, 96))
    result = control_map(control_type, image, setup.annotator_dir, torch.device("cpu"))
    assert result.size == (160, 96) and result.mode == "RGB"
    pixels = np.asarray(result)
    if control_type == "scribble":  # dark strokes of the drawing become white lines
        dark = np.asarray(image).min(axis=2) < 127
        assert dark.any() and (pixels[dark] == 255).mean() > 0.9
    if control_type == "normal":  # flat far background points straight at the viewer
        assert pixels[..., 2].mean() > 200


def test_missing_annotator_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ControlUnavailable, match="hed annotator's weights are not in"):
        control_map("hed", Image.new("RGB", (64, 64)), tmp_path, torch.device("cpu"))


def test_lora_and_controlnet_together(model, control_home, tmp_path):
    _home, setup, _ = control_home
    unet, _vae, text_encoder = tiny_sd15_components()
    lora_path = write_tiny_lora(tmp_path / "lora.safetensors", unet, [text_encoder], seed=1)
    guided = run_job(model, request(setup)).images[0]
    with_lora = run_job(model, request(setup, loras=[AdapterFile("1", str(lora_path))]))
    assert with_lora.notes == [] and diff(with_lora.images[0], guided) > 2
    assert np.array_equal(run_job(model, request(setup)).images[0], guided)
