"""Safety: the horde's own checker over a tiny CLIP whose answers are chosen, every censorship branch,
and a safety process that fails faulting the job instead of letting an image through."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from horde_worker.horde.wire import GenMetadataType, GenMetadataValue, SubmitState
from horde_worker.safety.censor import censor_image, decide
from horde_worker.safety.messages import ImageVerdict, SafetyCheck
from horde_worker.safety.tiny import write_tiny_clip
from tests.conftest import wait_for

CONCEPTS = {
    "clean": ["landscape", "mountain"],
    "adult": ["woman", "naked", "nude", "sexual"],
    "csam": ["child", "children", "toddler", "naked", "nude", "sexual", "porn"],
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return {name: write_tiny_clip(folder / f"{name}.safetensors", words) for name, words in CONCEPTS.items()}


def test_the_horde_checker_reaches_each_verdict(clips):
    from horde_worker.safety.process import Checker

    image = np.full((64, 64, 3), 120, np.uint8)
    found = {}
    for name, path in clips.items():
        verdicts = Checker(path, "cpu").check(SafetyCheck("j", [image, image], "a picture ### ugly")).verdicts
        assert len(verdicts) == 2
        found[name] = (verdicts[0].nsfw, verdicts[0].csam)
    assert found == {"clean": (False, False), "adult": (True, False), "csam": (True, True)}


def meta(outcome) -> list[tuple[str, str]]:
    return [(m.type.value, m.value.value) for m in outcome.metadata]


def test_every_censorship_branch():
    image = np.full((96, 128, 3), 200, np.uint8)
    clean, nsfw, csam = ImageVerdict(False, False), ImageVerdict(True, False), ImageVerdict(True, True)
    base = dict(worker_nsfw=True, use_nsfw_censor=False, censor_nsfw=False, censorlist=[], prompt="a portrait")

    kept = decide(clean, image, **base)
    assert kept.image is image and kept.state is SubmitState.OK and kept.metadata == []

    allowed = decide(nsfw, image, **base)
    assert allowed.image is image and allowed.state is SubmitState.OK and meta(allowed) == [("information", "nsfw")]

    reasons = set()
    for overrides in ({"worker_nsfw": False}, {"use_nsfw_censor": True},
                      {"censor_nsfw": True, "censorlist": ["Portrait"]}):
        censored = decide(nsfw, image, **{**base, **overrides})
        assert censored.state is SubmitState.CENSORED and meta(censored) == [("censorship", "nsfw")]
        assert censored.image.shape == image.shape and np.abs(censored.image.astype(int) - 200).mean() > 50
        reasons.add(censored.reason)
    assert len(reasons) == 3  # each says why
    listed_without_censor_nsfw = decide(nsfw, image, **{**base, "censorlist": ["portrait"]})
    assert meta(listed_without_censor_nsfw) == [("information", "nsfw")]

    withheld = decide(csam, image, **base)
    assert withheld.state is SubmitState.CSAM and meta(withheld) == [("censorship", "csam")]
    assert not np.array_equal(withheld.image, image)
    assert not np.array_equal(withheld.image, censor_image(image.shape, "other reason"))  # the reason is written


def test_safety_process_death_is_reported_and_the_next_check_restarts_it(clips, tmp_path):
    import os
    import signal

    from horde_worker.supervisor.safety_client import SafetyClient, SafetyUnavailable

    weights = tmp_path / "clip.safetensors"
    shutil.copy(clips["adult"], weights)
    shutil.copy(clips["adult"].with_suffix(".json"), weights.with_suffix(".json"))
    client = SafetyClient(weights, "cpu", str(tmp_path / "logs"))
    client.start()
    image = np.zeros((32, 32, 3), np.uint8)
    try:
        assert client.check("a", [image], "x").verdicts[0].nsfw
        os.kill(client.pid, signal.SIGKILL)
        with pytest.raises(SafetyUnavailable, match="died"):
            client.check("b", [image], "x")
        assert client.check("c", [image], "x").verdicts[0].nsfw  # a new process answers
        os.kill(client.pid, signal.SIGKILL)
        weights.unlink()  # and now it cannot come back
        with pytest.raises(SafetyUnavailable):
            client.check("d", [image], "x")
        with pytest.raises(SafetyUnavailable):
            client.check("e", [image], "x")
    finally:
        client.stop()


def submitted(horde, request_id):
    return requests.get(f"{horde.url}/v2/generate/status/{request_id}", timeout=10).json()


def post(horde, prompt: str) -> str:
    body = {"prompt": prompt, "params": {"steps": 2, "width": 128, "height": 128, "n": 2},
            "models": ["horde-worker-tiny-sd15"]}
    return requests.post(f"{horde.url}/v2/generate/async", json=body, timeout=10).json()["id"]


def test_worker_withholds_csam(local_horde, start_worker, clips):
    worker = start_worker(local_horde, safety_model=str(clips["csam"]))
    request_id = post(local_horde, "a picture")
    wait_for(lambda: submitted(local_horde, request_id)["done"], 180, "the checked request")
    generations = submitted(local_horde, request_id)["generations"]
    assert len(generations) == 2
    for gen in generations:
        assert gen["censored"]  # the horde reads censorship from gen_metadata (its status says "ok" regardless)
        assert gen["gen_metadata"] == [{"type": GenMetadataType.CENSORSHIP.value, "value": GenMetadataValue.CSAM.value}]
        pixels = np.asarray(Image.open(io.BytesIO(requests.get(gen["img"], timeout=10).content)).convert("RGB"))
        assert pixels.shape == (128, 128, 3) and abs(float(pixels.mean()) - 48) < 25  # the dark censor image
    assert worker.output().count("censored: csam") == 2


def test_worker_faults_jobs_when_the_safety_check_cannot_run(local_horde, start_worker, clips, tmp_path):
    import psutil

    weights = tmp_path / "doomed.safetensors"
    shutil.copy(clips["clean"], weights)
    shutil.copy(clips["clean"].with_suffix(".json"), weights.with_suffix(".json"))
    worker = start_worker(local_horde, safety_model=str(weights))
    wait_for(lambda: "safety checker ready" in worker.output() and "slot 0 ready" in worker.output(), 120,
             "the worker to start")
    weights.unlink()
    for child in psutil.Process(worker.process.pid).children(recursive=True):
        if "spawn_main" in " ".join(child.cmdline()):
            child.kill()  # the safety process (and the inference process, which comes back by itself)
    request_id = post(local_horde, "a lighthouse")
    wait_for(lambda: "submitted as faulted, no unchecked image leaves" in worker.output(), 180,
             "the job to be faulted")
    status = submitted(local_horde, request_id)
    assert not status["done"] and not [g for g in status["generations"] if g["state"] == "ok"]


def test_safety_benchmark_runs_on_cpu(capsys):
    import json

    from horde_worker.bench.safety import main

    assert main(["--sizes", "64", "--count", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seconds_per_image"]["64x64"] > 0 and report["start_seconds"] > 0
