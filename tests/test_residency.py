"""Model residency in a real inference process: budgets, least-recent eviction, preloading, flat RSS.

`HORDE_ROTATION_JOBS` sets the rotation's length (default 120; 1000 for the long figure)."""

from __future__ import annotations

import os
import queue
import threading

import psutil
import pytest

from horde_worker.inference.messages import (
    GenerateRequest,
    GenerateResult,
    Preload,
    Preloaded,
    Progress,
    SlotReady,
    SlotSpec,
)
from horde_worker.inference.tiny import write_tiny_checkpoint
from horde_worker.supervisor.slots import SlotPool

MODEL_BYTES = 18_400_000  # one tiny SD1 checkpoint in fp32, about
ROTATION_JOBS = max(40, int(os.environ.get("HORDE_ROTATION_JOBS", "120")))


@pytest.fixture(scope="module")
def five_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("five")
    return [write_tiny_checkpoint(folder / f"m{i}.safetensors", "stable_diffusion_1", seed=i) for i in range(5)]


class SlotHarness:
    """One real inference process, driven directly."""

    def __init__(self, tmp_path, ram_budget: int) -> None:
        self.messages: queue.Queue = queue.Queue()
        spec = SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path / "logs"), ram_budget=ram_budget)
        self.pool = SlotPool([spec], lambda slot, m: self.messages.put(m), lambda slot, code: self.messages.put(code))
        self.pool.start()
        self.slot = self.pool.slots[0]
        assert isinstance(self.next(), SlotReady)

    def next(self, timeout: float = 120):
        return self.messages.get(timeout=timeout)

    def run(self, path, name: str, job: str, post_processing: list | None = None) -> GenerateResult:
        self.pool.send(self.slot, GenerateRequest(
            job_id=job, model_name=name, model_path=str(path), baseline="stable_diffusion_1", prompt="x",
            negative_prompt="", width=64, height=64, steps=1, cfg_scale=2.0, sampler_name="k_euler", karras=False,
            seeds=[1], post_processing=post_processing or []))
        while True:
            message = self.next()
            if isinstance(message, GenerateResult):
                return message
            assert not isinstance(message, int), f"inference process died ({message})"

    def rss(self) -> int:
        return psutil.Process(self.slot.pid).memory_info().rss

    def stop(self) -> None:
        self.pool.stop()


def test_rotation_over_five_models_stays_in_budget_with_flat_rss(tmp_path, five_models):
    from horde_worker.inference.tiny_postprocess import write_tiny_upscaler

    budget = int(MODEL_BYTES * 2.5)  # room for two models in RAM
    # Every third job is upscaled too, by one of two upscalers in turn: post-processing models come and go.
    upscalers = [[("RealESRGAN_x2plus", str(write_tiny_upscaler(tmp_path / "x2.pth", 2)))],
                 [("RealESRGAN_x4plus", str(write_tiny_upscaler(tmp_path / "x4.pth", 4)))]]
    harness = SlotHarness(tmp_path, budget)
    early, last = ROTATION_JOBS // 3 - 1, ROTATION_JOBS - 1
    try:
        sources, rss = [], {}
        for job in range(ROTATION_JOBS):
            index = job % 5
            post = upscalers[(job // 3) % 2] if job % 3 == 2 else None
            result = harness.run(five_models[index], f"m{index}", f"job{job}", post)
            assert result.resident_bytes <= budget, (job, result.resident_bytes)
            assert len(result.resident_models) <= 2
            if post:
                scale = 2 if "x2" in post[0][0] else 4
                assert result.images[0].shape[:2] == (64 * scale, 64 * scale), job
            sources.append(result.load_source)
            if job in (early, last):
                rss[job] = harness.rss()
        assert sources.count("disk") == ROTATION_JOBS  # rotating 5 over room for 2: every job switches
        growth = (rss[last] - rss[early]) / rss[early]
        assert growth < 0.05, f"RSS grew {growth:.1%} from job {early + 1} to job {last + 1} ({rss})"
    finally:
        harness.stop()


def test_models_stay_resident_within_budget_and_least_recent_goes_first(tmp_path, five_models):
    harness = SlotHarness(tmp_path, int(MODEL_BYTES * 2.5))
    try:
        order = [0, 1, 0, 1, 2, 0, 1]
        sources = [harness.run(five_models[i], f"m{i}", f"j{n}").load_source for n, i in enumerate(order)]
        # m0 and m1 fit together (on a CPU the device is RAM, so both stay "resident"); m2 pushes out
        # m0, the least recently used, so m0 comes from disk again and pushes out m1, and so on.
        assert sources == ["disk", "disk", "resident", "resident", "disk", "disk", "disk"]
    finally:
        harness.stop()


def test_preload_reads_the_next_model_while_the_slot_is_busy(tmp_path, five_models):
    harness = SlotHarness(tmp_path, int(MODEL_BYTES * 2.5))
    try:
        harness.run(five_models[0], "m0", "warm")
        harness.pool.send(harness.slot, Preload("m3", str(five_models[3])))
        preloaded = harness.next()
        assert isinstance(preloaded, Preloaded) and preloaded.error is None and "m3" in preloaded.resident_models
        assert harness.run(five_models[3], "m3", "after").load_source in ("ram", "resident")
    finally:
        harness.stop()


def test_preload_does_not_wait_for_the_running_job(tmp_path, five_models):
    harness = SlotHarness(tmp_path, None)
    try:
        harness.run(five_models[0], "m0", "warm")
        seen: list = []
        harness.pool.send(harness.slot, GenerateRequest(
            job_id="long", model_name="m0", model_path=str(five_models[0]), baseline="stable_diffusion_1",
            prompt="x", negative_prompt="", width=256, height=256, steps=25, cfg_scale=2.0, sampler_name="k_euler",
            karras=False, seeds=[1]))
        threading.Event().wait(0.5)
        harness.pool.send(harness.slot, Preload("m4", str(five_models[4])))
        while not any(isinstance(m, GenerateResult) for m in seen):
            seen.append(harness.next())
        kinds = [type(m).__name__ for m in seen if type(m).__name__ in ("Preloaded", "GenerateResult")]
        assert kinds == ["Preloaded", "GenerateResult"]  # the model was read while the job sampled
    finally:
        harness.stop()


def test_preload_does_not_evict_the_model_of_the_running_job(tmp_path, five_models):
    """Room for one model: a preload during a job makes room among idle models only, so the running
    job's model stays resident (before, the preload dropped it while the job still sampled with it)."""
    harness = SlotHarness(tmp_path, int(MODEL_BYTES * 1.5))
    try:
        harness.run(five_models[0], "m0", "warm")
        harness.pool.send(harness.slot, GenerateRequest(
            job_id="long", model_name="m0", model_path=str(five_models[0]), baseline="stable_diffusion_1",
            prompt="x", negative_prompt="", width=256, height=256, steps=25, cfg_scale=2.0, sampler_name="k_euler",
            karras=False, seeds=[1]))
        while not isinstance(message := harness.next(), Progress):
            assert not isinstance(message, int), f"inference process died ({message})"
        harness.pool.send(harness.slot, Preload("m1", str(five_models[1])))
        seen = []
        while not any(isinstance(m, GenerateResult) for m in seen):
            seen.append(harness.next())
        preloaded = next(m for m in seen if isinstance(m, Preloaded))
        assert preloaded.error is None and "m0" in preloaded.resident_models
        assert harness.run(five_models[0], "m0", "again").load_source == "resident"
    finally:
        harness.stop()


def test_memory_settings_decide_which_unused_models_leave_the_device():
    from horde_worker.config.bridge_data import BridgeData
    from horde_worker.inference.residency import device_victim

    assert BridgeData().memory_tier() == (False, True)  # the template's defaults: unload often, keep in RAM
    assert BridgeData(unload_models_from_vram_often=False).memory_tier() == (True, True)
    assert BridgeData(very_fast_disk_mode=True).memory_tier() == (False, False)
    assert BridgeData(high_memory_mode=True, very_fast_disk_mode=True).memory_tier() == (True, True)
    resident = ["old", "busy", "new"]  # least recently used first
    # Keeping unused models: they leave only while the device is over its budget, least recent first.
    assert device_victim(resident, {"busy"}, over_budget=False, keep_unused=True) is None
    assert device_victim(resident, {"busy"}, over_budget=True, keep_unused=True) == "old"
    # Unloading often: every model no job uses leaves, budget or not; a model in use never does.
    assert device_victim(resident, {"busy"}, over_budget=False, keep_unused=False) == "old"
    assert device_victim(["busy"], {"busy"}, over_budget=True, keep_unused=False) is None
