"""Ctrl+C as a terminal sends it: SIGINT to the worker's whole process group, children included."""

from __future__ import annotations

import re

import requests

from horde_worker.localhorde import LocalHorde, ServerOptions
from tests.conftest import wait_for

MODEL = "horde-worker-tiny-sd15"


def post(horde: LocalHorde, prompt: str, **params) -> str:
    body = {"prompt": prompt, "params": {"steps": 4, "width": 256, "height": 256, "n": 1, **params}, "models": [MODEL]}
    answer = requests.post(f"{horde.url}/v2/generate/async", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def status(horde: LocalHorde, request_id: str) -> dict:
    return requests.get(f"{horde.url}/v2/generate/status/{request_id}", timeout=10).json()


def test_a_broken_settings_file_then_ctrl_c_to_the_group_mid_sampling(start_group_worker):
    with LocalHorde([MODEL], options=ServerOptions(sweep_interval=1.0)) as horde:
        worker = start_group_worker(horde.url, horde.api_key)
        wait_for(lambda: "ready on" in worker.output(), 120, "the inference slot")
        # Saved from an editor in another encoding: the running worker says so and keeps its settings.
        settings = worker.folder / "bridgeData.yaml"
        settings.write_bytes(settings.read_bytes() + b"\n# caf\xe9\n")
        wait_for(lambda: "keeping the previous settings" in worker.output(), 30, "the reload's refusal")
        assert "bridgeData.yaml: byte" in worker.output() and "not UTF-8" in worker.output()
        slow = post(horde, "a slow one", steps=30, width=512, height=512)
        wait_for(lambda: re.search(r"popped job", worker.output()) is not None, 120, "the job to be popped")
        wait_for(lambda: "ready on" in worker.output(), 120, "the inference slot")
        worker.interrupt_group()
        assert worker.wait(timeout=240) == 0, worker.output()
        out = worker.output()
        assert status(horde, slow)["done"], out
        # The children ignored the signal: nothing died, nothing ran twice.
        assert "died" not in out and "runs again" not in out, out
        assert horde.state.submits_received == 1


def test_ctrl_c_to_the_group_while_the_slot_starts_still_serves_the_job_in_hand(start_group_worker):
    with LocalHorde([MODEL], options=ServerOptions(sweep_interval=1.0)) as horde:
        request = post(horde, "popped at start-up")
        worker = start_group_worker(horde.url, horde.api_key)
        wait_for(lambda: "popped job" in worker.output(), 120, "the job to be popped", interval=0.2)
        worker.interrupt_group()
        assert worker.wait(timeout=240) == 0, worker.output()
        assert status(horde, request)["done"], worker.output()
        assert "died" not in worker.output()
