"""The worker's child processes as the supervisor starts them: a Ctrl+C does not kill them, they do
not outlive the supervisor, and a running job can be stopped at a step boundary."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from horde_worker.inference.messages import (
    CancelJob,
    GenerateFailed,
    GenerateResult,
    Progress,
    Shutdown,
    SlotReady,
    SlotSpec,
)
from horde_worker.inference.process_guard import sigint_ignored
from tests.conftest import job_request

REPO = Path(__file__).resolve().parent.parent
# Hundreds of steps at 256 px: minutes if it ran to the end, so any quick answer means it was cut short.
SLOW = dict(width=256, height=256, steps=200)
DONE = (GenerateResult, GenerateFailed)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from horde_worker.inference.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("process") / "m.safetensors", "stable_diffusion_1")


def job(model: Path, job_id: str, **overrides):
    return job_request(job_id=job_id, model_name="m", model_path=str(model), **overrides)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until `pid` has exited (an unreaped orphan counts), or fail."""
    start = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - start < timeout, f"process {pid} still running after {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


class SlotProcess:
    """One real inference process, started like SlotPool starts it (spawn, a pipe) and driven directly."""

    def __init__(self, log_dir: Path) -> None:
        from horde_worker.inference.runner import slot_main

        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=slot_main, args=(child, SlotSpec(0, "cpu", str(log_dir))), daemon=True)
        self.process.start()  # not under sigint_ignored: slot_main must ignore SIGINT by itself
        child.close()
        assert isinstance(self.next(180), SlotReady)

    def send(self, message) -> None:
        self.conn.send(message)

    def next(self, timeout: float = 120):
        assert self.conn.poll(timeout), f"no message from the inference process within {timeout}s"
        return self.conn.recv()

    def until(self, kinds, timeout: float = 120) -> tuple[object, list]:
        """Messages up to the first of `kinds`: (that message, the ones before it)."""
        seen = []
        while not isinstance(message := self.next(timeout), kinds):
            seen.append(message)
        return message, seen

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(Shutdown())
        self.process.join(timeout=20)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


@pytest.fixture(scope="module")
def slot(tmp_path_factory, model):
    process = SlotProcess(tmp_path_factory.mktemp("slot-logs"))
    yield process
    process.stop()


def test_sigint_does_not_stop_a_sampling_job(slot, model):
    slot.send(job(model, "sigint", steps=10))
    first, _ = slot.until(Progress)
    for _ in range(3):
        os.kill(slot.process.pid, signal.SIGINT)
        time.sleep(0.05)
    result, seen = slot.until(DONE)
    assert isinstance(result, GenerateResult) and result.job_id == "sigint"
    assert first.step < 10 and [m.step for m in seen if isinstance(m, Progress)][-1] == 10  # sampled on after them
    assert slot.process.is_alive()


def test_cancel_stops_the_sampling_job_at_a_step_and_the_next_job_runs(slot, model):
    slot.send(job(model, "long", **SLOW))
    slot.until(Progress)
    sent = time.monotonic()
    slot.send(CancelJob("long", "too slow"))
    answer, seen = slot.until(DONE)
    took = time.monotonic() - sent
    assert isinstance(answer, GenerateFailed) and answer.job_id == "long"
    assert answer.reason == "stopped: too slow" and "m" in answer.resident_models
    assert took < 15 and max((m.step for m in seen if isinstance(m, Progress)), default=1) < 30  # of 200
    slot.send(job(model, "next", steps=2))
    after, _ = slot.until(DONE)
    assert isinstance(after, GenerateResult) and after.job_id == "next" and after.load_source == "resident"


def test_cancel_of_a_queued_job_skips_it_and_unknown_cancels_are_ignored(slot, model):
    slot.send(CancelJob("nobody", "not here"))
    slot.send(job(model, "first", **SLOW))
    slot.send(job(model, "queued", steps=2))
    slot.until(Progress)
    slot.send(CancelJob("queued", "client gone"))
    slot.send(CancelJob("first", "time limit"))
    one, seen_one = slot.until(DONE)
    other, seen_other = slot.until(DONE)
    answers = {one.job_id: one, other.job_id: other}  # the queued one is answered at once, the other at its step
    assert answers["first"].reason == "stopped: time limit"
    assert isinstance(answers["queued"], GenerateFailed) and answers["queued"].reason == "stopped: client gone"
    assert not [m for m in seen_one + seen_other if getattr(m, "job_id", None) in ("queued", "nobody")
                and not isinstance(m, GenerateFailed)]
    slot.send(CancelJob("first", "again"))  # already answered: ignored
    slot.send(job(model, "after", steps=2))
    after, seen = slot.until(DONE)
    assert isinstance(after, GenerateResult) and after.job_id == "after"
    assert all(getattr(m, "job_id", "after") == "after" for m in seen)


def test_the_process_ends_mid_job_when_the_supervisors_pipe_closes(model, tmp_path):
    slot = SlotProcess(tmp_path / "logs")
    try:
        slot.send(job(model, "long", **SLOW))
        slot.until(Progress)
        slot.conn.close()
        assert wait_gone(slot.process.pid, 5) < 2.5
        slot.process.join(timeout=5)
        assert slot.process.exitcode == 0
    finally:
        if slot.process.is_alive():
            slot.process.kill()


def test_a_child_started_under_sigint_ignored_ignores_sigint_from_exec_on():
    context = mp.get_context("spawn")
    before = signal.getsignal(signal.SIGINT)
    with sigint_ignored():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        # The child's first act is to SIGINT itself: only an ignore inherited across exec, and kept by
        # Python's start-up, lets it end cleanly.
        shielded = context.Process(target=signal.raise_signal, args=(signal.SIGINT,))
        shielded.start()
    assert signal.getsignal(signal.SIGINT) is before
    plain = context.Process(target=signal.raise_signal, args=(signal.SIGINT,))
    plain.start()
    for process in (shielded, plain):
        process.join(timeout=60)
    assert shielded.exitcode == 0
    assert plain.exitcode != 0  # KeyboardInterrupt: the test can tell the difference


def test_the_orphan_watchdog_ends_a_process_inside_a_long_torch_op(tmp_path):
    """The parent (a small script) starts a grandchild that sits in one long matrix product; killing the
    parent ends the grandchild within about a second, though its main thread never returns to Python."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "code = ('import os, torch; from horde_worker.inference.process_guard import install_orphan_watchdog; '\n"
        "        'install_orphan_watchdog(os.getppid(), grace=0.2); torch.set_num_threads(1); '\n"
        "        'a = torch.ones(6000, 6000); print(\"ready\", flush=True); a @ a @ a @ a')\n"
        "child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline().strip() == 'ready'\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])})
    grandchild = None
    try:
        grandchild = int(read_line(parent, 120))
        time.sleep(0.5)  # well inside the product now
        assert not gone(grandchild)
        parent.kill()
        assert wait_gone(grandchild, 5) < 2.0
    finally:
        parent.kill()
        if grandchild and not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def read_line(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output from the parent script within {timeout}s (exit code {process.poll()})"
    line = process.stdout.readline()
    assert line, f"the parent script ended (exit code {process.wait(10)})"
    return line


# The supervisor's part, small: start a child the way the supervisor does, send it Ctrl+C's (SIGINT to
# the whole foreground group, itself included) while it starts and while it works, then hand its pipe to
# a process outside the group so that only the watchdog can tell the child its parent is gone.
PARENT_SCRIPT = r'''
import json, multiprocessing as mp, os, signal, subprocess, sys, time

import numpy as np


def main():
    args = json.loads(sys.argv[1])
    sigints = []
    signal.signal(signal.SIGINT, lambda *_: sigints.append(1))
    from horde_worker.inference.process_guard import sigint_ignored

    context = mp.get_context("spawn")
    conn, child = context.Pipe()
    if args["kind"] == "slot":
        from horde_worker.inference.messages import GenerateRequest, Progress, SlotSpec
        from horde_worker.inference.runner import slot_main

        process = context.Process(target=slot_main, args=(child, SlotSpec(0, "cpu", args["log_dir"])), daemon=True)
    else:
        from horde_worker.safety.messages import SafetyCheck
        from horde_worker.safety.process import safety_main

        process = context.Process(target=safety_main, args=(child, args["weights"], "cpu", args["log_dir"]),
                                  daemon=True)
    with sigint_ignored():
        process.start()
    child.close()
    ctrl_c = lambda: os.killpg(0, signal.SIGINT)
    ctrl_c()  # the child is still starting Python
    report = {"child": process.pid, "ready": type(conn.recv()).__name__}
    if args["kind"] == "slot":
        def job(job_id, **extra):
            fields = dict(job_id=job_id, model_name="m", model_path=args["model"], baseline="stable_diffusion_1",
                          prompt="a cat", negative_prompt="", width=128, height=128, steps=6, cfg_scale=7.0,
                          sampler_name="k_euler", karras=False, seeds=[7])
            return GenerateRequest(**{**fields, **extra})

        conn.send(job("short"))
        while isinstance(message := conn.recv(), Progress):
            if message.step == 1:
                ctrl_c()  # while it samples
        report["short"] = type(message).__name__
        conn.send(job("long", width=256, height=256, steps=200))
        while not isinstance(conn.recv(), Progress):
            pass
    else:
        ctrl_c()
        conn.send(SafetyCheck("s", [np.zeros((32, 32, 3), np.uint8)], "x"))
        report["check"] = type(conn.recv()).__name__
    holder = subprocess.Popen(["sleep", "300"], pass_fds=[conn.fileno()], start_new_session=True)
    report.update(holder=holder.pid, sigints=len(sigints))
    print(json.dumps(report), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
'''


def run_parent(tmp_path: Path, **args) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "supervisor.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]]),
           "HORDE_WORKER_CPU_THREADS": "2"}
    parent = subprocess.Popen([sys.executable, str(script), json.dumps({"log_dir": str(tmp_path / "logs"), **args})],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return parent, json.loads(read_line(parent, 240))


def orphaned(parent: subprocess.Popen, report: dict) -> float:
    """Kill the parent (nothing else: the child's pipe stays open in the holder) and time the child's exit."""
    try:
        assert not gone(report["child"])
        parent.kill()
        return wait_gone(report["child"], 5)
    finally:
        for pid in (report["holder"], report["child"]):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_inference_process_survives_ctrl_c_and_dies_with_its_supervisor(tmp_path, model):
    parent, report = run_parent(tmp_path, kind="slot", model=str(model))
    try:
        assert report["ready"] == "SlotReady" and report["short"] == "GenerateResult"
        assert report["sigints"] == 2  # the Ctrl+C's really went out (the parent got them too)
        assert orphaned(parent, report) < 2.0  # mid-step of the 200-step job
    finally:
        parent.kill()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from horde_worker.safety.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.safetensors", ["landscape", "mountain"])


def test_safety_process_survives_ctrl_c_and_dies_with_its_supervisor(tmp_path, clip):
    parent, report = run_parent(tmp_path, kind="safety", weights=str(clip))
    try:
        assert report["ready"] == "SafetyReady" and report["check"] == "SafetyVerdicts"
        assert report["sigints"] == 2
        assert orphaned(parent, report) < 2.0
    finally:
        parent.kill()


def test_safety_process_ignores_sigint_by_itself(tmp_path, clip):
    from horde_worker.safety.messages import SafetyCheck, SafetyReady, SafetyVerdicts
    from horde_worker.safety.process import safety_main

    context = mp.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=safety_main, args=(child, str(clip), "cpu", str(tmp_path / "logs")), daemon=True)
    process.start()
    child.close()
    try:
        assert conn.poll(180) and isinstance(conn.recv(), SafetyReady)
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.2)
        conn.send(SafetyCheck("s", [np.zeros((32, 32, 3), np.uint8)], "x"))
        assert conn.poll(60) and isinstance(conn.recv(), SafetyVerdicts)
        assert process.is_alive()
    finally:
        conn.send(None)
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
