"""Which waiting job runs next on which free slot.

A job for a model already resident on the slot saves a model switch, so it is preferred, but
never at the cost of starving the oldest job: once it has been passed over `max_skips` times,
or its TTL is half gone, it goes first.
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

    def add(self, job: Job) -> None:
        """Queue a job whose inputs are ready (or that must run again)."""
        job.advance(JobState.QUEUED)
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
        oldest = self.waiting[0]
        urgent = (self._skips.get(oldest.id, 0) >= self.max_skips
                  or now - oldest.popped_at > oldest.ttl / 2)
        choice = oldest
        if not urgent:
            choice = next((j for j in self.waiting if j.model in resident_models), oldest)
        if choice is not oldest:
            self._skips[oldest.id] = self._skips.get(oldest.id, 0) + 1
        self.remove(choice)
        return choice
