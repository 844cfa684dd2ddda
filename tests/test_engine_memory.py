"""Running out of device memory (an injected allocation failure): jobs that ran out together step on their own,
a job that ran out beside others starts again alone, one that runs out alone is faulted with the reason, and
the engine goes on with the next job."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from horde_worker.inference.cancellation import Cancellations
from horde_worker.inference.engine import Engine
from horde_worker.inference.messages import GenerateFailed, GenerateResult, SlotSpec
from horde_worker.inference.runner import ModelRunner
from tests.conftest import job_request


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=tempfile.mkdtemp()))


def request(tiny_checkpoint, job_id: str, **fields):
    return job_request(**{"job_id": job_id, "model_name": "tiny", "model_path": str(tiny_checkpoint), "width": 64,
                          "height": 64, "steps": 3, **fields})


class Card:
    """A UNet pre-hook that fails an allocation when asked to."""

    def __init__(self, runner, tiny_checkpoint, fails) -> None:
        with runner.residency.using("tiny", str(tiny_checkpoint)) as (model, _source, _seconds):
            self.unet = model.pipeline.unet
        self.fails = fails
        self.calls: list[tuple[int, ...]] = []
        self.handle = self.unet.register_forward_pre_hook(self._check)

    def _check(self, _module, args):
        shape = tuple(args[0].shape)
        self.calls.append(shape)
        if self.fails(shape, self.calls):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def close(self) -> None:
        self.handle.remove()


def run(runner, requests) -> dict[str, object]:
    sent: list[object] = []
    cancels = Cancellations()
    engine = Engine(runner, sent.append, cancels.reason, cancels.forget, max_jobs=4)
    for message in requests:
        cancels.admit(message.job_id)
        engine.submit(message)
    engine.iterate()
    for _ in range(300):
        if not engine.jobs:
            break
        engine.iterate()
    return {m.job_id: m for m in sent if isinstance(m, GenerateResult | GenerateFailed)}


def alone(runner, message):
    return runner.generate(message, lambda _m: None).images


def close(a, b) -> bool:
    return all(int(np.abs(x.astype(int) - y.astype(int)).max()) <= 1 for x, y in zip(a, b, strict=True))


def test_jobs_that_run_out_of_memory_together_step_on_their_own(runner, tiny_checkpoint):
    jobs = [request(tiny_checkpoint, "a", seeds=[1], prompt="a cat"),
            request(tiny_checkpoint, "b", seeds=[2], prompt="a dog", sampler_name="k_euler_a")]
    card = Card(runner, tiny_checkpoint, lambda shape, calls: shape[0] > 2)  # room for one job's guidance pair
    try:
        answers = run(runner, jobs)
    finally:
        card.close()
    assert {type(a) for a in answers.values()} == {GenerateResult}, answers
    assert all(shape[0] <= 2 for shape in card.calls[1:])  # after the first failure, one job per forward
    for message in jobs:
        assert close(answers[message.job_id].images, alone(runner, message))


def test_a_job_that_runs_out_beside_others_starts_again_alone(runner, tiny_checkpoint):
    tall = request(tiny_checkpoint, "tall", seeds=[3], height=96, source_image=None)
    small = request(tiny_checkpoint, "small", seeds=[4], steps=6)
    card = Card(runner, tiny_checkpoint, lambda shape, calls: shape[-2] == 12 and len(calls) < 4)
    try:
        answers = run(runner, [small, tall])
    finally:
        card.close()
    assert isinstance(answers["tall"], GenerateResult) and isinstance(answers["small"], GenerateResult), answers
    assert close(answers["tall"].images, alone(runner, tall))
    assert close(answers["small"].images, alone(runner, small))


def test_a_job_that_runs_out_alone_is_faulted_and_the_next_one_runs(runner, tiny_checkpoint):
    huge = request(tiny_checkpoint, "huge", seeds=[5], height=128)
    card = Card(runner, tiny_checkpoint, lambda shape, calls: shape[-2] == 16)
    try:
        answers = run(runner, [huge])
        after = run(runner, [request(tiny_checkpoint, "after", seeds=[6])])
    finally:
        card.close()
    failed = answers["huge"]
    assert isinstance(failed, GenerateFailed)
    assert "out of device memory for 64x128 with 1 image(s)" in failed.reason and "even alone" in failed.reason
    assert isinstance(after["after"], GenerateResult)
