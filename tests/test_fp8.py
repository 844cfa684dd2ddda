"""fp8 matrix multiplies for Flux's fp8-stored transformer: the layers swapped, the output close to the
widened layers' on the same weights, and only where the device has fp8 arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch

from horde_worker.inference import fp8
from horde_worker.inference.pipelines import load_pipeline


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    from horde_worker.inference.tiny import write_tiny_flux_checkpoint

    path = write_tiny_flux_checkpoint(tmp_path_factory.mktemp("fp8") / "schnell.safetensors", fp8=True)
    return load_pipeline(path, torch.device("cpu"), torch.float32).pipeline.transformer


def forward(model, dtype: torch.dtype) -> torch.Tensor:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, config.in_channels, generator=generator)
    text = torch.randn(2, 8, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return model(hidden_states=x.to(dtype), timestep=torch.tensor([0.5, 0.8]).to(dtype),
                     pooled_projections=pooled.to(dtype), encoder_hidden_states=text.to(dtype),
                     txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)[0].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmuls_stay_close_to_the_widened_layers(transformer, dtype):
    widened = forward(transformer, torch.float32)
    narrow = copy.deepcopy(transformer).to(dtype)
    replaced = fp8.use_fp8_matmuls(narrow, dtype)
    blocks = sum(1 for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                 and name.startswith(("transformer_blocks", "single_transformer_blocks")))
    assert replaced == blocks > 0
    assert isinstance(narrow.transformer_blocks[0].attn.to_q, fp8.Fp8Linear)
    assert narrow.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert isinstance(narrow.proj_out, torch.nn.Linear) and not isinstance(narrow.proj_out, fp8.Fp8Linear)
    error = fp8.output_error(widened, forward(narrow, dtype))
    # Activations lose bits to e4m3; the weights were fp8 in the file already.
    assert 0 < error < (0.01 if dtype == torch.float32 else 0.02), error


def test_fp8_matmuls_only_on_devices_with_fp8_arithmetic():
    assert not fp8.supported(torch.device("cpu"))
