"""What the inference processes tell the supervisor, and what it does about it: a slot is ready, a
preload ended, a step was taken, a job sampled, finished or failed, or a process died.

Called on the supervisor's loop (the slot pool's reader threads hand every message over to it).
Whatever a handler raises ends in the job's fault, never in the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loguru import logger

from horde_worker.inference.messages import (
    GenerateFailed,
    GenerateResult,
    Preloaded,
    Progress,
    SamplingDone,
    SlotReady,
)
from horde_worker.supervisor import jobspec
from horde_worker.supervisor.job import JobState
from horde_worker.supervisor.slots import Slot

if TYPE_CHECKING:
    from horde_worker.supervisor.loop import Supervisor


class SlotEvents:
    """The supervisor's handlers for slot messages and deaths."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def on_message(self, slot: Slot, message: object) -> None:
        """Act on one message of a slot's process."""
        try:
            self._handle_message(slot, message)
        except Exception as exc:
            logger.opt(exception=exc).error("message {} from slot {} could not be handled", type(message).__name__,
                                            slot.spec.slot)
            job = self.sup.jobs.get(getattr(message, "job_id", ""))
            if job is not None:
                self.sup.fault(job, f"{type(exc).__name__}: {exc}")
        self.sup.poke()

    def _handle_message(self, slot: Slot, message: object) -> None:
        if isinstance(message, SlotReady):
            slot.ready = True
            logger.info("inference slot {} ready on {}", slot.spec.slot, message.device_name)
        elif isinstance(message, Preloaded):
            slot.preloading.pop(message.model_name, None)
            slot.resident = list(message.resident_models)
            if message.error:
                logger.warning("preloading {} failed: {}", message.model_name, message.error)
            elif message.seconds > 0:
                logger.info("model {} preloaded in {:.2f}s while the slot worked", message.model_name,
                            message.seconds)
        elif isinstance(message, Progress):
            job = self.sup.jobs.get(message.job_id)
            if job is not None and job.state is JobState.RUNNING:
                job.progress = (message.step, message.total)
                job.last_progress_at = time.time()
                if job.first_step is None and message.step >= 1:
                    job.first_step = (job.last_progress_at, message.step)
        elif isinstance(message, SamplingDone):
            slot.release(message.job_id)
            slot.resident = list(message.resident_models)
            job = self.sup.jobs.get(message.job_id)
            if job is not None and job.state is JobState.RUNNING:
                job.advance(JobState.POSTPROCESSING)
                logger.info("job {} sampled in {:.2f}s; post-processing it while the slot takes the next job",
                            job.id, message.sample_seconds)
        elif isinstance(message, GenerateResult | GenerateFailed):
            self._on_job_done(slot, message)

    def _on_job_done(self, slot: Slot, message: GenerateResult | GenerateFailed) -> None:
        slot.release(message.job_id)
        slot.failures_in_row = 0  # the process answers jobs: whatever killed it before is behind it
        slot.resident = list(message.resident_models)
        job = self.sup.jobs.get(message.job_id)
        if job is None or job.state not in (JobState.RUNNING, JobState.POSTPROCESSING):
            return
        if isinstance(message, GenerateFailed):
            self.sup.fault(job, message.reason)
            return
        if message.engine:
            self.sup.stats.engines[slot.spec.slot] = dict(message.engine)
        self.sup.stats.fits[slot.spec.slot] = message.fit
        job.images = list(message.images)
        job.gen_metadata.extend(jobspec.notes_metadata(message.notes))
        for kind, value, ref in message.notes:
            logger.info("job {}: {} {}{}", job.id, kind, value, f" ({ref})" if ref else "")
        job.advance(JobState.GENERATED)
        self.sup.stats.job_generated(job.megapixelsteps, message.load_seconds + message.sample_seconds)
        if message.postprocess_seconds:
            self.sup.stats.postprocessed(message.postprocess_seconds)
        if request_steps := job.pop.payload.ddim_steps:
            self.sup.stats.step_time(message.sample_seconds / request_steps)
        if message.load_source != "resident":
            self.sup.stats.model_switches += 1
            logger.info("model switch to {}: from {} in {:.2f}s", job.model, message.load_source,
                        message.load_seconds)
        extra = f" + {message.postprocess_seconds:.2f}s post-processing" if message.postprocess_seconds else ""
        if message.shared_with:
            extra += f" (its steps shared with {message.shared_with} other job(s))"
        logger.info("job {} generated in {:.2f}s{}", job.id, message.sample_seconds, extra)
        self.sup.finish(job)

    def on_death(self, slot: Slot, exit_code: int | None) -> None:
        """A slot's process died: plan its restart (or give the slot up) and re-run or fault its jobs."""
        try:
            self._handle_death(slot, exit_code)
        except Exception as exc:
            logger.opt(exception=exc).error("the death of slot {} could not be handled", slot.spec.slot)
        self.sup.poke()

    def _handle_death(self, slot: Slot, exit_code: int | None) -> None:
        # The job it was sampling and any it was post-processing beside it.
        lost = [job for job in self.sup.jobs.values()
                if job.slot == slot.spec.slot and job.state in (JobState.RUNNING, JobState.POSTPROCESSING)]
        on_purpose = slot.killed_on_purpose
        delay = self.sup.pool.record_death(slot, counts=not on_purpose)
        if delay is None:
            logger.error("inference slot {} on {} is unusable: {}. The worker goes on with the slots that work.",
                         slot.spec.slot, slot.spec.device, slot.unusable)
            self._check_slots_left()
        elif not on_purpose:
            logger.error("inference slot {} died (exit code {}); starting a new one{}", slot.spec.slot, exit_code,
                         f" in {delay:.0f}s" if delay else "")
        any_usable = bool(self.sup.pool.working())
        for job in lost:
            spent = time.time() - (job.started_at or job.popped_at)
            if any_usable and job.attempts < 2 and time.time() + spent * 1.5 + self.sup.timekeeper.margin < job.deadline:
                logger.warning("job {} runs again on a new process", job.id)
                self.sup.scheduler.add(job, front=True)
            else:
                self.sup.fault(job, f"inference process died (exit code {exit_code})")

    def _check_slots_left(self) -> None:
        unusable = [slot for slot in self.sup.pool.slots if not slot.usable]
        if len(unusable) == len(self.sup.pool.slots):
            self.sup.fatal = "no inference slot works: " + "; ".join(
                f"slot {slot.spec.slot} on {slot.spec.device}: {slot.unusable}" for slot in unusable)
            logger.error("{}. Stopping.", self.sup.fatal)
            self.sup.request_stop()
        elif self.sup.settings.exit_on_unhandled_faults:
            self.sup.fatal = f"slot {unusable[-1].spec.slot} on {unusable[-1].spec.device} is unusable " \
                         f"({unusable[-1].unusable}) and exit_on_unhandled_faults is set"
            logger.error("{}. Stopping.", self.sup.fatal)
            self.sup.request_stop()
