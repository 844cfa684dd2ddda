"""Fault soak: the whole worker, as real processes, serving hundreds of jobs through the fault proxy.

While requests keep arriving, the proxy injects faults on every endpoint and spoils a share of the
jobs; the inference and safety processes are killed several times, the main process once (and started
again in the same folder: its journal resubmits what was finished), and at the end Ctrl+C goes to the
whole process group. Everything is then judged from the proxy's own log (see docs/reliability.md).

`HORDE_SOAK_JOBS` sets how many jobs the run serves (default 120, about two and a half minutes on 2 cores;
2000 for a long run); `HORDE_SOAK_REPORT` names a file for the run's figures as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from horde_worker.inference.tiny import DEMO_MODEL_NAME
from horde_worker.localhorde import LocalHorde, RateLimit, ServerOptions
from horde_worker.localhorde.civitai import LocalCivitai
from tests import soak_support as soak
from tests.faultproxy import FaultProxy, Faults, ProxyPlan

SEED = 1105
JOBS = int(os.environ.get("HORDE_SOAK_JOBS", "120"))
TTL = 120  # seconds, every job (fixed_ttl): roomy for 2-4 steps at 128x128, tight enough to matter
MAX_GAP = 60.0  # the longest stretch without a submit, outside the restart of the main process
EXIT_WITHIN = 120.0  # after Ctrl+C
STARTUP_WITHIN = 180.0
FAULTED_SHARE = 0.1  # of unspoiled ids (kills and failed safety checks may fault a few)
LOST_JOBS_BOUND = 3  # jobs the killed main process may lose: in hand, not finished (slot + queue + one popping)
RSS_GROWTH = (1.5, 300 << 20)  # last-quarter median <= first * 1.5 + 300 MiB

ALL_KINDS = ("500", "502", "503", "429", "reset", "reset_after", "slow", "truncate_long", "truncate_short")
PLAN = ProxyPlan(
    faults={
        "pop": Faults(0.10, ALL_KINDS),
        "submit": Faults(0.20, ALL_KINDS),
        "upload": Faults(0.20, ("500", "502", "503", "429", "reset", "reset_after", "slow")),
        "download": Faults(0.20, ("500", "503", "429", "reset", "slow", "truncate_long", "truncate_short")),
        "other": Faults(0.15, ("500", "502", "503", "429", "reset", "reset_after", "slow", "truncate_short")),
    },
    malformed_rate=0.12,
)
# Child kills in every block of 200 jobs (as a share of the block), the main process once at 45 % of the run.
CHILD_KILLS = ((0.15, "inference"), (0.30, "safety"), (0.60, "inference"), (0.75, "safety"), (0.85, "inference"))


def schedule(jobs: int) -> list[tuple[float, str]]:
    """When each disturbance happens, as a share of `jobs` answered."""
    blocks = max(1, jobs // 200)
    points = [((block + share) / blocks, kind) for block in range(blocks) for share, kind in CHILD_KILLS]
    return sorted([*points, (0.45, "main")])


class Soak:
    """One soak run: the local horde, the proxy, the worker processes, and what was seen on the way."""

    def __init__(self, tmp_path: Path, start_group_worker) -> None:
        self.tmp_path = tmp_path
        limits = {"pop": RateLimit(60, 1.0), "submit": RateLimit(60, 1.0), "*": RateLimit(100_000, 60.0),
                  "r2": RateLimit(10_000, 1.0)}
        self.horde = LocalHorde([DEMO_MODEL_NAME], options=ServerOptions(sweep_interval=2.0, rate_limits=limits),
                                fixed_ttl=TTL).start()
        self.proxy = FaultProxy(self.horde.root_url, seed=SEED, plan=PLAN, workdir=tmp_path / "proxy").start()
        self.civitai = LocalCivitai().start()  # LoRA/TI look-ups stay on loopback and find nothing
        self.poster = soak.RequestPoster(self.horde, seed=SEED).start()
        self._start = start_group_worker
        self.workers: list = []
        self.problems: list[str] = []
        self.events: list[tuple[float, str]] = []
        self.rss: list[tuple[float, int]] = []
        self.restart_window: tuple[float, float] | None = None
        self.journaled_at_kill: set[str] = set()
        self.journal = tmp_path / "cache" / "journal" / "test-worker"
        self.started = time.time()

    @property
    def worker(self):
        return self.workers[-1]

    def start_worker(self):
        worker = self._start(self.proxy.url, self.horde.api_key, env=self.proxy.proxy_env(),
                             civitai_api_url=self.civitai.url, allow_lora=False, allow_img2img=True,
                             remove_maintenance_on_init=True)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        self.poster.stop()
        for worker in self.workers:
            worker.stop()
        self.proxy.stop()
        self.civitai.stop()
        self.horde.stop()

    def answered(self) -> int:
        return sum(1 for r in self.proxy.log.delivered() if r.answer is not None and r.id == r.job)

    def crashed(self) -> bool:
        """True (and noted) when the worker exited without being asked to."""
        code = self.worker.process.poll()
        if code is not None:
            self.problems.append(f"the worker exited on its own with code {code}: "
                                 f"{self.worker.output()[-1500:]}")
        return code is not None

    # --- disturbances ----------------------------------------------------------------------

    def kill_child(self, kind: str) -> bool:
        output, main = self.worker.output(), self.worker.process.pid
        if kind == "safety":
            pid = soak.safety_pid(output, main)
            victims = [pid] if pid else []
        else:
            victims = [p.pid for p in soak.inference_processes(output, main)]
        if len(victims) != 1:
            return False  # not identifiable right now (being replaced): try again next tick
        os.kill(victims[0], signal.SIGKILL)
        self.events.append((time.time(), f"SIGKILL {kind} process {victims[0]}"))
        return True

    def kill_main(self) -> bool:
        old = self.worker
        # Killed while the journal holds a finished job, when it can: its restart must then resubmit it.
        soak.wait_until(lambda: soak.journal_ids(self.journal), 30, interval=0.05)
        old_children = soak.children(old.process.pid)
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(timeout=30)
        killed_at = time.time()
        self.events.append((killed_at, f"SIGKILL main process {old.process.pid}"))
        # Its children should notice the broken pipe and go; any left after 30 s are orphans.
        soak.wait_until(lambda: not [c for c in old_children if soak.alive(c)], 30)
        orphans = [c.pid for c in old_children if soak.alive(c)]
        if orphans:
            self.problems.append(f"processes of the killed main process still alive 30 s later: {orphans}")
        old.kill_group()
        self.journaled_at_kill = soak.journal_ids(self.journal)
        epoch = self.proxy.log.new_epoch()
        self.start_worker()
        first_pop = soak.wait_until(lambda: any(e == epoch for _, e, _ in self.proxy.log.pops), STARTUP_WITHIN)
        self.restart_window = (killed_at, time.time())
        if not first_pop:
            self.problems.append(f"the restarted worker did not pop within {STARTUP_WITHIN:.0f}s")
            return False
        self.events.append((time.time(), f"restarted, {len(self.journaled_at_kill)} id(s) in the journal"))
        return True

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve JOBS jobs with the disturbances of `schedule`; a crash, a hang or the deadline ends it early,
        noted in `problems`, so that everything seen so far is still judged."""
        worker = self.start_worker()
        ready = soak.wait_until(lambda: self.proxy.log.pops or worker.process.poll() is not None, STARTUP_WITHIN)
        assert ready and worker.process.poll() is None, f"the worker did not start popping\n{worker.output()[-4000:]}"
        deadline = time.monotonic() + 120 + JOBS * 3.0
        pending = schedule(JOBS)
        last_sample = 0.0
        while (done := self.answered()) < JOBS:
            if time.monotonic() > deadline:
                self.problems.append(f"only {done} of {JOBS} jobs answered before the deadline")
                return
            if self.crashed():
                return
            if time.time() - last_sample >= 2.0:
                last_sample = time.time()
                rss = soak.tree_rss(self.worker.process.pid)
                if rss and self.proxy.log.submit_times():
                    self.rss.append((last_sample, rss))
            times = self.proxy.log.submit_times()
            quiet_since = max([times[-1] if times else self.started, *(w[1] for w in [self.restart_window] if w)])
            if time.time() - quiet_since > MAX_GAP * 2:
                self.problems.append(f"no submit for {time.time() - quiet_since:.0f}s: the worker hangs")
                return
            if pending and done >= pending[0][0] * JOBS:
                kind = pending[0][1]
                if kind == "main":
                    if not self.kill_main():
                        return
                    pending.pop(0)
                elif self.kill_child(kind):
                    pending.pop(0)
            time.sleep(1.0)

    def interrupt(self) -> int | None:
        """Ctrl+C to the whole group; the exit code, or None if it is still running after EXIT_WITHIN."""
        self.interrupted_at = time.time()
        if self.worker.process.poll() is not None:
            return self.worker.process.returncode
        self.events.append((self.interrupted_at, "SIGINT to the process group"))
        self.worker.interrupt_group()
        try:
            return self.worker.wait(timeout=EXIT_WITHIN)
        except Exception:  # noqa: BLE001  (a hang: reported, then killed in teardown)
            return None


@pytest.fixture
def soak_run(tmp_path, start_group_worker):
    run = Soak(tmp_path, start_group_worker)
    try:
        yield run
    finally:
        run.stop()


def test_worker_survives_faults_kills_and_ctrl_c(soak_run):
    run = soak_run
    run.run()
    code = run.interrupt()
    finished = time.time()
    log = run.proxy.log
    problems = run.problems
    if code != 0 and not any("exited on its own" in p for p in problems):
        problems.append(f"Ctrl+C to the group: exit code {code} (None: still running after {EXIT_WITHIN:.0f}s)")

    killed_epoch_lost = [r for r in log.unanswered() if r.epoch == 0 and r.id not in run.journaled_at_kill]
    lost_jobs = {r.job for r in killed_epoch_lost}
    lost_ids = {r.id for r in killed_epoch_lost}
    unanswered = [r for r in log.unanswered() if r.id not in lost_ids]
    if unanswered:
        problems.append(f"{len(unanswered)} id(s) never answered: " + _describe(unanswered))
    if len(lost_jobs) > LOST_JOBS_BOUND:
        problems.append(f"{len(lost_jobs)} jobs lost with the killed main process (bound {LOST_JOBS_BOUND})")
    if twice := log.accepted_twice():
        problems.append(f"{len(twice)} id(s) accepted twice: " + _describe(twice))
    if late := log.answered_late(slack=2.0):
        problems.append(f"{len(late)} id(s) answered after their TTL: "
                        + ", ".join(f"{r.id} (+{past:.0f}s)" for r, past in late[:8]))
    counters = run.horde.state.counters()
    explained = log.answers_lost_after_forwarding() + len(run.journaled_at_kill)
    if counters["duplicate_submits"] > explained:
        problems.append(f"{counters['duplicate_submits']} duplicate submits, only {explained} explained by lost "
                        f"answers and journal resubmits")
    if bare := log.faulted_without_reason():
        problems.append(f"{len(bare)} faulted submit(s) without a gen_metadata reason: "
                        + _describe([r for r, _ in bare]))
    if wrong := log.malformed_mishandled():
        problems.append(f"{len(wrong)} spoiled job id(s) answered wrongly: "
                        + "; ".join(f"{r.id} [{r.malformed}] {why}" for r, why in wrong[:10]))
    if log.submits_unknown:
        problems.append(f"submits for ids never popped: {log.submits_unknown[:5]}")
    if log.non_loopback:
        problems.append(f"the worker asked for non-loopback hosts: {log.non_loopback[:5]}")
    gap = soak.largest_gap(log.submit_times(), log.pops[0][0], run.interrupted_at,
                           [run.restart_window] if run.restart_window else [])
    if gap > MAX_GAP:
        problems.append(f"{gap:.0f}s without a submit (outside the restart)")
    accepted_images = [s.at for r in log.snapshot() for s in r.submits if s.accepted and s.state in (None, "ok")]
    for at, what in run.events:
        if what.startswith("SIGKILL") and not any(t > at for t in accepted_images):
            problems.append(f"no image accepted after {what}")
    plain = [r for r in log.delivered() if r.malformed is None and r.answer is not None]
    plain_faulted = [r for r in plain if r.answer.state == "faulted"]
    if len(plain_faulted) > max(5, len(plain) * FAULTED_SHARE):
        problems.append(f"{len(plain_faulted)} of {len(plain)} unspoiled ids were faulted: "
                        + "; ".join(f"{r.id}: {r.answer.gen_metadata}" for r in plain_faulted[:5]))
    late_pops = [t for t, _, _ in log.pops if t > run.interrupted_at + 3]
    if late_pops:
        problems.append(f"{len(late_pops)} pop(s) more than 3 s after Ctrl+C")
    first, last = soak.quarter_medians(run.rss)
    if last > first * RSS_GROWTH[0] + RSS_GROWTH[1]:
        problems.append(f"memory grew: median RSS {first / 2**20:.0f} MiB in the first quarter, "
                        f"{last / 2**20:.0f} MiB in the last")
    if leaks := soak.files_holding(run.tmp_path, run.horde.api_key):
        problems.append(f"the API key is written in {leaks}")
    if traversal := [str(p) for p in run.tmp_path.rglob("passwd")]:
        problems.append(f"a path-traversal name became a file: {traversal}")
    if JOBS >= 100:  # the run must really have exercised what it claims to
        missing = {"pop", "submit", "upload", "download"} - {k.split(":")[0] for k in log.faults}
        if missing or not log.malformed_counts() or not run.journaled_at_kill:
            problems.append(f"the run did not exercise faults on {sorted(missing)}, spoiled jobs "
                            f"({len(log.malformed_counts())} kinds) or the journal ({len(run.journaled_at_kill)} ids)")

    held, held_at = log.most_in_hand()
    summary = {**log.summary(), "duration_s": round(finished - run.started), "jobs_target": JOBS,
               "most_jobs_in_hand": [held, round(held_at - run.started)],
               "lost_with_killed_main": {"jobs": len(lost_jobs), "ids": len(killed_epoch_lost)},
               "journaled_at_kill": len(run.journaled_at_kill), "exit_code": code,
               "upstream": {k: counters[k] for k in ("submits_received", "duplicate_submits")},
               "requests_posted": len(run.poster.posted), "maintenance_cleared": run.poster.maintenance_seen,
               "longest_gap_s": round(gap, 1),
               "rss_mib_first_last_quarter": [round(first / 2**20), round(last / 2**20)],
               "events": [(round(t - run.started), what) for t, what in run.events], "problems": problems}
    log.dump(run.tmp_path / "proxy-log.json")
    if os.environ.get("HORDE_SOAK_REPORT"):
        Path(os.environ["HORDE_SOAK_REPORT"]).write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    assert not problems, "\n".join(problems) + "\n--- worker output (tail) ---\n" + run.worker.output()[-3000:]


def _describe(records) -> str:
    parts = []
    for r in records[:8]:
        parts.append(f"{r.id} (epoch {r.epoch}, malformed {r.malformed}, {len(r.submits)} submit(s): "
                     f"{[(s.state, s.fault, s.upstream_status, s.upstream_rc) for s in r.submits]})")
    return "; ".join(parts) + (" ..." if len(records) > 8 else "")


def test_fault_proxy_forwards_rewrites_spoils_and_refuses(tmp_path):
    """The proxy itself: URLs rewritten to it, faults as planned, spoiled jobs keep their ids, other hosts refused."""
    horde = LocalHorde([DEMO_MODEL_NAME], fixed_ttl=60).start()
    proxy = FaultProxy(horde.root_url, seed=3, plan=ProxyPlan(malformed_rate=1.0, malformations=("huge_width",)),
                       workdir=tmp_path).start()
    try:
        key = {"apikey": horde.api_key}
        requests.post(f"{horde.url}/v2/generate/async", headers=key, timeout=10,
                      json={"prompt": "a cat", "params": {"n": 2, "width": 64, "height": 64, "steps": 2}})
        pop = requests.post(f"{proxy.url}/v2/generate/pop", headers=key, timeout=10,
                            json={"name": "w", "models": [DEMO_MODEL_NAME], "amount": 4}).json()
        assert len(pop["ids"]) == 2 and pop["payload"]["width"] == 100_000
        assert all(url.startswith(proxy.root_url + "/r2/") for url in pop["r2_uploads"])
        assert requests.put(pop["r2_uploads"][0], data=b"x", timeout=10).status_code == 200
        assert horde.state.blobs[f"gen/{pop['ids'][0]}.webp"] == b"x"
        proxy.set_plan(ProxyPlan(faults={"submit": Faults(1.0, ("reset_after",))}))
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{proxy.url}/v2/generate/submit", headers=key, timeout=10,
                          json={"id": pop["ids"][0], "generation": "R2", "seed": 1, "state": "faulted"})
        record = next(r for r in proxy.log.snapshot() if r.id == pop["ids"][0])
        assert record.malformed == "huge_width" and record.answer and record.answer.accepted
        assert horde.state.generations[pop["ids"][0]].state == "faulted"  # it took effect upstream
        assert log_faults(proxy) == {"pop:malformed:huge_width": 1, "submit:reset_after": 1}
        proxy.set_plan(ProxyPlan(faults={"other": Faults(1.0, ("truncate_long",))}))
        with pytest.raises(requests.RequestException):
            requests.get(f"{proxy.url}/v2/status/heartbeat", timeout=10).json()
        answer = requests.get("http://169.254.169.254/latest/", proxies={"http": proxy.root_url}, timeout=10)
        assert answer.status_code == 403 and proxy.log.non_loopback[0][2] == "http://169.254.169.254/latest/"
        assert [r.id for r in proxy.log.unanswered()] == [pop["ids"][1]]
    finally:
        proxy.stop()
        horde.stop()


def log_faults(proxy: FaultProxy) -> dict[str, int]:
    return dict(proxy.log.faults)
