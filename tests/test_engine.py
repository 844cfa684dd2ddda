"""The engine in one inference process: jobs of one model run at once, plain txt2img ones sharing each
step's forward, the others stepping their own pipelines in turn; every job's images are the images it
makes alone, and a job stopped mid-batch leaves the others untouched."""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pytest
from PIL import Image

from horde_worker.inference.cancellation import Cancellations
from horde_worker.inference.engine import Engine
from horde_worker.inference.messages import GenerateFailed, GenerateResult, Progress, SlotSpec
from horde_worker.inference.runner import ModelRunner
from tests.conftest import job_request


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=tempfile.mkdtemp()))


def request(tiny_checkpoint, job_id: str, **overrides):
    fields = dict(job_id=job_id, model_name="tiny", model_path=str(tiny_checkpoint), width=64, height=64)
    return job_request(**{**fields, **overrides})


JOBS = {
    "a": dict(sampler_name="k_euler", steps=5, cfg_scale=7.0, prompt="a cat", seeds=[1]),
    "b": dict(sampler_name="k_dpmpp_2m", karras=True, steps=3, cfg_scale=4.0, prompt="a dog", seeds=[2, 5]),
    "c": dict(sampler_name="k_euler_a", steps=4, prompt="a tree", seeds=[3]),
    "tall": dict(sampler_name="k_heun", steps=3, prompt="a tower", seeds=[4], height=96),
    "img2img": dict(sampler_name="k_euler", steps=4, prompt="a red square", seeds=[9],
                    source_image=png((200, 30, 30)), denoising_strength=0.6),
    "stopped": dict(sampler_name="k_euler", steps=6, prompt="a boat", seeds=[11]),
}


class Engines:
    def __init__(self, runner, max_jobs: int) -> None:
        self.sent: list[object] = []
        self.cancels = Cancellations()
        self.engine = Engine(runner, self.sent.append, self.cancels.reason, self.cancels.forget, max_jobs=max_jobs)

    def submit(self, message) -> None:
        self.cancels.admit(message.job_id)
        self.engine.submit(message)

    def answers(self) -> dict[str, object]:
        return {m.job_id: m for m in self.sent if isinstance(m, GenerateResult | GenerateFailed)}


def alone(runner, message) -> list[np.ndarray]:
    result = runner.generate(message, lambda _m: None)
    return result.images


def test_jobs_run_together_and_each_makes_the_images_it_makes_alone(runner, tiny_checkpoint):
    engines = Engines(runner, max_jobs=8)
    for name in ("a", "b", "tall", "img2img", "stopped"):
        engines.submit(request(tiny_checkpoint, name, **JOBS[name]))
    engine = engines.engine
    engine.iterate()
    engine.iterate()
    engines.submit(request(tiny_checkpoint, "c", **JOBS["c"]))  # joins while the others run
    engine.iterate()
    engines.cancels.cancel("stopped", "client gone")  # stopped mid-batch
    for _ in range(200):
        if not engine.jobs:
            break
        engine.iterate()
    answers = engines.answers()
    assert set(answers) == {"a", "b", "c", "tall", "img2img", "stopped"}
    assert isinstance(answers["stopped"], GenerateFailed) and answers["stopped"].reason == "stopped: client gone"
    for name in ("a", "b", "c", "tall", "img2img"):
        result = answers[name]
        assert isinstance(result, GenerateResult), (name, result)
        expected = alone(runner, request(tiny_checkpoint, name, **JOBS[name]))
        assert len(result.images) == len(expected) == len(JOBS[name]["seeds"])
        for got, want in zip(result.images, expected, strict=True):
            assert got.shape == want.shape
            assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1, name
    assert not np.array_equal(answers["a"].images[0], answers["c"].images[0])
    # The 64x64 txt2img jobs shared forwards (a, b, stopped from the first step, c once it joined); the tall
    # one and the img2img job ran beside them, each on its own.
    shared = [ids for ids in engine.forwards if len(ids) > 1]
    assert shared and set(shared[0]) == {"a", "b", "stopped"}
    assert any("c" in ids and "a" in ids for ids in engine.forwards)
    assert all("tall" not in ids or ids == ["tall"] for ids in engine.forwards)
    progress = [m for m in engines.sent if isinstance(m, Progress) and m.job_id == "img2img"]
    assert [p.step for p in progress] == [1, 2, 3, 4]


def test_the_engine_starts_no_more_jobs_than_it_may_run_at_once(runner, tiny_checkpoint):
    engines = Engines(runner, max_jobs=2)
    for name in ("a", "b", "c"):
        engines.submit(request(tiny_checkpoint, name, **JOBS[name]))
    engine = engines.engine
    started_together = 0
    for _ in range(100):
        if not engine.jobs and engines.answers():
            break
        engine.iterate()
        started_together = max(started_together, sum(1 for j in engine.jobs.values() if j.state.value != "waiting"))
    assert started_together == 2
    assert all(isinstance(m, GenerateResult) for m in engines.answers().values()) and len(engines.answers()) == 3


@pytest.mark.parametrize("baseline", ["stable_diffusion_xl", "flux_1"])
def test_sdxl_and_flux_jobs_batch_and_decode_as_alone(runner, tmp_path, baseline):
    from horde_worker.inference.tiny import write_tiny_checkpoint, write_tiny_flux_checkpoint

    path = tmp_path / f"{baseline}.safetensors"
    if baseline == "flux_1":
        write_tiny_flux_checkpoint(path, seed=1, guidance=True, fp8=False)
    else:
        write_tiny_checkpoint(path, baseline)
    jobs = {"p": dict(steps=3, prompt="a red barn", seeds=[1, 2], cfg_scale=3.5),
            "q": dict(steps=4, prompt="a blue lake", seeds=[3], cfg_scale=5.0)}

    def make(name: str):
        return job_request(job_id=name, model_name=baseline, model_path=str(path), baseline=baseline, width=64,
                           height=64, sampler_name="k_euler", **jobs[name])

    engines = Engines(runner, max_jobs=4)
    for name in jobs:
        engines.submit(make(name))
    for _ in range(50):
        if not engines.engine.jobs and len(engines.answers()) == len(jobs):
            break
        engines.engine.iterate()
    answers = engines.answers()
    assert {type(a) for a in answers.values()} == {GenerateResult}, answers
    assert answers["p"].shared_with == 1 and answers["q"].shared_with == 1
    for name in jobs:
        for got, want in zip(answers[name].images, alone(runner, make(name)), strict=True):
            assert got.shape == want.shape == (64, 64, 3)
            assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1, name


def test_the_stream_benchmark_serves_its_mix_on_cpu(tmp_path, capsys):
    import json

    from horde_worker.bench.__main__ import main
    from horde_worker.bench.stream import stream_mix

    mix = stream_mix("stable_diffusion_1", "m", images=40, full_size=True)
    assert sum(b["params"]["n"] for b in mix) >= 40 and mix == stream_mix("stable_diffusion_1", "m", 40, True)
    assert len({(b["params"]["width"], b["params"]["height"]) for b in mix}) > 1
    assert len({b["params"]["sampler_name"] for b in mix}) > 2
    out = tmp_path / "stream.json"
    assert main(["--stream", "--device", "cpu", "--images", "4", "--max-threads", "2", "--compile", "off",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["sd15"]
    worker = figures["worker"]
    assert worker["images"] == worker["expected_images"] == figures["images"] >= 4
    assert worker["seconds_per_image"] > 0 and figures["plain_diffusers"]["seconds_per_image"] > 0
    assert 0 < worker["inference_busy_share"] <= 1.0
    assert "stable_diffusion_1: worker" in capsys.readouterr().out
