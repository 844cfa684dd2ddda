"""Which waiting job runs next on which free slot.

A job for a model already resident on the slot saves a model switch, so it is preferred, but
never at the cost of starving another: once a job has been passed over `max_skips` times, or
its TTL is half gone, it is urgent, and the urgent job nearest its deadline goes first. A job
that must run again (its process died) goes to the head of the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from horde_worker.supervisor.job import Job, JobState


@dataclass
class Scheduler:
    """Holds jobs in QUEUED order and picks one for a slot."""

    max_skips: int = 3
    waiting: list[Job] = field(default_factory=list)
    _skips: dict[str, int] = field(default_factory=dict)

    def add(self, job: Job, front: bool = False) -> None:
        """Queue a job whose inputs are ready, or (`front`) one that must run again."""
        job.advance(JobState.QUEUED)
        if front:
            self.waiting.insert(0, job)
        else:
            self.waiting.append(job)

    def remove(self, job: Job) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
        self._skips.pop(job.id, None)

    def __len__(self) -> int:
        return len(self.waiting)

    def pick(self, resident_models: list[str], now: float | None = None) -> Job | None:
        """The job to run next on a slot holding `resident_models`, removed from the queue."""
        if not self.waiting:
            return None
        now = time.time() if now is None else now
        urgent = [j for j in self.waiting
                  if self._skips.get(j.id, 0) >= self.max_skips or now - j.popped_at > j.ttl / 2]
        if urgent:
            choice = min(urgent, key=lambda j: j.deadline)
        else:
            choice = next((j for j in self.waiting if j.model in resident_models), self.waiting[0])
        for passed in self.waiting:
            if passed is choice:
                break
            self._skips[passed.id] = self._skips.get(passed.id, 0) + 1
        self.remove(choice)
        return choice
