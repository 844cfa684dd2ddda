"""The engine's decisions, and nothing else: which waiting jobs start, and which running ones take the
next step. Pure functions of plain data, so every rule is tested without a model.

Three kinds of job:
- BATCHED: its sampler is stepped by the engine itself; batched jobs of one model and one group key
  (latent and conditioning shapes) share one denoiser forward per step;
- SHARED: runs its own pipeline (img2img, inpainting, ControlNet, hires fix, ...) one step at a
  time, interleaved with the others; it only reads the model's modules;
- EXCLUSIVE: changes the model's modules while it runs (LoRA, textual inversion, tiling), so
  nothing else may run beside it.

Starting: jobs start in arrival order while the engine has room, as long as they use a model that
is already running (filling batches beats switching models) or nothing is running. A job of
another model that has waited too long, or is near its deadline, is urgent: from then on no job
starts before it, so the running ones drain and the switch happens.

Stepping: one unit per engine iteration (a batch group, or one solo job), the one that has waited
longest since its last step, so a new job never waits for a long one to finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# A waiting job of another model becomes urgent after this many seconds in the engine...
PATIENCE = 30.0
# ... or when its deadline is this near.
DEADLINE_MARGIN = 90.0


class JobKind(Enum):
    BATCHED = "batched"
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@dataclass(frozen=True)
class Waiting:
    """A job the engine holds but has not started."""

    job_id: str
    model: str
    kind: JobKind
    arrived_at: float
    deadline: float | None = None  # epoch seconds; None when unknown

    def urgent(self, now: float) -> bool:
        return now - self.arrived_at > PATIENCE or (self.deadline is not None and self.deadline - now < DEADLINE_MARGIN)


@dataclass(frozen=True)
class Running:
    """A started job; `group` is its batch key (None for a solo job), `last_step` the iteration of its last step."""

    job_id: str
    model: str
    kind: JobKind
    group: tuple | None = None
    last_step: int = -1


def jobs_to_start(waiting: list[Waiting], running: list[Running], max_jobs: int, now: float) -> list[str]:
    """The waiting jobs that start now, in the order given (arrival order)."""
    started: list[Waiting] = []
    models = {job.model for job in running}
    exclusive = any(job.kind is JobKind.EXCLUSIVE for job in running)
    # Urgent jobs first (longest waiting first), then the rest in arrival order.
    order = sorted(waiting, key=lambda job: (not job.urgent(now), job.arrived_at if job.urgent(now) else 0.0))
    for job in order:
        if len(running) + len(started) >= max_jobs or exclusive:
            break
        nothing_runs = not running and not started
        fits = nothing_runs or (job.kind is not JobKind.EXCLUSIVE and job.model in models)
        if fits:
            started.append(job)
            models.add(job.model)
            exclusive = job.kind is JobKind.EXCLUSIVE
        elif job.urgent(now):
            break  # nothing overtakes an urgent job: the running ones drain, then it starts
    return [job.job_id for job in started]


def units(running: list[Running]) -> list[list[Running]]:
    """The running jobs as step units: one per batch group (of one model), one per solo job."""
    groups: dict[tuple, list[Running]] = {}
    solo: list[list[Running]] = []
    for job in running:
        if job.kind is JobKind.BATCHED and job.group is not None:
            groups.setdefault((job.model, job.group), []).append(job)
        else:
            solo.append([job])
    return [*groups.values(), *solo]


def unit_to_step(running: list[Running]) -> list[str]:
    """The unit stepped longest ago (a larger unit first on a tie); [] when nothing runs."""
    candidates = units(running)
    if not candidates:
        return []
    chosen = min(candidates, key=lambda unit: (min(job.last_step for job in unit), -len(unit)))
    return [job.job_id for job in chosen]

