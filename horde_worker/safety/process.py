"""The safety process: the horde's own NSFW/CSAM checker over the horde's CLIP, on one device.

It answers each `SafetyCheck` with one verdict per image, or `SafetyFailed`: a check that
cannot be made is never read as "safe".
"""

from __future__ import annotations

import os
from pathlib import Path

from horde_worker.inference.process_guard import ignore_sigint, install_orphan_watchdog, parent_pid
from horde_worker.safety.messages import ImageVerdict, SafetyCheck, SafetyFailed, SafetyReady, SafetyVerdicts


class Checker:
    """horde_safety's NSFWChecker reading similarities from the CLIP model at `weights`."""

    def __init__(self, weights: Path, device_name: str) -> None:
        import torch

        from horde_worker.safety.clip_model import ClipSimilarity

        os.environ.setdefault("AIWORKER_CACHE_HOME", str(Path(weights).parent))
        from horde_safety.nsfw_checker_class import NSFWChecker

        self.device = torch.device(device_name)
        self.similarity = ClipSimilarity(weights, self.device)
        self.checker = NSFWChecker(self.similarity, None)

    def check(self, request: SafetyCheck) -> SafetyVerdicts | SafetyFailed:
        from PIL import Image

        verdicts = []
        for index, pixels in enumerate(request.images):
            result = self.checker.check_for_nsfw(Image.fromarray(pixels), prompt=request.prompt,
                                                 model_info=request.model_info)
            if result is None:
                return SafetyFailed(request.job_id, f"the checker gave no answer for image {index}")
            details = {**result.nsfw_concepts_identified, **result.csam_predicates_matched}
            verdicts.append(ImageVerdict(nsfw=bool(result.is_nsfw), csam=bool(result.is_csam),
                                         details={k: round(float(v), 4) for k, v in details.items()}))
        return SafetyVerdicts(request.job_id, verdicts)


def safety_main(conn, weights: str, device_name: str, log_dir: str) -> None:
    """Entry point of the safety process."""
    ignore_sigint()  # first: the supervisor decides when this process ends, not a Ctrl+C in its terminal
    install_orphan_watchdog(parent_pid())
    from loguru import logger

    logger.remove()
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    logger.add(Path(log_dir) / "safety.log", rotation="20 MB", retention=3, level="DEBUG")
    from horde_worker.ui.logs import capture_third_party

    capture_third_party()  # other libraries' warnings into this file, not onto the volunteer's console
    checker = Checker(Path(weights), device_name)
    conn.send(SafetyReady(device_name))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(checker.check(request))
        except Exception as exc:
            logger.exception("safety check of job {} failed", request.job_id)
            conn.send(SafetyFailed(request.job_id, f"{type(exc).__name__}: {exc}"))
