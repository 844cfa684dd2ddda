"""What is submitted for a checked image: the image itself, or a censor image saying why.

    CSAM                                         -> censor image, state csam,     {censorship, csam}
    NSFW and (worker nsfw: false, or the job's use_nsfw_censor,
              or censor_nsfw with a censorlist word in the prompt)
                                                 -> censor image, state censored, {censorship, nsfw}
    NSFW otherwise                               -> the image,    state ok,       {information, nsfw}
    neither                                      -> the image,    state ok

The horde reads censorship from gen_metadata only; the state is sent as well for the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from horde_worker.horde.wire import GenMetadata, GenMetadataType, GenMetadataValue, SubmitState
from horde_worker.safety.messages import ImageVerdict

CSAM_REASON = "This image was withheld: the safety check found a minor in sexual content."
NSFW_REASONS = {
    "worker": "This worker does not deliver NSFW images, and this one was NSFW.",
    "request": "The request asked for NSFW images to be censored, and this one was NSFW.",
    "censorlist": "The prompt matched this worker's censor list, and the image was NSFW.",
}


@dataclass
class Outcome:
    """The checked image's fate."""

    image: np.ndarray
    state: SubmitState = SubmitState.OK
    metadata: list[GenMetadata] = field(default_factory=list)
    reason: str | None = None  # why it was censored, for the log


def matches_censorlist(prompt: str, censorlist: list[str]) -> str | None:
    """The first censorlist word found in the prompt (case-insensitive), or None."""
    lowered = prompt.lower()
    return next((word for word in censorlist if word.strip() and word.strip().lower() in lowered), None)


def decide(verdict: ImageVerdict, image: np.ndarray, *, worker_nsfw: bool, use_nsfw_censor: bool, censor_nsfw: bool,
           censorlist: list[str], prompt: str) -> Outcome:
    """The image or its censor image, with the state and gen_metadata to submit."""
    if verdict.csam:
        return Outcome(censor_image(image.shape, CSAM_REASON), SubmitState.CSAM,
                       [GenMetadata(type=GenMetadataType.CENSORSHIP, value=GenMetadataValue.CSAM)], "csam")
    if not verdict.nsfw:
        return Outcome(image)
    why = None
    if not worker_nsfw:
        why = "worker"
    elif use_nsfw_censor:
        why = "request"
    elif censor_nsfw and matches_censorlist(prompt, censorlist):
        why = "censorlist"
    if why is not None:
        return Outcome(censor_image(image.shape, NSFW_REASONS[why]), SubmitState.CENSORED,
                       [GenMetadata(type=GenMetadataType.CENSORSHIP, value=GenMetadataValue.NSFW)], f"nsfw ({why})")
    return Outcome(image, metadata=[GenMetadata(type=GenMetadataType.INFORMATION, value=GenMetadataValue.NSFW)])


def censor_image(shape: tuple[int, ...], reason: str) -> np.ndarray:
    """A plain dark image of the same size with the reason written on it."""
    import textwrap

    from PIL import Image, ImageDraw

    height, width = shape[0], shape[1]
    image = Image.new("RGB", (width, height), (40, 40, 48))
    draw = ImageDraw.Draw(image)
    size = max(10, min(width, height) // 16)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # older Pillow: the fixed bitmap font
        from PIL import ImageFont

        font = ImageFont.load_default()
    lines = ["CENSORED", *textwrap.wrap(reason, width=max(12, width // max(6, size // 2 + 2)))]
    y = max(4, height // 2 - len(lines) * (size + 4) // 2)
    for line in lines:
        draw.text((max(4, width // 20), y), line, fill=(235, 235, 235), font=font)
        y += size + 4
    return np.asarray(image)
