"""Generation features of a horde job on tiny real-architecture models: prompt weights and long
prompts, clip_skip, img2img, inpainting and outpainting, hires fix, tiling."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference import hires
from horde_worker.inference.conditioning import encode_prompts, parse_weighted, plain_text
from horde_worker.inference.generate import generate_images, img2img_steps, run_job
from horde_worker.inference.messages import GenerateRequest
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import write_tiny_checkpoint
from tests.conftest import job_request

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("inpaint") / "inpaint.safetensors", "stable_diffusion_1",
                                 inpainting=True)
    return load_pipeline(path, torch.device("cpu"), torch.float32, name="tiny-inpainting")


def request(**overrides) -> GenerateRequest:
    return job_request(**overrides)


def png(path: Path, size: tuple[int, int] | None = None) -> bytes:
    image = Image.open(path)
    if size:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# --- prompts -------------------------------------------------------------------------------------


def test_weight_syntax_is_parsed():
    assert parse_weighted("a (red:1.5) cat") == [("a ", 1.0), ("red", 1.5), (" cat", 1.0)]
    assert parse_weighted("((big)) [small]") == [("big", pytest.approx(1.21)), (" ", 1.0),
                                                  ("small", pytest.approx(1 / 1.1))]
    assert parse_weighted(r"a \(literal\) b") == [("a (literal) b", 1.0)]
    assert parse_weighted("time: 12:30 (x:0.5)") == [("time: 12:30 ", 1.0), ("x", 0.5)]
    assert plain_text("a (red:1.5) [cat]") == "a red cat"


def test_unweighted_short_prompt_encodes_as_diffusers_does(model):
    ours = encode_prompts(model.pipeline, "stable_diffusion_1", ["a red cat"], ["blurry"], clip_skip=1)
    theirs, negative = model.pipeline.encode_prompt("a red cat", torch.device("cpu"), 1, True, "blurry")
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-5)
    assert torch.allclose(ours["negative_prompt_embeds"], negative, atol=1e-5)


def test_weights_change_the_image_and_weight_one_does_not(model):
    plain = generate_images(model, request(prompt="a red cat"))[0]
    assert np.array_equal(generate_images(model, request(prompt="a (red:1.0) cat"))[0], plain)
    stronger = diff(generate_images(model, request(prompt="a (red:1.6) cat"))[0], plain)
    weaker = diff(generate_images(model, request(prompt="a [red] cat"))[0], plain)  # 1/1.1
    assert stronger > 0.1 and weaker > 0.01
    assert stronger > weaker  # a weight further from 1 moves the image further


def test_prompt_longer_than_77_tokens_uses_its_tail(model):
    head = ", ".join(["a small wooden house"] * 20)  # about 100 tokens
    conditioning = encode_prompts(model.pipeline, "stable_diffusion_1", [head], [""], clip_skip=1)
    assert conditioning["prompt_embeds"].shape[1] == 154  # two chunks of 77
    assert conditioning["negative_prompt_embeds"].shape == conditioning["prompt_embeds"].shape
    a = generate_images(model, request(prompt=head + ", red sky"))[0]
    b = generate_images(model, request(prompt=head + ", green sea"))[0]
    assert diff(a, b) > 0.1  # words past the 77th token still matter


def test_clip_skip_changes_the_conditioning(model):
    one = generate_images(model, request(clip_skip=1))[0]
    two = generate_images(model, request(clip_skip=2))[0]
    assert diff(one, two) > 0.5


# --- img2img and painting ------------------------------------------------------------------------


def test_img2img_runs_the_requested_steps_and_depends_on_source_and_strength(model):
    source = png(IMAGES / "test_inpaint_original.png", (128, 128))
    other = png(IMAGES / "test_facefix.png", (128, 128))
    steps_seen: list[int] = []
    job = request(steps=5, source_image=source, denoising_strength=0.4)
    first = run_job(model, job, on_step=lambda s, t: steps_seen.append(s)).images[0]
    assert steps_seen == [1, 2, 3, 4, 5]
    assert np.array_equal(generate_images(model, job)[0], first)  # the seed reproduces it
    assert diff(generate_images(model, request(steps=5, source_image=other, denoising_strength=0.4))[0], first) > 1
    assert diff(generate_images(model, request(steps=5, source_image=source, denoising_strength=0.9))[0], first) > 1
    assert diff(generate_images(model, request(steps=5))[0], first) > 1  # not txt2img
    for steps, strength in ((25, 0.6), (3, 0.1), (30, 0.33), (7, 1.0)):
        assert int(img2img_steps(steps, strength) * strength) == steps


def test_inpainting_keeps_unmasked_pixels_and_changes_masked_ones(model, inpainting_model):
    source = png(IMAGES / "test_inpaint_original.png", (128, 128))
    mask = png(IMAGES / "test_inpaint_mask.png", (128, 128))
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=int)
    repaint = np.asarray(Image.open(io.BytesIO(mask)).convert("L").resize((128, 128))) > 127
    assert 0.05 < repaint.mean() < 0.95
    keep = ~_grow(repaint, 4)
    for loaded in (model, inpainting_model):
        image = generate_images(loaded, request(source_image=source, source_mask=mask,
                                                source_processing="inpainting"))[0].astype(int)
        assert np.abs(image - original)[keep].max() <= 1
        assert np.abs(image - original)[repaint].mean() > 10


def test_outpainting_mask_comes_from_the_alpha_channel(model):
    raw = Image.open(IMAGES / "test_outpaint.png").convert("RGBA").resize((128, 128))
    buffer = io.BytesIO()
    raw.save(buffer, format="PNG")
    alpha = np.asarray(raw.getchannel("A"))
    assert (alpha < 128).any() and (alpha >= 128).any()
    image = generate_images(model, request(source_image=buffer.getvalue(), source_processing="outpainting"))[0]
    opaque = ~_grow(alpha < 128, 4)
    rgb = np.asarray(raw.convert("RGB"), dtype=int)
    assert np.abs(image.astype(int) - rgb)[opaque].max() <= 1
    assert np.abs(image.astype(int) - 127)[alpha < 128].mean() > 5  # the transparent part was painted


def test_inpainting_model_also_does_txt2img(inpainting_model):
    a, b = generate_images(inpainting_model, request(seeds=[1, 2]))
    assert a.shape == (128, 128, 3) and diff(a, b) > 1
    assert diff(generate_images(inpainting_model, request(seeds=[2]))[0], b) < 1  # batch numerics aside


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    from PIL import ImageFilter

    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(image) > 0


# --- sizes and passes ----------------------------------------------------------------------------


def test_hires_fix_sizes_and_steps_are_the_references():
    assert hires.first_pass_size("stable_diffusion_1", 1024, 768) == (640, 512)
    assert hires.first_pass_size("stable_diffusion_1", 768, 1536) == (512, 1024)
    assert hires.first_pass_size("stable_diffusion_xl", 2048, 1536) == (1152, 896)
    assert hires.first_pass_size("stable_diffusion_xl", 1024, 2048) == (768, 1344)
    # Small jobs and Flux jobs are made in one pass.
    assert not hires.applies("stable_diffusion_1", 512, 1024) and hires.applies("stable_diffusion_1", 576, 640)
    assert not hires.applies("stable_diffusion_xl", 1024, 2048) and not hires.applies("flux_1", 2048, 2048)
    # 30 steps at 0.65 for 1024x1024 SD: round(3 + 27 * 0.65^2) = 14, times 2^(4/3) / 2.25 -> 16.
    assert hires.second_pass_steps("stable_diffusion_1", 1024, 1024, 0.65, 30) == 16
    # 10 steps at 0.5 for 768x768: 5, times 2^0.75 / 2.25 -> 4, plus 3 for a short job -> 7.
    assert hires.second_pass_steps("stable_diffusion_1", 768, 768, 0.5, 10) == 7
    assert hires.second_pass_steps("stable_diffusion_1", 640, 576, 0.5, 2) == 2  # never more than asked
    assert hires.second_pass_steps("stable_diffusion_xl", 1536, 1536, 0.1, 40) == 6  # never under 6


def test_hires_fix_makes_the_requested_size_in_two_passes(model):
    steps: list[tuple[int, int]] = []
    job = request(width=640, height=576, steps=2, hires_fix=True, hires_fix_denoising_strength=0.5)
    image = run_job(model, job, on_step=lambda s, t: steps.append((s, t))).images[0]
    assert image.shape == (576, 640, 3)
    assert steps == [(1, 2), (2, 2), (1, 2), (2, 2)]  # 2 steps at 512x512, then 2 at full size
    plain = generate_images(model, request(width=640, height=576, steps=2))[0]
    assert diff(image, plain) > 1
    assert np.array_equal(generate_images(model, job)[0], image)


def test_hires_fix_upscales_the_first_pass_latents_nearest_exact():
    latents = torch.arange(4, dtype=torch.float32).reshape(1, 1, 2, 2)
    upscaled = hires.upscale_latents(latents, 32, 24)
    assert upscaled.shape == (1, 1, 3, 4)
    assert upscaled[0, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def seam_ratio(image: np.ndarray) -> float:
    """How much the wrap-around seams jump compared with neighbouring columns and rows inside."""
    img = image.astype(float)
    seam = np.abs(img[:, 0] - img[:, -1]).mean() + np.abs(img[0] - img[-1]).mean()
    inside = np.abs(img[:, 1:] - img[:, :-1]).mean() + np.abs(img[1:] - img[:-1]).mean()
    return seam / inside


def test_tiling_makes_edges_continue_each_other(model):
    plain = generate_images(model, request(width=128, height=128, steps=3))[0]
    tiled = generate_images(model, request(width=128, height=128, steps=3, tiling=True))[0]
    assert seam_ratio(tiled) < 1.5
    assert diff(plain, tiled) > 1
    after = generate_images(model, request(width=128, height=128, steps=3))[0]
    assert np.array_equal(after, plain)  # tiling is undone after the job


def test_tiled_network_is_shift_equivariant_on_the_torus(model):
    """With every convolution wrapping, rolling the starting noise rolls the picture: proof that
    nothing in the image knows where its edges are."""
    from horde_worker.inference.generate import tiled

    pipe = model.pipeline
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    rolled = torch.roll(latents, shifts=(4, 4), dims=(2, 3))

    def run(start: torch.Tensor) -> np.ndarray:
        return pipe(prompt="a cat", latents=start.clone(), num_inference_steps=2, output_type="np").images[0]

    with tiled(pipe, True):
        a, b = run(latents), run(rolled)
    assert np.abs(np.roll(a, (32, 32), axis=(0, 1)) - b).max() < 2 / 255
    c, d = run(latents), run(rolled)
    assert np.abs(np.roll(c, (32, 32), axis=(0, 1)) - d).max() > 0.05


def test_feature_benchmark_runs_on_cpu(tmp_path, capsys):
    """The GPU benchmark of hires fix, LoRA and ControlNet also runs (slowly, tiny models) here."""
    import json

    from horde_worker.bench.features import JOBS, main

    assert main(["--device", "cpu", "--steps", "2", "--repeats", "1", "--work-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    figures = report["results"]["stable_diffusion_1"]
    for job in JOBS:
        assert figures[job]["worker_s_per_image"] > 0 and figures[job]["diffusers_s_per_image"] > 0


@pytest.mark.parametrize("baseline", ["stable_diffusion_2", "stable_diffusion_xl", "flux_1"])
def test_img2img_and_inpainting_on_every_baseline(tmp_path, baseline):
    from horde_worker.inference.tiny import write_tiny_flux_checkpoint

    path = tmp_path / f"{baseline}.safetensors"
    if baseline == "flux_1":
        write_tiny_flux_checkpoint(path, fp8=False)
    else:
        write_tiny_checkpoint(path, baseline)
    loaded = load_pipeline(path, torch.device("cpu"), torch.float32, name=baseline)
    job = dict(baseline=baseline, steps=2, cfg_scale=2.0, prompt="a (red:1.3) cat", negative_prompt="ugly")
    source = png(IMAGES / "test_inpaint_original.png", (128, 128))
    mask = png(IMAGES / "test_inpaint_mask.png", (128, 128))
    plain = generate_images(loaded, request(**job))[0]
    from_image = generate_images(loaded, request(source_image=source, denoising_strength=0.5, **job))[0]
    assert diff(plain, from_image) > 1
    painted = generate_images(loaded, request(source_image=source, source_mask=mask, source_processing="inpainting",
                                              **job))[0].astype(int)
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=int)
    repaint = np.asarray(Image.open(io.BytesIO(mask)).convert("L")) > 127
    assert np.abs(painted - original)[~_grow(repaint, 4)].max() <= 1
    assert np.abs(painted - original)[repaint].mean() > 5
