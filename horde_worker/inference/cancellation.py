"""Stopping jobs: the supervisor's cancellations as the inference process records them, and the exception
that ends a job's sampling at its next step."""

from __future__ import annotations

import threading


class JobCancelled(BaseException):
    """The supervisor stopped the running job; raised from the sampling step callback.

    A BaseException, so that no `except Exception` on the way out of the pipeline takes it for a
    failure of its own and carries on."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} stopped: {reason}")
        self.job_id, self.reason = job_id, reason


class Cancellations:
    """The jobs this process holds (queued or sampling) and which of them the supervisor stopped.

    The reader thread admits and cancels, the sampling thread asks and forgets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._stopped: dict[str, str] = {}

    def admit(self, job_id: str) -> None:
        with self._lock:
            self._known.add(job_id)

    def cancel(self, job_id: str, reason: str) -> bool:
        """Record the stop; False (and nothing recorded) for a job this process does not hold."""
        with self._lock:
            if job_id not in self._known:
                return False
            self._stopped.setdefault(job_id, reason)
            return True

    def reason(self, job_id: str) -> str | None:
        with self._lock:
            return self._stopped.get(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._known.discard(job_id)
            self._stopped.pop(job_id, None)
