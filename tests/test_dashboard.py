"""The local dashboard and /metrics of a running worker (a real supervisor against the local horde over HTTP, with
stand-in slot processes): the state and the Prometheus text follow served and faulted jobs; in a real headless
browser the page shows a job's progress moving and comes back after the worker restarts."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from horde_worker.supervisor.job import JobState
from tests.conftest import wait_for
from tests.supervisor_harness import RunningSupervisor, answered, post

MODEL = "horde-worker-tiny-sd15"


@pytest.fixture
def run(tmp_path, horde, safety):
    started: list[RunningSupervisor] = []

    def start(**settings) -> RunningSupervisor:
        harness = RunningSupervisor(tmp_path, horde, safety, **settings).start()
        started.append(harness)
        wait_for(lambda: harness.supervisor.dashboard is not None and harness.supervisor.dashboard.bound_port,
                 30, "the dashboard", 0.05)
        return harness

    yield start
    for harness in started:
        harness.kill_slots()
        with contextlib.suppress(AssertionError):
            harness.stop(timeout=30)


def _url(harness: RunningSupervisor, path: str = "/") -> str:
    return f"http://127.0.0.1:{harness.supervisor.dashboard.bound_port}{path}"


def _metrics(harness: RunningSupervisor) -> dict[tuple[str, tuple], float]:
    text = requests.get(_url(harness, "/metrics"), timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_state_and_metrics_follow_served_and_faulted_jobs(horde, run):
    harness = run()
    served = post(horde, "a quiet lake slow=0.1 steps=20")
    def running_job() -> dict | None:
        slots = requests.get(_url(harness, "/api/state"), timeout=5).json()["slots"]
        return next((job for slot in slots for job in slot["jobs"] if job["step"] >= 2), None)

    wait_for(lambda: running_job() is not None, 30, "a job's progress on the dashboard", 0.05)
    running = running_job()
    assert running["model"] == MODEL and running["steps"] == 20 and 2 <= running["step"] <= 20
    assert running["eta_s"] is not None and 0 <= running["eta_s"] < 10
    state = requests.get(_url(harness, "/api/state"), timeout=5).json()
    assert state["settings"]["api_key"] == "(set)" and state["worker"]["name"] == "harness-worker"
    assert "horde_url" in state["settings"] and "@" not in json.dumps(state["settings"])
    wait_for(lambda: answered(horde, served), 60, "the served job", 0.1)
    faulted = post(horde, "please raise")
    wait_for(lambda: answered(horde, faulted), 60, "the faulted job", 0.1)
    wait_for(lambda: len(harness.supervisor.stats.recent) == 2, 30, "both jobs recorded", 0.05)
    state = requests.get(_url(harness, "/api/state"), timeout=5).json()
    outcomes = {job["outcome"]: job for job in state["recent"]}
    assert set(outcomes) == {"done", "faulted"} and "asked to fail" in outcomes["faulted"]["reason"]
    assert state["totals"]["jobs_done"] == 1 and state["totals"]["mean_step_seconds"] == pytest.approx(0.5)
    metrics = _metrics(harness)
    worker = ("worker", "harness-worker")
    assert metrics[("horde_worker_jobs_total", (("outcome", "done"), worker))] == 1
    assert metrics[("horde_worker_jobs_total", (("outcome", "faulted"), worker))] == 1
    assert metrics[("horde_worker_images_total", (worker,))] == 1
    assert metrics[("horde_worker_kudos_total", (worker,))] > 0
    assert metrics[("horde_worker_megapixelsteps_total", (worker,))] > 0
    assert metrics[("horde_worker_safety_verdicts_total", (("verdict", "ok"), worker))] == 1
    assert metrics[("horde_worker_step_seconds_count", (worker,))] == 1
    # 20 reported steps of 0.1 s for a job of 4 steps: 0.5 s per step of the job.
    assert metrics[("horde_worker_step_seconds_bucket", (("le", "0.25"), worker))] == 0
    assert metrics[("horde_worker_step_seconds_bucket", (("le", "0.5"), worker))] == 1
    assert metrics[("horde_worker_queue_jobs", (("state", JobState.RUNNING.value), worker))] == 0
    assert metrics[("horde_worker_model_switches_total", (worker,))] >= 0
    health = requests.get(_url(harness, "/healthz"), timeout=5)
    assert health.status_code == 200 and health.json()["jobs_done"] == 1
    # On loopback it answers for this machine's names only (a rebound DNS name is refused).
    assert requests.get(_url(harness, "/api/state"), headers={"Host": "evil.example"}, timeout=5).status_code == 403
    assert requests.get(_url(harness, "/api/state"), headers={"Host": "localhost:1"}, timeout=5).status_code == 200
    assert harness.stop() == 0


def test_the_dashboard_is_off_with_one_key(horde, safety, tmp_path):
    harness = RunningSupervisor(tmp_path, horde, safety, dashboard=False).start()
    try:
        request = post(horde, "a hill")
        wait_for(lambda: answered(horde, request), 60, "the job", 0.1)
        assert harness.supervisor.dashboard is None
    finally:
        harness.kill_slots()
        harness.stop(timeout=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_in_a_real_browser_the_page_shows_progress_and_survives_a_restart(horde, run):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    harness = run(dashboard_port=port)
    with sync_playwright() as playwright:
        # Loopback only: every other host resolves to nothing and any other traffic goes to a closed local port.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('name').textContent.includes('harness-worker')",
                                   timeout=15000)
            post(horde, "a long road slow=0.25 steps=30")
            page.wait_for_selector(".slot .bar", timeout=20000)
            first = page.inner_text("#slots")
            page.wait_for_function(f"document.getElementById('slots').innerText !== {first!r}", timeout=10000)
            assert "/30" in page.inner_text("#slots")
            assert harness.stop() == 0
            page.wait_for_selector("#offline", state="visible", timeout=15000)
            again = run(dashboard_port=port)  # the worker restarts on the same port
            page.wait_for_selector("#offline", state="hidden", timeout=20000)
            page.wait_for_function("document.getElementById('totals').textContent.includes('0 done')", timeout=15000)
            assert again.supervisor.dashboard.bound_port == port
        finally:
            browser.close()


def test_the_settings_shown_hide_secrets_unknown_keys_and_url_credentials():
    from horde_worker.config.bridge_data import BridgeData
    from horde_worker.ui.snapshot import settings_in_effect

    settings = BridgeData.model_validate({"api_key": "A" * 22, "civitai_api_token": "tok", "hf_token": "HFSECRET",
                                          "download_mirror": "https://user:pw@mirror.lan:8080/files/"})
    shown = settings_in_effect(settings)
    assert shown["api_key"] == "(set)" and shown["civitai_api_token"] == "(set)"
    assert "hf_token" not in shown and shown["download_mirror"] == "https://mirror.lan:8080/files/"
    assert "HFSECRET" not in json.dumps(shown) and "pw" not in json.dumps(shown)
