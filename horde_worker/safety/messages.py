"""Messages between the supervisor and the safety process (plain dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SafetyCheck:
    """Check these HxWx3 uint8 images of one job; `prompt` is the job's, negative after `###`."""

    job_id: str
    images: list[Any]
    prompt: str
    model_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImageVerdict:
    """What the checker found in one image."""

    nsfw: bool
    csam: bool
    # The concepts that decided it, for the log (never the image).
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SafetyVerdicts:
    job_id: str
    verdicts: list[ImageVerdict]


@dataclass(frozen=True)
class SafetyFailed:
    job_id: str
    reason: str


@dataclass(frozen=True)
class SafetyReady:
    device_name: str
