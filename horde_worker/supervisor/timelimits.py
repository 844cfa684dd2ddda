"""Time limits: no job outlives its TTL, and no slot is held by work nobody will get.

Every tick of the supervisor sweeps the jobs in hand:
- a waiting job that can no longer run and be submitted before its TTL (at the speed measured so
  far) is faulted now, so the horde hands it to someone faster at once;
- a running job whose next step does not come in time (60 s, or 20 times its own average step), or
  that cannot finish before its TTL at its measured speed, is asked to stop (the inference process
  interrupts the sampling at the next step) and faulted; a process that does not answer the stop
  in `STOP_GRACE` seconds is killed and replaced;
- a job post-processing beside the next one is faulted when its TTL is nearly over.
Jobs being delivered are left to delivery, which knows when a submit is still worth making.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loguru import logger

from horde_worker.inference.messages import CancelJob
from horde_worker.supervisor.job import Job, JobState

if TYPE_CHECKING:
    from horde_worker.supervisor.loop import Supervisor
    from horde_worker.supervisor.slots import Slot

# Seconds kept in hand before a job's TTL for the safety check, encoding, upload and submit.
SUBMIT_MARGIN = 10.0
# A process that has not answered a stop after this long is killed.
STOP_GRACE = 10.0
# A step may take this much longer than the job's own average step before the job counts as stalled.
STALL_FACTOR = 20.0
STALL_MINIMUM = 60.0

WAITING = (JobState.POPPED, JobState.INPUTS_READY, JobState.QUEUED)


class TimeKeeper:
    """Applies the time limits of one supervisor's jobs."""

    def __init__(self, supervisor: Supervisor, margin: float = SUBMIT_MARGIN, stop_grace: float = STOP_GRACE) -> None:
        self.sup = supervisor
        self.margin = margin
        self.stop_grace = stop_grace

    def seconds_per_megapixelstep(self) -> float:
        """Measured inference speed of this session (0 until a job has been generated)."""
        stats = self.sup.stats
        return stats.inference_seconds / stats.megapixelsteps if stats.megapixelsteps > 0 else 0.0

    def sweep(self, now: float | None = None) -> None:
        """Fault, stop or kill whatever would otherwise outlive its time limit."""
        now = time.time() if now is None else now
        sup = self.sup
        any_usable = sup.pool is not None and bool(sup.pool.working())
        for job in list(sup.jobs.values()):
            if job.state in WAITING:
                self._check_waiting(job, now, any_usable)
            elif job.state is JobState.RUNNING:
                why = self.why_stop(job, now)
                if why is not None:
                    self.stop_running(job, why)
            elif job.state is JobState.POSTPROCESSING and job.deadline - now < self.margin:
                sup.fault(job, "post-processing did not end before the job's time limit")
        if sup.pool is not None:
            for slot in sup.pool.slots:
                self._check_stop_answered(slot, now)

    def _check_waiting(self, job: Job, now: float, any_usable: bool) -> None:
        if not any_usable and job.state is JobState.QUEUED:
            self.sup.fault(job, "no inference slot of this worker works")
            return
        expected = job.megapixelsteps * self.seconds_per_megapixelstep()
        if job.deadline - now < self.margin + expected:
            self.sup.fault(job, f"it could not start in time to finish before its time limit ({job.ttl:.0f}s)")

    def why_stop(self, job: Job, now: float) -> str | None:
        """Why a running job should be stopped now, or None."""
        if job.deadline - now < self.margin:
            return f"its time limit ({job.ttl:.0f}s) is nearly over"
        step, total = job.progress
        if job.first_step is None or step - job.first_step[1] < 1 or not total:
            return None
        first_at, first_step = job.first_step
        last_at = job.last_progress_at or first_at
        per_step = (last_at - first_at) / (step - first_step)
        if last_at + (total - step) * per_step > job.deadline - self.margin:
            return f"at {per_step:.2f}s per step it cannot finish {total} steps before its time limit"
        stall = max(STALL_MINIMUM, STALL_FACTOR * per_step)
        # After the last step come decoding and post-processing, which report no steps: only the TTL applies.
        if step < total and now - last_at > stall:
            return f"no sampling step for {now - last_at:.0f}s"
        return None

    def stop_running(self, job: Job, why: str) -> None:
        """Ask the job's process to stop it, and fault it now so its ids are answered in time."""
        sup = self.sup
        slot = sup.slot_of(job)
        logger.warning("job {}: stopping it: {}", job.id, why)
        if slot is not None and job.id not in slot.stops:
            slot.stops[job.id] = time.time()
            sup.pool.send(slot, CancelJob(job.id, why))
        sup.fault(job, f"stopped: {why}")

    def _check_stop_answered(self, slot: Slot, now: float) -> None:
        late = [job_id for job_id, asked in slot.stops.items()
                if job_id in slot.job_ids and now - asked > self.stop_grace]
        if late and slot.process is not None and slot.process.is_alive():
            logger.error("inference slot {} did not stop job {} within {:.0f}s; killing its process",
                         slot.spec.slot, late[0], self.stop_grace)
            slot.killed_on_purpose = True
            self.sup.pool.kill(slot)
