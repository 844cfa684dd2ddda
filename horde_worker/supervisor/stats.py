"""Session figures: jobs, kudos, kudos per hour, megapixelsteps per second, busy share."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from horde_worker.models.reference import kudos_multiplier
from horde_worker.supervisor.job import Job, JobState

RECENT_JOBS = 50
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds per step, for /metrics
STEP_SAMPLES = 2000
MESSAGES = 20
HISTORY_POINTS = 720  # at one point per 10 s: the last two hours


@dataclass
class SessionStats:
    """Counters of this run of the worker."""

    started_at: float = field(default_factory=time.time)
    first_job_at: float | None = None
    jobs_done: int = 0
    jobs_faulted: int = 0
    jobs_abandoned: int = 0
    censored: int = 0
    postprocessed_jobs: int = 0
    postprocess_seconds: float = 0.0
    images: int = 0
    kudos: float = 0.0
    megapixelsteps: float = 0.0
    inference_seconds: float = 0.0
    last_done_at: float | None = None
    # Each inference slot's latest engine figures (busy seconds, peak device memory, compiled shapes).
    engines: dict[int, dict[str, float]] = field(default_factory=dict)
    # Each slot's latest memory plan when its card is smaller than the model and its job (inference/fit.py).
    fits: dict[int, str] = field(default_factory=dict)
    # For the dashboard and /metrics (ui/): the last jobs with their outcome, counters, per-step seconds, the
    # horde's messages, and the rates sampled over time.
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_JOBS))
    model_switches: int = 0
    upload_failures: int = 0
    submit_retries: int = 0
    safety_verdicts: dict[str, int] = field(default_factory=dict)  # "ok", or why an image was censored
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=STEP_SAMPLES))  # the last ones, for means
    # Every step time of the session, as Prometheus histogram counts (cumulative: they never go down).
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))
    step_count: int = 0
    step_sum: float = 0.0
    messages: deque = field(default_factory=lambda: deque(maxlen=MESSAGES))
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))

    def job_started(self) -> None:
        if self.first_job_at is None:
            self.first_job_at = time.time()

    def job_generated(self, megapixelsteps: float, seconds: float) -> None:
        self.megapixelsteps += megapixelsteps
        self.inference_seconds += seconds

    def postprocessed(self, seconds: float) -> None:
        self.postprocessed_jobs += 1
        self.postprocess_seconds += seconds

    def step_time(self, seconds: float) -> None:
        """One job's seconds per sampling step."""
        self.step_seconds.append(seconds)
        self.step_count += 1
        self.step_sum += seconds
        for index, bound in enumerate(STEP_BUCKETS):
            if seconds <= bound:
                self.step_buckets[index] += 1

    def finished(self, job: Job) -> None:
        """A job leaves the worker: recorded as done (or censored), faulted, abandoned or dropped."""
        outcome = ("abandoned" if job.state is JobState.ABANDONED else "faulted" if job.fault_reason
                   else "done" if job.state is JobState.SUBMITTED else "dropped")
        censored = sum(1 for state in job.image_states if state.value in ("censored", "csam"))
        self.recent.appendleft({
            "id": job.id, "model": job.model, "outcome": "censored" if outcome == "done" and censored else outcome,
            "reason": job.fault_reason or "", "images": len(job.ids), "censored": censored,
            "kudos": round(job.reward, 2), "finished_at": time.time(),
            "seconds": round(time.time() - job.popped_at, 1)})

    def message(self, kind: str, text: str, way_out: str = "") -> None:
        """A message from the horde (moderators, maintenance) with what the volunteer can do about it."""
        if not any(m["text"] == text for m in self.messages):
            self.messages.appendleft({"kind": kind, "text": text, "way_out": way_out, "at": time.time()})

    def sample_rates(self) -> None:
        """One point of the charts: the session's images/hour, megapixelsteps/s and kudos/hour so far."""
        self.history.append((time.time(), round(self.images_per_hour, 2), round(self.megapixelsteps_per_second, 4),
                             round(self.kudos_per_hour, 2)))

    @property
    def images_per_hour(self) -> float:
        hours = (time.time() - self.started_at) / 3600
        return self.images / hours if hours > 0 else 0.0

    @property
    def kudos_per_hour(self) -> float:
        hours = (time.time() - self.started_at) / 3600
        return self.kudos / hours if hours > 0 else 0.0

    @property
    def megapixelsteps_per_second(self) -> float:
        """Work done over the wall time since the first job started."""
        if self.first_job_at is None:
            return 0.0
        elapsed = time.time() - self.first_job_at
        return self.megapixelsteps / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        """One line for the end of a run."""
        return (f"summary: jobs={self.jobs_done} faulted={self.jobs_faulted} abandoned={self.jobs_abandoned} "
                f"images={self.images} megapixelsteps/s={self.megapixelsteps_per_second:.2f} "
                f"kudos={self.kudos:.2f}")


def status_line(jobs: list[Job], s: SessionStats, unusable: list[int] | None = None,
                baselines: Mapping[str, str] | None = None) -> str:
    """The live status line: jobs done, the queue, what runs now (with the horde's kudos multiplier of its
    baseline, from `baselines`: model name -> baseline), kudos and speed, and slots given up."""
    running = [j for j in jobs if j.state is JobState.RUNNING]
    current = ""
    if len(running) == 1:
        step, total = running[0].progress
        multiplier = kudos_multiplier((baselines or {}).get(running[0].model.lower(), ""),
                                      bool(running[0].pop.payload.hires_fix))
        paid = f" (kudos x{multiplier})" if multiplier > 1 else ""
        # No step yet: the model is being loaded or the prompt encoded (for how long so far).
        since = f" ({time.time() - running[0].started_at:.0f}s)" if running[0].started_at else ""
        current = f" | running {running[0].model}{paid} {step}/{total}" if total else \
            f" | loading {running[0].model}{paid}{since}"
    elif running:
        shown = [f"{j.progress[0]}/{j.progress[1]}" if j.progress[1] else "loading" for j in running[:4]]
        current = f" | running {len(running)} jobs (" + ", ".join(shown) + (", ..." if len(running) > 4 else "") + ")"
    post = sum(1 for j in jobs if j.state is JobState.POSTPROCESSING)
    if post:
        current += f" | post-processing {post}"
    queued = sum(1 for j in jobs if j.state in (JobState.POPPED, JobState.QUEUED, JobState.INPUTS_READY))
    done = f", {s.censored} censored" if s.censored else ""
    if s.postprocessed_jobs:
        done += f", {s.postprocessed_jobs} post-processed ({s.postprocess_seconds / s.postprocessed_jobs:.1f}s avg)"
    low = "; ".join(f"slot {slot}: {plan}" for slot, plan in sorted(s.fits.items()) if plan)
    if low:
        current += f" | low VRAM ({low})"
    broken = f" | UNUSABLE slot(s) {', '.join(map(str, unusable))}: see logs/trace.log" if unusable else ""
    return (f"jobs {s.jobs_done} done, {s.jobs_faulted} faulted{done} | queue {queued}{current} | "
            f"kudos {s.kudos:.1f} ({s.kudos_per_hour:.0f}/hr) | {s.megapixelsteps_per_second:.2f} MPS/s{broken}")
