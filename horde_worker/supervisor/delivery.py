"""Delivering a job's results: safety check, encode, upload, submit, and never losing an image.

    GENERATED --safety check--> CHECKED (each image kept, or replaced by its censor image)
              --check failed--> FAULTED (no image leaves unchecked)
    CHECKED -> ENCODED (journaled) -> UPLOADED -> SUBMITTED

The journal is a safety net, not a step: when it cannot be written (disk full, read-only) the
images still go out, by upload or inside the submit. A faulted job whose TTL is over is not
submitted: the horde has already given it to someone else.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from loguru import logger

from horde_worker.horde.client import HordeError, HordeUnreachable, RetryPolicy, SubmitOutcome
from horde_worker.safety.censor import decide
from horde_worker.supervisor import jobspec
from horde_worker.supervisor.job import Job, JobState
from horde_worker.supervisor.journal import JournalUnavailable
from horde_worker.supervisor.safety_client import SafetyUnavailable

if TYPE_CHECKING:
    from horde_worker.supervisor.loop import Supervisor

# The horde flags a worker whose job goes from pop to submit faster than this.
SUSPICIOUS_MPS = 20.0
# While stopping, how long a submit that keeps failing is tried before the job is left in the journal.
STOPPING_PATIENCE = 60.0


class Delivery:
    """The results half of the supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    async def _check(self, job: Job) -> None:
        """Run the safety check; censor what must be; fault the job if the check cannot be made."""
        payload, settings = job.pop.payload, self.sup.settings
        try:
            if self.sup.safety is None:
                raise SafetyUnavailable("this worker has no safety checker")
            answer = await asyncio.get_running_loop().run_in_executor(
                self.sup.safety_executor, self.sup.safety.check, job.id, job.images, payload.prompt)
        except SafetyUnavailable as exc:
            logger.error("job {}: the safety check failed ({}); submitted as faulted, no unchecked image leaves",
                         job.id, exc)
            job.images = []
            job.advance(JobState.FAULTED, f"safety check failed: {exc}")
            return
        outcomes = [decide(verdict, image, worker_nsfw=settings.nsfw, use_nsfw_censor=payload.use_nsfw_censor,
                           censor_nsfw=settings.censor_nsfw, censorlist=settings.censorlist, prompt=payload.prompt)
                    for verdict, image in zip(answer.verdicts, job.images, strict=True)]
        job.images = [outcome.image for outcome in outcomes]
        job.image_states = [outcome.state for outcome in outcomes]
        job.image_metadata = [outcome.metadata for outcome in outcomes]
        for index, (outcome, verdict) in enumerate(zip(outcomes, answer.verdicts, strict=True)):
            kind = outcome.state.value if outcome.reason else "ok"
            self.sup.stats.safety_verdicts[kind] = self.sup.stats.safety_verdicts.get(kind, 0) + 1
            if outcome.reason:
                self.sup.stats.censored += 1
                concepts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(verdict.details.items())[:6])
                logger.warning("job {} image {} censored: {} (concepts: {})", job.id, index, outcome.reason,
                               concepts or "-")
        job.advance(JobState.CHECKED)

    async def _record(self, job: Job) -> None:
        """Journal the job; a journal that cannot be written is reported and the delivery goes on."""
        try:
            await asyncio.to_thread(self.sup.journal.record, job)
        except JournalUnavailable as exc:
            logger.warning("{}; the job is delivered without its journal entry", exc)

    async def finish(self, job: Job) -> None:
        """Encode, upload and submit a generated job, or submit a faulted one."""
        if job.state is JobState.GENERATED:
            await self._check(job)
        if job.state is JobState.CHECKED:
            job.webp = await asyncio.to_thread(lambda: [jobspec.encode_webp(img) for img in job.images])
            job.images = []
            job.uploaded = [False] * len(job.webp)
            job.advance(JobState.ENCODED)
            await self._record(job)
            await self._upload(job)
        elif job.state is JobState.ENCODED:  # resumed from the journal, or delivered again
            await self._upload(job)
        elif job.state is JobState.FAULTED:
            if time.time() > job.deadline:
                logger.warning("job {} faulted after its time limit; the horde has handed it out again ({})",
                               job.id, job.fault_reason)
                self.sup.stats.jobs_abandoned += 1
                job.advance(JobState.ABANDONED)
                self.sup.forget(job)
                return
            await self._record(job)
        await self._hold_for_pace(job)
        await self._submit(job)

    async def _upload(self, job: Job) -> None:
        urls = job.pop.r2_uploads or ([job.pop.r2_upload] if job.pop.r2_upload else [])
        for index, data in enumerate(job.webp):
            if job.uploaded[index] or index >= len(urls) or not urls[index]:
                continue
            try:
                await asyncio.to_thread(self.sup.client.upload, urls[index], data,
                                        RetryPolicy(attempts=5, base_delay=0.5, max_delay=15))
                job.uploaded[index] = True
            except HordeUnreachable as exc:
                self.sup.stats.upload_failures += 1
                logger.warning("upload for {} failed ({}); the image goes in the submit instead", job.ids[index], exc)
        await self._record(job)
        if job.state is JobState.ENCODED and all(job.uploaded):
            job.advance(JobState.UPLOADED)

    async def _hold_for_pace(self, job: Job) -> None:
        """Submitting faster than the horde believes possible gets a worker flagged; wait instead."""
        if job.fault_reason is not None:
            return
        p = job.pop.payload
        earliest = job.popped_at + (p.width * p.height * p.ddim_steps / 1e6) / SUSPICIOUS_MPS * 1.05
        delay = earliest - time.time()
        if delay > 0:
            logger.debug("job {} held {:.2f}s so that it does not look impossibly fast", job.id, delay)
            await asyncio.sleep(delay)

    async def _submit(self, job: Job) -> None:
        answered_ok, started = 0, time.monotonic()
        for index, job_id in enumerate(job.ids):
            if job_id in job.submitted_ids:
                continue
            body = jobspec.submit_body(job, index)
            attempt = 0
            while True:
                try:
                    outcome, reward = await asyncio.to_thread(
                        self.sup.client.submit, body, RetryPolicy(attempts=4, base_delay=0.5, max_delay=10))
                    break
                except HordeUnreachable as exc:
                    attempt += 1
                    self.sup.stats.submit_retries += 1
                    patience = min(self.sup.submit_patience, STOPPING_PATIENCE) if self.sup.stopping \
                        else self.sup.submit_patience
                    if time.monotonic() - started > patience:
                        kept = "kept on disk for the next start" if job.journaled else "it could not be kept on disk"
                        logger.error("submit of {} keeps failing ({}); {}", job_id, exc, kept)
                        self.sup.stats.jobs_abandoned += 1
                        job.advance(JobState.ABANDONED)
                        self.sup.forget(job, keep_journal=True)
                        return
                    await asyncio.sleep(min(60.0, 2**attempt * random.uniform(0.5, 1.0)))
                except HordeError as exc:
                    logger.error("submit of {} refused: {}", job_id, exc)
                    outcome, reward = SubmitOutcome.INVALID_ID, 0.0
                    break
            job.submitted_ids.add(job_id)
            if outcome in (SubmitOutcome.ACCEPTED, SubmitOutcome.DUPLICATE):
                answered_ok += 1
                job.reward += reward
                self.sup.stats.kudos += reward
            else:
                logger.warning("job {} was {} by the horde: it was not credited", job_id,
                               "aborted (too slow)" if outcome is SubmitOutcome.ABORTED else "unknown")
            await self._record(job)
        if job.fault_reason is not None:
            self.sup.stats.jobs_faulted += 1
            job.advance(JobState.SUBMITTED)
        elif answered_ok:
            self.sup.stats.jobs_done += 1
            self.sup.stats.images += answered_ok
            self.sup.stats.last_done_at = time.time()
            job.advance(JobState.SUBMITTED)
            logger.info("job {} submitted: {} image(s), {:.2f} kudos", job.id, answered_ok, job.reward)
        else:
            self.sup.stats.jobs_abandoned += 1
            job.advance(JobState.ABANDONED)
        self.sup.forget(job)
