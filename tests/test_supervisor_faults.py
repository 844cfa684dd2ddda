"""Every job ends: the supervisor in-process, against the real local horde, with stand-in slot processes
that hang, crash, are slow or fail, and with jobs the horde should never have sent."""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import requests

from horde_worker.localhorde import FaultPlan, LocalHorde, ServerOptions
from horde_worker.supervisor import loop as loop_module
from horde_worker.supervisor.journal import Journal
from tests.conftest import wait_for
from tests.supervisor_harness import RunningSupervisor, answered, generations, mutate_pops, post, reasons

MODEL = "horde-worker-tiny-sd15"


@pytest.fixture
def run(tmp_path, horde, safety):
    started: list[RunningSupervisor] = []

    def start(server: LocalHorde | None = None, **kwargs) -> RunningSupervisor:
        harness = RunningSupervisor(tmp_path, server or horde, safety, **kwargs).start()
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.kill_slots()
        with contextlib.suppress(AssertionError):
            harness.stop(timeout=30)


def test_an_exception_in_a_jobs_own_task_faults_it_with_the_reason_and_the_worker_goes_on(horde, run, monkeypatch):
    real = loop_module.fetch_inputs
    calls = []

    def cut_download(client, pop, **kwargs):
        calls.append(pop.ids[0])
        if len(calls) == 1:
            raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
        return real(client, pop, **kwargs)

    monkeypatch.setattr(loop_module, "fetch_inputs", cut_download)
    harness = run()
    request = post(horde, "a quiet lake")
    wait_for(lambda: any(g.state == "done" for g in generations(horde, request)), 60, "the re-queued job", 0.2)
    first, *rest = generations(horde, request)
    assert first.state == "faulted"
    assert any("ChunkedEncodingError" in r for r in reasons(first)), first.gen_metadata
    assert rest and rest[-1].state == "done"  # the horde re-queued it and the worker served it
    assert harness.supervisor.jobs == {} or all(j.id != first.id for j in harness.supervisor.jobs.values())
    assert harness.stop() == 0


def test_a_full_disk_never_stops_images_going_out(horde, run, monkeypatch):
    def disk_full(self, job, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "0.webp.tmp").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Journal, "_write", disk_full)
    harness = run()
    request = post(horde, "a red barn", n=2)
    wait_for(lambda: answered(horde, request), 60, "the job", 0.2)
    gens = generations(horde, request)
    assert [g.state for g in gens] == ["done", "done"]
    # The images reached the horde: uploaded to its storage, or inside the submit.
    assert all(g.generation for g in gens)
    assert harness.stop() == 0
    assert list(harness.journal_dir.iterdir()) == []  # nothing half-written left behind


def test_an_encode_error_faults_the_job(horde, run, monkeypatch):
    from horde_worker.supervisor import jobspec

    def broken(image, quality=95):
        raise ValueError("encoder exploded")

    monkeypatch.setattr(jobspec, "encode_webp", broken)
    harness = run()
    request = post(horde, "a teapot")
    wait_for(lambda: bool(generations(horde, request)) and generations(horde, request)[0].state == "faulted", 60,
             "the faulted submit", 0.2)
    assert any("encoder exploded" in r for r in reasons(generations(horde, request)[0]))
    harness.kill_slots()


@pytest.mark.parametrize(("change", "expected"), [
    (lambda a: a["payload"].update(width=100000), "width 100000"),
    (lambda a: a["payload"].update(width=3072, height=3072), "max_pixels"),
    (lambda a: a["payload"].update(ddim_steps=10000), "steps 10000"),
    (lambda a: a["payload"].update(ddim_steps=-5), "steps -5"),
    (lambda a: a["payload"].update(cfg_scale=math.nan), "cfg_scale nan"),
    (lambda a: a["payload"].update(prompt="x" * 1_000_000), "characters"),
    (lambda a: a["payload"].update(sampler_name="k_warp_drive"), "k_warp_drive"),
    (lambda a: a.update(model="../../etc/passwd"), "not served"),
])
def test_a_job_outside_the_bounds_is_faulted_at_once_and_never_run(horde, run, change, expected):
    mutate_pops(horde, [change])
    harness = run()
    request = post(horde, "steps=1000 slow=1")  # would hold the slot for minutes if it ran
    wait_for(lambda: bool(generations(horde, request)) and generations(horde, request)[0].state != "processing",
             30, "the first job's submit", 0.1)
    first = generations(horde, request)[0]
    assert first.state == "faulted"
    assert any(expected in r for r in reasons(first)), first.gen_metadata  # the bounds' reason, not a time limit
    harness.kill_slots()


def test_a_pop_answer_that_fails_validation_is_faulted_by_id_and_popping_goes_on(horde, run):
    def wrong_types(answer):
        answer["payload"]["prompt"] = 5
        answer["payload"]["width"] = None

    def ids_not_a_list(answer):
        answer["ids"] = answer["id"]

    sent = mutate_pops(horde, [wrong_types, ids_not_a_list])
    harness = run()
    request = post(horde, "a lighthouse")
    wait_for(lambda: any(g.state == "done" for g in generations(horde, request)), 60, "a served job", 0.2)
    gens = generations(horde, request)
    assert len(sent) == 2 and [g.state for g in gens[:2]] == ["faulted", "faulted"]
    assert all(any("could not be read" in r for r in reasons(g)) for g in gens[:2])
    assert gens[-1].state == "done"
    assert harness.stop() == 0


def test_a_job_too_slow_for_its_ttl_is_stopped_and_faulted_before_the_ttl(run):
    horde = LocalHorde([MODEL], options=ServerOptions(sweep_interval=0.5), fixed_ttl=20).start()
    try:
        harness = run(horde)
        slow = post(horde, "slow=1 steps=60")
        wait_for(lambda: bool(generations(horde, slow)) and generations(horde, slow)[0].state != "processing", 30,
                 "the stop", 0.2)
        first = generations(horde, slow)[0]
        assert first.state == "faulted", first.state  # not aborted by the horde: answered in time
        assert any("cannot finish" in r for r in reasons(first)), first.gen_metadata
        # The stand-in stopped at the next step (it answered the stop), so the slot takes the next job.
        quick = post(horde, "quick one")
        wait_for(lambda: any(g.state == "done" for g in generations(horde, quick)), 30, "the next job", 0.2)
        assert harness.supervisor.pool.slots[0].restarts == 0
        harness.kill_slots()
    finally:
        horde.stop()


def test_a_hung_process_is_killed_its_job_faulted_in_time_and_the_slot_replaced(run):
    horde = LocalHorde([MODEL], options=ServerOptions(sweep_interval=0.5), fixed_ttl=16).start()
    try:
        harness = run(horde)
        harness.supervisor.timekeeper.stop_grace = 2.0
        hung = post(horde, "hang")
        requeue = horde.state._requeue  # served once: a second copy would hang the slot again
        horde.state._requeue = lambda request, worker: None if request.id == hung else requeue(request, worker)
        wait_for(lambda: bool(generations(horde, hung)) and generations(horde, hung)[0].state != "processing", 30,
                 "the stop", 0.2)
        first = generations(horde, hung)[0]
        assert first.state == "faulted"
        assert any("time limit" in r for r in reasons(first)), first.gen_metadata
        wait_for(lambda: harness.supervisor.pool.slots[0].restarts >= 1, 20, "the slot's replacement", 0.2)
        quick = post(horde, "quick one")
        wait_for(lambda: any(g.state == "done" for g in generations(horde, quick)), 30, "the next job", 0.2)
        assert harness.supervisor.pool.slots[0].failures_in_row == 0
        harness.kill_slots()
    finally:
        horde.stop()


def test_a_crash_looping_slot_is_backed_off_then_given_up_and_the_worker_serves_with_the_rest(horde, tmp_path):
    harness = RunningSupervisor(tmp_path, horde, None, slots=2)  # built first to know the slot's log folder
    (harness.log_dirs[1] / "crash_at_start").write_text("")
    harness.supervisor.restart_backoff = 0.1
    harness.start()
    try:
        wait_for(lambda: harness.supervisor.pool is not None and not harness.supervisor.pool.slots[1].usable, 60,
                 "slot 1 to be given up", 0.2)
        pool = harness.supervisor.pool
        assert pool.slots[1].restarts == 4 and pool.slots[1].failures_in_row == 5
        assert "slot(s) 1" in harness.supervisor.status_text()
        assert harness.supervisor.pop_request().threads == 1
        assert harness.supervisor.fatal is None
    finally:
        harness.kill_slots()
        harness.stop(timeout=30)


def test_when_no_slot_works_the_worker_says_so_and_exits(horde, tmp_path):
    harness = RunningSupervisor(tmp_path, horde, None, slots=1)
    (harness.log_dirs[0] / "crash_at_start").write_text("")
    harness.supervisor.restart_backoff = 0.1
    request = post(horde, "never runs")
    harness.start()
    assert harness.wait_exit(60) == 1
    assert "no inference slot works" in harness.supervisor.fatal
    gens = generations(horde, request)
    assert all(g.state == "faulted" for g in gens)  # popped before the slot was given up: answered, not held


def test_a_process_that_dies_mid_job_reruns_it_once_then_faults_it(horde, run):
    harness = run()
    request = post(horde, "crash")
    wait_for(lambda: bool(generations(horde, request)) and generations(horde, request)[0].state != "processing", 60,
             "the faulted submit", 0.2)
    first = generations(horde, request)[0]
    assert first.state == "faulted"
    assert any("inference process died (exit code 3)" in r for r in reasons(first))
    # Replaced after each death: at once the first time, after the backoff the second.
    wait_for(lambda: harness.supervisor.pool.slots[0].restarts >= 2, 20, "the second restart", 0.2)
    harness.kill_slots()


def test_a_model_removed_by_a_live_reload_faults_the_jobs_waiting_for_it(horde, run):
    from horde_worker.models.catalog import ModelCatalog, ServedModel

    harness = run(queue_size=1)
    busy = post(horde, "slow=0.2 steps=30")
    waiting = post(horde, "waits behind")
    wait_for(lambda: [j.pop.payload.prompt for j in harness.supervisor.scheduler.waiting] == ["waits behind"], 30,
             "the second job to queue behind the first", 0.1)
    harness.call(harness.supervisor.replace_catalog_threadsafe,
                 ModelCatalog([ServedModel("another-model", harness.supervisor.catalog.get(MODEL).path,
                                           "stable_diffusion_1")]))
    wait_for(lambda: bool(generations(horde, waiting)) and generations(horde, waiting)[0].state != "processing", 30,
             "the queued job's fault", 0.1)
    assert any("no longer served" in r for r in reasons(generations(horde, waiting)[0])), \
        generations(horde, waiting)[0].gen_metadata
    wait_for(lambda: generations(horde, busy)[0].state == "done", 30, "the running job", 0.2)
    harness.kill_slots()


def test_a_pop_in_flight_at_shutdown_is_answered(horde, run):
    import threading

    entered, release = threading.Event(), threading.Event()
    original = horde.state.pop

    def held_pop(apikey, body, base_url):
        if any(r.pending for r in horde.state.requests.values()):
            entered.set()
            release.wait(10)
        return original(apikey, body, base_url)

    horde.state.pop = held_pop
    harness = run()
    request = post(horde, "popped while stopping")
    assert entered.wait(20)
    harness.call(harness.supervisor.request_stop)
    time.sleep(0.5)
    release.set()
    assert harness.wait_exit(60) == 0
    assert [g.state for g in generations(horde, request)] == ["done"]


def test_faults_at_the_horde_never_lose_the_answer(horde, run):
    horde.set_faults({"submit": FaultPlan(rate=0.3, kinds=("500", "reset", "reset_after")),
                      "pop": FaultPlan(rate=0.3, kinds=("500", "reset", "slow"), slow_seconds=0.5)})
    harness = run()
    ids = [post(horde, f"job {i}") for i in range(6)]
    wait_for(lambda: all(answered(horde, r) for r in ids), 120, "every job", 0.3)
    assert all(any(g.state == "done" for g in generations(horde, r)) for r in ids)
    # A submit is repeated only when its answer was lost on the way back.
    assert horde.state.duplicate_submits <= horde.faults_injected.get("submit:reset_after", 0)
    assert harness.stop() == 0


def test_a_send_to_a_process_that_just_died_is_reported_not_raised(tmp_path):
    from horde_worker.inference.messages import Preload, SlotSpec
    from horde_worker.supervisor.slots import SlotPool
    from tests.fake_slot import fake_slot_main

    deaths = []
    pool = SlotPool([SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path))], lambda slot, message: None,
                    lambda slot, code: deaths.append(code), target=fake_slot_main)
    pool.start()
    slot = pool.slots[0]
    slot.process.kill()  # reaped by the pool's reader thread, as in the worker
    wait_for(lambda: len(deaths) == 1, 30, "the death report", 0.05)
    assert deaths == [-9]
    for _ in range(3):  # the first send may still fit the pipe's buffer; later ones find it broken
        ok = pool.send(slot, Preload("m", "/nowhere"))
    assert ok is False and slot.ready is False
    pool.stop()


def test_a_request_the_horde_hands_out_again_stops_the_old_copy(run):
    horde = LocalHorde([MODEL], options=ServerOptions(sweep_interval=0.3), fixed_ttl=5).start()
    try:
        harness = run(horde)
        harness.supervisor.timekeeper.margin = -1000.0  # the worker's own TTL stops are off: the horde acts first
        request = post(horde, "slow=0.5 steps=60")
        wait_for(lambda: len(generations(horde, request)) >= 2, 30, "the horde to hand the request out again", 0.1)
        first = generations(horde, request)[0]
        assert first.state == "aborted"
        wait_for(lambda: first.id not in harness.supervisor.jobs, 5, "the old copy to be stopped", 0.1)
        assert horde.state.generations[first.id].accepted_submits == 0
        harness.kill_slots()
    finally:
        horde.stop()
