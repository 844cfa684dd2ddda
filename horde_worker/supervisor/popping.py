"""Asking the horde for work, and surviving whatever it answers.

The pop loop never dies of an answer: refusals back off (or stop the worker when only the
owner can fix them), unreachable hordes are retried with jitter, and a job that cannot be read
is faulted by id with the reason so that the horde re-queues it at once.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

from loguru import logger

from horde_worker.horde.client import HordeError, HordeUnreachable, MalformedPop, RetryPolicy
from horde_worker.horde.wire import PopResponse
from horde_worker.supervisor.job import Job, JobState

if TYPE_CHECKING:
    from horde_worker.supervisor.loop import Supervisor

# Pop errors that no retry can fix: the owner must change something.
FATAL_POP_ERRORS = {
    "InvalidAPIKey": "the API key is not valid: check api_key in bridgeData.yaml",
    "AnonForbiddenWorker": "workers need a registered API key: set api_key in bridgeData.yaml",
    "WrongCredentials": "this dreamer_name belongs to another user: choose another dreamer_name",
    "ProfaneWorkerName": "the horde refused this dreamer_name: choose another one",
    "TooManyWorkers": "this account runs as many workers as it may",
    "WorkerInviteOnly": "this horde only accepts invited workers",
}
MAINTENANCE_ERRORS = ("WorkerMaintenance", "WorkerFlaggedMaintenance")


def readable_ids(raw: Any) -> list[str]:
    """The job ids of a pop answer that failed validation, where they can still be read."""
    if not isinstance(raw, dict):
        return []
    ids = raw.get("ids")
    if isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids):
        return list(dict.fromkeys(ids))
    first = raw.get("id")
    return [first] if isinstance(first, str) and first else []


def unreadable_job(raw: dict, ids: list[str]) -> Job:
    """A Job standing for a pop answer that could not be read: enough to submit its ids as faulted."""
    ttl = raw.get("ttl")
    model = raw.get("model")
    pop = PopResponse(id=ids[0], ids=ids, model=model if isinstance(model, str) else None,
                      ttl=ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0 else None)
    return Job(pop=pop)


def fingerprint(pop: PopResponse) -> tuple:
    """What makes two pops the same request handed out twice (the seed is left out: a request without
    one gets a new random seed each time it is handed out)."""
    p = pop.payload
    return (pop.model, p.prompt, p.width, p.height, p.ddim_steps, p.sampler_name, p.cfg_scale, pop.source_image)


class Popper:
    """The pop loop of one supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.in_flight = False
        self._failures = 0

    async def run(self) -> None:
        """Pop while the worker is not stopping; nothing that happens in one round stops the loop."""
        while not self.sup.stopping:
            try:
                if not self.sup.room_to_pop():
                    await asyncio.sleep(0.05)
                    continue
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.opt(exception=exc).error("pop loop: unexpected {} ({}); popping goes on", type(exc).__name__, exc)
                await self.sup.sleep_unless_stopping(5.0)

    async def _round(self) -> None:
        """One pop and what follows from its answer; `in_flight` holds until a popped job is registered."""
        sup = self.sup
        self.in_flight = True
        try:
            try:
                pop = await asyncio.to_thread(sup.client.pop, sup.pop_request(),
                                              RetryPolicy(attempts=3, base_delay=0.5, max_delay=10))
            except MalformedPop as exc:
                self._fault_unreadable(exc)
                pause = sup.pop_interval
            except HordeError as exc:
                pause = self._refused(exc)
            except HordeUnreachable as exc:
                self._failures += 1
                logger.warning("horde unreachable: {}; trying again", exc)
                pause = min(60.0, 2**self._failures * random.uniform(0.5, 1.0))
            else:
                self._failures = 0
                self._take(pop)
                pause = 0.0 if pop.has_job else sup.pop_interval
        finally:
            self.in_flight = False
        if pause:
            await sup.sleep_unless_stopping(pause)

    def _take(self, pop: PopResponse) -> None:
        sup = self.sup
        sup.show_messages(pop)
        if not pop.has_job:
            return
        held = [i for i in pop.ids if i in sup.jobs]
        if held:
            logger.warning("the horde handed out job id(s) {} again while the worker holds them; ignored", held)
            return
        sup.stop_stale_copies(fingerprint(pop))
        job = Job(pop=pop)
        sup.jobs[job.id] = job
        logger.info("popped job {} ({} x {}x{} {} steps, model {})", job.id, len(job.ids), pop.payload.width,
                    pop.payload.height, pop.payload.ddim_steps, job.model)
        sup.spawn_for(job, sup.prepare(job))

    def _fault_unreadable(self, exc: MalformedPop) -> None:
        ids = readable_ids(exc.raw)
        if not ids:
            logger.error("the horde's pop answer could not be read and names no job id ({}); nothing to answer",
                         exc.problem)
            return
        job = unreadable_job(exc.raw, ids)
        if job.id in self.sup.jobs:
            return
        logger.error("job {} could not be read ({}); submitted as faulted", job.id, exc.problem)
        self.sup.jobs[job.id] = job
        job.advance(JobState.FAULTED, f"the job could not be read: {exc.problem}")
        self.sup.finish(job)

    def _refused(self, exc: HordeError) -> float:
        """Act on a refused pop; returns the seconds to wait before the next one."""
        sup = self.sup
        if exc.rc in FATAL_POP_ERRORS:
            sup.fatal = f"{FATAL_POP_ERRORS[exc.rc]} ({exc.message})"
            logger.error("the horde refused this worker: {}", sup.fatal)
            sup.stats.message("refused", sup.fatal, "the worker stops: change what the message names and start again")
            sup.request_stop()
            return 0.0
        if exc.rc in MAINTENANCE_ERRORS:
            logger.warning(
                "the horde has put this worker in maintenance ({}). Jobs failed too often: look at "
                "logs/trace.log, fix the cause, then clear it on the horde's worker page or with "
                "remove_maintenance_on_init: true and a restart. Asking again in {:.0f}s.",
                exc.message, sup.maintenance_interval)
            sup.stats.message("maintenance", f"the horde has put this worker in maintenance ({exc.message})",
                              "jobs failed too often: find the cause in logs/trace.log, fix it, then clear maintenance "
                              "on the horde's worker page or set remove_maintenance_on_init: true and restart")
            return sup.maintenance_interval
        self._failures += 1
        logger.warning("pop refused: {}", exc)
        return min(60.0, 2**self._failures)
