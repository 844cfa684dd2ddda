"""Residency under concurrency: the preload thread and the sampling thread on the same tables.

Disk reads are replaced by a fake whose reads can be held open, and the residency's lock by one that
can stop a thread just before it takes the lock for the n-th time: each interleaving below is forced,
not hoped for.
"""

from __future__ import annotations

import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from horde_worker.inference.residency import Residency, pipeline_bytes

TIMEOUT = 30.0  # for what must happen (only a failing test waits this long)
SETTLE = 1.0  # for what may not happen at all in a given interleaving


def fake_model(name: str):
    """What Residency needs of a LoadedModel: torch modules in `pipeline.components` (10x10 Linear: 440 bytes)."""
    from horde_worker.inference.fit import FittedModel

    return SimpleNamespace(name=name, pipeline=SimpleNamespace(components={"unet": torch.nn.Linear(10, 10)}),
                           controlnets={}, weights={}, fit=FittedModel())


MODEL_BYTES = pipeline_bytes(fake_model("probe"))


class FakeDisk:
    """Stands in for Residency._read: counts reads per model; `hold(name)` keeps the next reads of it open."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()
        self.models: dict[str, list] = {}
        self.gates: dict[str, threading.Event] = {}
        self.reading: dict[str, threading.Event] = {}
        self.fail: set[str] = set()

    def hold(self, name: str) -> threading.Event:
        self.gates[name] = threading.Event()
        self.reading[name] = threading.Event()
        return self.gates[name]

    def read(self, name: str, path: str, v_prediction: bool):
        self.reads[name] += 1
        if name in self.gates:
            self.reading[name].set()
            assert self.gates[name].wait(TIMEOUT), "read never released"
        if name in self.fail:
            raise OSError(f"{name}: unreadable")
        model = fake_model(name)
        self.models.setdefault(name, []).append(model)
        return model


class PausingLock:
    """An RLock that can hold one thread just before its n-th outermost `with` (never while holding the lock)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = threading.local()
        self._entries: Counter = Counter()
        self._hold: tuple[threading.Thread, int] | None = None
        self.reached = threading.Event()
        self.release = threading.Event()

    def hold(self, thread: threading.Thread, entry: int) -> None:
        self._hold = (thread, entry)

    def __enter__(self):
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            me = threading.current_thread()
            self._entries[me] += 1
            if self._hold == (me, self._entries[me]):
                self.reached.set()
                self.release.wait(TIMEOUT)
        self._lock.acquire()
        self._depth.n = depth + 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth.n -= 1
        self._lock.release()


class Call(threading.Thread):
    """Runs fn in a thread and keeps its result or exception."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result, self.error = None, None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def outcome(self):
        self.join(TIMEOUT)
        assert not self.is_alive(), "call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def residency(ram_models: float | None = None, pausing: bool = False) -> tuple[Residency, FakeDisk]:
    budget = None if ram_models is None else int(MODEL_BYTES * ram_models)
    res = Residency(torch.device("cpu"), torch.float32, ram_budget=budget, device_budget=None)
    disk = FakeDisk()
    res._read = disk.read
    if pausing:
        res._lock = PausingLock()
    return res, disk


@pytest.mark.parametrize("entry", [1, 2, 3, 4, 5])
def test_acquire_and_a_preload_of_the_same_model_read_it_once(entry):
    """A preload of the model starts while acquire is at each of its lock boundaries in turn (before the
    fix: at the third, acquire found a load registered after its own check and popped a missing key)."""
    res, disk = residency(pausing=True)
    gate = disk.hold("x")
    acquire = Call(res.acquire, "x", "x.safetensors")
    res._lock.hold(acquire, entry)
    acquire.start()
    res._lock.reached.wait(SETTLE)  # acquire may finish its work before reaching this entry
    preload = Call(res.preload, "x", "x.safetensors")
    preload.start()
    disk.reading["x"].wait(SETTLE)  # whichever thread reads, it is now inside the read (or waiting)
    res._lock.release.set()
    gate.set()
    model, _source, _seconds = acquire.outcome()
    preload.outcome()
    assert disk.reads["x"] == 1
    assert model is disk.models["x"][0]
    assert res.names() == ["x"]


@pytest.mark.parametrize("entry", [2, 3, 4])
def test_a_preload_never_evicts_the_model_being_acquired(entry):
    """RAM for one model; y is preloaded while acquire of x (already in RAM) is at each lock boundary
    (before the fix: y's room-making dropped x between acquire's check and its pop)."""
    res, disk = residency(ram_models=1.5, pausing=True)
    res.preload("x", "x.safetensors")
    acquire = Call(res.acquire, "x", "x.safetensors")
    res._lock.hold(acquire, entry)
    acquire.start()
    reached = res._lock.reached.wait(SETTLE)
    preload = Call(res.preload, "y", "y.safetensors")
    preload.start()
    if reached:
        preload.outcome()  # runs to completion while acquire is held
    res._lock.release.set()
    model, source, _seconds = acquire.outcome()
    preload.outcome()
    assert model is disk.models["x"][0] and source == "ram"
    assert disk.reads["x"] == 1


def test_a_model_in_use_is_not_evicted_by_a_preload():
    """On a CPU the device is RAM: preloading y into room for one model used to drop x mid-job."""
    res, disk = residency(ram_models=1.5)
    with res.using("x", "x.safetensors") as (model, source, _seconds):
        assert source == "disk"
        res.preload("y", "y.safetensors")
        assert "x" in res.names() and "y" in res.names()
        assert res.acquire("x", "x.safetensors")[1] == "resident"
    assert disk.reads["x"] == 1 and model is disk.models["x"][0]
    # Not in use any more: the next model to come in may push it out as usual.
    res.preload("z", "z.safetensors")
    assert "x" not in res.names()


def test_a_second_preload_of_a_model_being_read_waits_for_that_read():
    """Before the fix the second preload returned at once, reporting a model that was not there yet."""
    res, disk = residency()
    gate = disk.hold("x")
    first = Call(res.preload, "x", "x.safetensors")
    first.start()
    assert disk.reading["x"].wait(TIMEOUT)
    second = Call(res.preload, "x", "x.safetensors")
    second.start()
    second.join(0.3)
    assert second.is_alive(), "the second preload returned while the model was still being read"
    gate.set()
    second.outcome()
    first.outcome()
    assert res.names() == ["x"] and disk.reads["x"] == 1


def test_acquire_waits_for_the_pending_preload_and_uses_its_model():
    res, disk = residency()
    gate = disk.hold("x")
    preload = Call(res.preload, "x", "x.safetensors")
    preload.start()
    assert disk.reading["x"].wait(TIMEOUT)
    acquire = Call(res.acquire, "x", "x.safetensors")
    acquire.start()
    acquire.join(0.3)
    assert acquire.is_alive()
    gate.set()
    model, source, _seconds = acquire.outcome()
    assert model is disk.models["x"][0] and source == "ram" and disk.reads["x"] == 1
    assert preload.outcome() > 0


def test_a_failed_read_reaches_every_waiter_and_the_next_acquire_reads_again():
    res, disk = residency()
    gate = disk.hold("x")
    disk.fail.add("x")
    preload = Call(res.preload, "x", "x.safetensors")
    preload.start()
    assert disk.reading["x"].wait(TIMEOUT)
    acquire = Call(res.acquire, "x", "x.safetensors")
    acquire.start()
    acquire.join(0.3)
    assert acquire.is_alive()  # waiting for the preload's read, not reading a second time
    gate.set()
    for call in (preload, acquire):
        with pytest.raises(OSError, match="unreadable"):
            call.outcome()
    assert res.names() == [] and res._loading == {}
    disk.fail.clear()
    del disk.gates["x"]
    assert res.acquire("x", "x.safetensors")[1] == "disk" and disk.reads["x"] == 2


# --- skipping weight initialisation while another thread builds or runs modules -------------------


def seeded_linear() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 16).weight.detach().clone()


def test_skipping_init_in_one_thread_leaves_another_threads_init_alone():
    from horde_worker.inference.checkpoint import skip_weight_init

    reference = seeded_linear()
    inside, leave = threading.Event(), threading.Event()

    def preload_thread() -> None:
        with skip_weight_init():
            inside.set()
            leave.wait(TIMEOUT)

    thread = threading.Thread(target=preload_thread)
    thread.start()
    try:
        assert inside.wait(TIMEOUT)
        assert torch.equal(seeded_linear(), reference)  # this thread's modules are initialised as usual
    finally:
        leave.set()
        thread.join(TIMEOUT)


def test_overlapping_skips_in_two_threads_leave_init_working():
    """Enter A, enter B, leave A, leave B: a patch-and-restore of torch.nn.init would end with B putting
    back the no-ops it found, for good."""
    from horde_worker.inference.checkpoint import skip_weight_init

    reference = seeded_linear()
    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out", "b_out")}

    def run(enter: str, wait_before_leaving: str, leave: str) -> None:
        with skip_weight_init():
            steps[enter].set()
            assert steps[wait_before_leaving].wait(TIMEOUT)
        steps[leave].set()

    a = threading.Thread(target=run, args=("a_in", "b_in", "a_out"))
    a.start()
    assert steps["a_in"].wait(TIMEOUT)
    b = threading.Thread(target=run, args=("b_in", "a_out", "b_out"))
    b.start()
    for thread in (a, b):
        thread.join(TIMEOUT)
    assert steps["b_out"].is_set()
    assert torch.equal(seeded_linear(), reference)


def test_skip_weight_init_skips_random_init_in_its_own_thread():
    from transformers import CLIPTextConfig, CLIPTextModel

    from horde_worker.inference.checkpoint import skip_weight_init

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    with skip_weight_init():
        torch.nn.Linear(64, 64)
        torch.nn.Conv2d(8, 8, 3)
        CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16))
    assert torch.equal(torch.rand(4), expected)  # nothing drew from the generator
    assert torch.nn.Linear(4, 4).weight.abs().sum() > 0  # and initialisation works again outside
