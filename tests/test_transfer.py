"""A model's weights laid out once for one-copy moves between RAM and a GPU: the same weights bit for bit, the
same outputs, tensors added later (a LoRA's, say) still moved, and the host copy freed on request."""

from __future__ import annotations

import torch

from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import write_tiny_checkpoint
from horde_worker.inference.transfer import PackedWeights, _tensors
from horde_worker.inference.vram import modules_of


def _state(modules):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _pointers_inside(modules, storages) -> bool:
    ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in storages]
    return all(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for *_, t in _tensors(modules) if t.numel())


def _same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The weights are equal bit for bit; the CPU kernels' sums may differ in the last bits with the weights'
    # memory alignment (the loaded tensors sit at unaligned offsets of the file's buffer).
    return torch.allclose(a, b, rtol=0, atol=1e-5)


def _unet_output(pipe) -> torch.Tensor:
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=hidden).sample


def test_the_layout_holds_the_same_weights_and_survives_moves(tmp_path, monkeypatch):
    from horde_worker.inference import transfer

    monkeypatch.setattr(transfer, "CHUNK", 2**20)  # several chunks even for a tiny model
    model = load_pipeline(write_tiny_checkpoint(tmp_path / "m.safetensors", "stable_diffusion_1"),
                          torch.device("cpu"), torch.float32)
    modules = modules_of(model)
    before, output = _state(modules), _unet_output(model.pipeline)
    packed = PackedWeights(modules, pin=False)
    assert len(packed.chunks) > 1
    assert _pointers_inside(modules, packed.chunks)
    assert all(torch.equal(before[k], v) for k, v in _state(modules).items())

    # "device" = a second buffer (on a GPU, the device's memory): every weight points into it while there.
    packed.to_device(torch.device("cpu"))
    assert _pointers_inside(modules, [packed.device_buffer])
    assert not _pointers_inside(modules, packed.chunks)
    assert _same_output(_unet_output(model.pipeline), output)

    # A tensor added while on the device (a LoRA layer's, a resized embedding) is moved on its own.
    extra = torch.nn.Parameter(torch.full((3,), 7.0))
    model.pipeline.unet.register_parameter("added_later", extra)
    packed.to_host()
    assert packed.device_buffer is None
    assert torch.equal(model.pipeline.unet.added_later, torch.full((3,), 7.0))
    del model.pipeline.unet.added_later
    assert _pointers_inside(modules, packed.chunks)
    assert all(torch.equal(before[k], v) for k, v in _state(modules).items())
    assert _same_output(_unet_output(model.pipeline), output)


def test_the_host_copy_can_be_given_up_while_on_the_device(tmp_path):
    model = load_pipeline(write_tiny_checkpoint(tmp_path / "m.safetensors", "stable_diffusion_1"),
                          torch.device("cpu"), torch.float32)
    packed = PackedWeights(modules_of(model), pin=False)
    assert packed.release_host_copy() == 0  # on the host it is the only copy: kept
    packed.to_device(torch.device("cpu"))
    size = packed.nbytes
    assert packed.release_host_copy() == size > 0
    assert not packed.has_host_copy and packed.nbytes == 0


def test_a_tensor_shared_by_two_modules_stays_shared():
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    second.weight = first.weight  # tied, as some text encoders tie their embeddings
    packed = PackedWeights([first, second], pin=False)
    assert len(packed.slots) == 3  # one weight, two biases
    for move in (lambda: packed.to_device(torch.device("cpu")), packed.to_host):
        move()
        assert first.weight.data_ptr() == second.weight.data_ptr()
        with torch.no_grad():
            first.weight.add_(1)
        assert torch.equal(first.weight, second.weight)


def test_a_model_moves_as_one_layout_per_component_leaving_visiting_encoders_in_ram(tmp_path):
    import numpy as np

    from horde_worker.inference import fit
    from horde_worker.inference.generate import generate_images
    from horde_worker.inference.residency import move
    from tests.conftest import job_request

    path = write_tiny_checkpoint(tmp_path / "m.safetensors", "stable_diffusion_xl")
    model = load_pipeline(path, torch.device("cpu"), torch.float32)
    request = job_request(baseline="stable_diffusion_xl", width=64, height=64, steps=3)
    expected = generate_images(model, request)[0].astype(int)
    model.fit.apply(model, fit.FitPlan(encoders_visit=True), torch.device("cpu"))
    move(model, "cpu", pack=True)  # as to a GPU: the layouts' device buffers are this CPU's memory here
    assert set(model.weights) == {"unet", "vae"}  # the text encoders visit on their own
    for name, packed in model.weights.items():
        assert _pointers_inside([getattr(model.pipeline, name)], [packed.device_buffer])
    got = generate_images(model, request)[0].astype(int)
    assert np.abs(got - expected).max() <= 1
    move(model, "cpu")  # back: nothing copied, every weight points at its host chunks again
    for name, packed in model.weights.items():
        assert packed.device_buffer is None
        assert _pointers_inside([getattr(model.pipeline, name)], packed.chunks)
    # With the host copy given up, the next move out is module by module and the layout is gone.
    move(model, "cpu", pack=True)
    for packed in model.weights.values():
        packed.release_host_copy()
    move(model, "cpu")
    assert model.weights == {}
    assert np.abs(generate_images(model, request)[0].astype(int) - expected).max() <= 1
