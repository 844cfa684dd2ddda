"""Checkpoints load straight into the run's precision: the same weights, bit for bit, as building in float32
and converting, without the float32 copy."""

from __future__ import annotations

import pytest
import torch

from horde_worker.inference import checkpoint
from horde_worker.inference.pipelines import load_pipeline


@pytest.mark.parametrize("baseline", ["stable_diffusion_1", "stable_diffusion_xl"])
def test_half_precision_loads_are_the_converted_float32_weights_bit_for_bit(tmp_path, baseline):
    from horde_worker.inference.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "m.safetensors", baseline)
    loaded = load_pipeline(path, torch.device("cpu"), torch.float16).pipeline
    state_dict = checkpoint.load_state_dict(path)
    info = checkpoint.inspect_checkpoint(state_dict)
    reference = {"unet": checkpoint.build_unet(state_dict, info).half(),
                 "vae": checkpoint.build_vae(state_dict, info).half()}
    for name, module in reference.items():
        ours = getattr(loaded, name).state_dict()
        theirs = module.state_dict()
        assert ours.keys() == theirs.keys()
        for key, tensor in theirs.items():
            assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), (name, key)
    for component in loaded.components.values():
        if isinstance(component, torch.nn.Module):
            assert all(p.dtype == torch.float16 for p in component.parameters())
