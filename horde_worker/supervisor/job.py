r"""A job's life: one explicit state machine.

A job is one pop: `n_iter` images of one request, submitted as one horde id each.

    POPPED -> INPUTS_READY -> QUEUED -> RUNNING -> GENERATED -> CHECKED -> ENCODED -> UPLOADED -> SUBMITTED
                                 ^          |    \               ^                 |
                                 +----------+     POSTPROCESSING -+                 +------------> SUBMITTED
                        (slot died, TTL left)  (overlap: the slot      (safety-checked: censored if must be)
                                                samples the next job)  (upload failed: base64)
    any unfinished state -> FAULTED(reason) -> SUBMITTED   (submitted as faulted)
    any unfinished state -> ABANDONED                      (the horde aborted it or never knew it)

Only `Job.advance` changes a state, and it refuses a move the diagram does not have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from horde_worker.horde.wire import GenMetadata, PopResponse, SubmitState


class JobState(str, Enum):
    """Where a job is in its life."""

    POPPED = "popped"
    INPUTS_READY = "inputs_ready"
    QUEUED = "queued"
    RUNNING = "running"
    POSTPROCESSING = "postprocessing"
    GENERATED = "generated"
    CHECKED = "checked"
    ENCODED = "encoded"
    UPLOADED = "uploaded"
    FAULTED = "faulted"
    SUBMITTED = "submitted"
    ABANDONED = "abandoned"

    @property
    def is_final(self) -> bool:
        return self in (JobState.SUBMITTED, JobState.ABANDONED)


_MOVES: dict[JobState, set[JobState]] = {
    JobState.POPPED: {JobState.INPUTS_READY},
    JobState.INPUTS_READY: {JobState.QUEUED},
    JobState.QUEUED: {JobState.RUNNING},
    JobState.RUNNING: {JobState.GENERATED, JobState.POSTPROCESSING, JobState.QUEUED},
    JobState.POSTPROCESSING: {JobState.GENERATED, JobState.QUEUED},
    JobState.GENERATED: {JobState.CHECKED},
    JobState.CHECKED: {JobState.ENCODED},
    JobState.ENCODED: {JobState.UPLOADED, JobState.SUBMITTED},
    JobState.UPLOADED: {JobState.SUBMITTED},
    JobState.FAULTED: {JobState.SUBMITTED, JobState.ABANDONED},
    JobState.SUBMITTED: set(),
    JobState.ABANDONED: set(),
}
for _state, _targets in _MOVES.items():
    if not _state.is_final and _state is not JobState.FAULTED:
        _targets |= {JobState.FAULTED, JobState.ABANDONED}


class IllegalTransition(RuntimeError):
    """A move the job's state machine does not allow."""


@dataclass
class Job:
    """One popped job and everything learned about it on the way."""

    pop: PopResponse
    popped_at: float = field(default_factory=time.time)
    state: JobState = JobState.POPPED
    fault_reason: str | None = None
    gen_metadata: list[GenMetadata] = field(default_factory=list)
    # Per image, after the safety check: the submit state and the image's own gen_metadata.
    image_states: list[SubmitState] = field(default_factory=list)
    image_metadata: list[list[GenMetadata]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # HxWxC uint8 arrays until encoded
    webp: list[bytes] = field(default_factory=list)
    uploaded: list[bool] = field(default_factory=list)
    submitted_ids: set[str] = field(default_factory=set)
    attempts: int = 0
    slot: int | None = None
    progress: tuple[int, int] = (0, 0)
    reward: float = 0.0
    history: list[tuple[float, JobState]] = field(default_factory=list)
    started_at: float | None = None
    generated_at: float | None = None
    # Time limits of a running job: when its last step (or its start) was seen, and when it was asked to stop.
    last_progress_at: float | None = None
    first_step: tuple[float, int] | None = None  # (when, which) the first step reported by the process
    journaled: bool = False  # a complete journal entry exists
    finish_failures: int = 0
    # Fetched before the job queues; never journaled (a resumed job only needs its submit).
    inputs: Any = None
    loras: list[Any] = field(default_factory=list)
    tis: list[Any] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.pop.ids[0]

    @property
    def ids(self) -> list[str]:
        return list(self.pop.ids)

    @property
    def model(self) -> str:
        return self.pop.model or ""

    @property
    def ttl(self) -> float:
        return float(self.pop.ttl or 150)

    @property
    def deadline(self) -> float:
        """When the horde aborts the job (its TTL counts from the pop)."""
        return self.popped_at + self.ttl

    @property
    def megapixelsteps(self) -> float:
        """Work of the whole job: width x height x steps per image, in millions."""
        p = self.pop.payload
        return p.width * p.height * p.ddim_steps * len(self.pop.ids) / 1e6

    def advance(self, target: JobState, reason: str | None = None) -> None:
        """Move to `target`, or raise IllegalTransition."""
        if target not in _MOVES[self.state]:
            raise IllegalTransition(f"job {self.id}: {self.state.value} -> {target.value} is not allowed")
        if target is JobState.FAULTED:
            self.fault_reason = reason or "unknown failure"
        if target is JobState.RUNNING:
            self.started_at = self.last_progress_at = time.time()
            self.first_step = None
            self.progress = (0, 0)
        if target is JobState.GENERATED:
            self.generated_at = time.time()
        self.state = target
        self.history.append((time.time(), target))
