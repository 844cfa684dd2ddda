"""The VAE runs in its own precision (bf16 on Ampere+ GPUs, as the reference runs it) whatever the pipeline
hands it: on the CPU, a bf16 VAE beside a float32 UNet serves txt2img, img2img and inpainting (plain and
inpainting models) and gives the float32 VAE's images to within bf16's rounding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from horde_worker.inference.generate import generate_images
from horde_worker.inference.pipelines import load_pipeline, run_vae_in, vae_dtype
from horde_worker.inference.tiny import write_tiny_checkpoint
from tests.conftest import job_request

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


def png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).resize((128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


JOBS = {
    "txt2img": {},
    "img2img": {"source_image": "test_inpaint_original.png", "denoising_strength": 0.6},
    "inpainting": {"source_image": "test_inpaint_original.png", "source_mask": "test_inpaint_mask.png",
                   "source_processing": "inpainting"},
}


@pytest.mark.parametrize("inpainting", [False, True])
@pytest.mark.parametrize("baseline", ["stable_diffusion_1", "stable_diffusion_xl"])
def test_a_bf16_vae_beside_a_float32_pipeline_serves_every_job(tmp_path, baseline, inpainting):
    if inpainting and baseline != "stable_diffusion_1":
        pytest.skip("the tiny inpainting model is SD1")
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", baseline, inpainting=inpainting)
    wide = load_pipeline(path, torch.device("cpu"), torch.float32, name="wide")
    narrow = load_pipeline(path, torch.device("cpu"), torch.float32, name="narrow")
    run_vae_in(narrow.pipeline.vae, torch.bfloat16)
    assert narrow.pipeline.vae.dtype == torch.bfloat16 and narrow.pipeline.unet.dtype == torch.float32
    for name, fields in JOBS.items():
        fields = {k: png(IMAGES / v) if k.startswith("source_") and k != "source_processing" else v
                  for k, v in fields.items()}
        request = job_request(baseline=baseline, width=128, height=128, steps=3, seeds=[3], **fields)
        expected = generate_images(wide, request)[0].astype(int)
        got = generate_images(narrow, request)[0].astype(int)
        assert got.shape == expected.shape == (128, 128, 3), name
        difference = np.abs(got - expected)
        assert difference.mean() < 3 and difference.max() < 40, (name, difference.mean(), difference.max())
        # The job's own pipelines left the shared modules as they were.
        assert narrow.pipeline.vae.dtype == torch.bfloat16 and narrow.pipeline.unet.dtype == torch.float32


def test_the_vae_precision_follows_the_device():
    assert vae_dtype(torch.device("cpu"), torch.float32) == torch.float32
