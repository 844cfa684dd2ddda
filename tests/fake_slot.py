"""A stand-in inference process for supervisor tests: a real spawned process on a real pipe that
speaks the inference messages, and does what the job's prompt tells it to.

Prompt words: `hang` (never answers, ignores stops), `slow=S` (S seconds per step, stops at the next
step when asked), `crash` (exits mid-job with code 3), `raise` (answers GenerateFailed), `steps=N`
(reports N steps; default the job's own). Any other prompt: a few quick steps and one flat image
per seed, coloured by the seed. A file named `crash_at_start` in the slot's log_dir makes the
process exit at once (a crash-looping slot).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from horde_worker.inference.messages import (
    CancelJob,
    GenerateFailed,
    GenerateRequest,
    GenerateResult,
    Preload,
    Preloaded,
    Progress,
    Shutdown,
    SlotReady,
    SlotSpec,
)


def _word(prompt: str, name: str) -> str | None:
    found = re.search(rf"\b{name}=([0-9.]+)", prompt)
    return found.group(1) if found else None


def fake_slot_main(conn, spec: SlotSpec) -> None:
    """Entry point of the stand-in process."""
    if (Path(spec.log_dir) / "crash_at_start").exists():
        os._exit(7)
    conn.send(SlotReady(spec.slot, os.getpid(), "fake"))
    backlog: list = []
    while True:
        message = backlog.pop(0) if backlog else conn.recv()
        if isinstance(message, Shutdown) or message is None:
            return
        if isinstance(message, Preload):
            conn.send(Preloaded(message.model_name, 0.0, [message.model_name]))
            continue
        if not isinstance(message, GenerateRequest):
            continue
        _run(conn, message, backlog)


def _run(conn, request: GenerateRequest, backlog: list) -> None:
    prompt = request.prompt
    if "hang" in prompt.split():
        while True:
            time.sleep(3600)
    if "crash" in prompt.split():
        time.sleep(0.3)
        os._exit(3)
    if "raise" in prompt.split():
        conn.send(GenerateFailed(request.job_id, "RuntimeError: asked to fail", [request.model_name]))
        return
    per_step = float(_word(prompt, "slow") or 0.01)
    steps = int(_word(prompt, "steps") or request.steps)
    for step in range(1, steps + 1):
        deadline = time.monotonic() + per_step
        while (left := deadline - time.monotonic()) > 0:
            if conn.poll(left):
                message = conn.recv()
                if isinstance(message, CancelJob) and message.job_id == request.job_id:
                    conn.send(GenerateFailed(request.job_id, f"stopped: {message.reason}", [request.model_name]))
                    return
                if not isinstance(message, CancelJob):
                    backlog.append(message)
        conn.send(Progress(request.job_id, step, steps))
    images = [np.full((request.height, request.width, 3), seed % 256, dtype=np.uint8) for seed in request.seeds]
    conn.send(GenerateResult(request.job_id, images, 0.0, per_step * steps, [request.model_name]))
