"""What the local horde keeps: requests, the images handed out as jobs, and workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from horde_worker.localhorde.rules import ANONYMOUS_KEY


@dataclass
class Generation:
    """One image of a request, handed to a worker as one job id."""

    id: str
    request_id: str
    worker_id: str
    worker_name: str
    model: str
    seed: str
    popped_at: float
    ttl: int
    state: str = "processing"  # processing | done | faulted | aborted
    generation: str | None = None  # "R2" or base64 WebP
    submitted_seed: int | None = None
    gen_metadata: list[dict[str, Any]] = field(default_factory=list)
    accepted_submits: int = 0
    reward: float = 0.0


@dataclass
class ImageRequest:
    """A request sent to /v2/generate/async."""

    id: str
    body: dict[str, Any]
    created: float
    pending: int
    owner_key: str = ANONYMOUS_KEY
    seed_counter: int = 0
    restarted: int = 0
    faulted: bool = False
    generation_ids: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return self.body.get("params") or {}


@dataclass
class Worker:
    """A worker known to the local horde."""

    id: str
    name: str
    owner_key: str
    bridge_agent: str = ""
    models: list[str] = field(default_factory=list)
    last_pop: float = 0.0
    maintenance: bool = False
    maintenance_msg: str = ""
    failures: list[float] = field(default_factory=list)
    fulfilled: int = 0
    kudos: float = 0.0
    megapixelsteps: float = 0.0
    uncompleted: int = 0
    extra_slow: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
