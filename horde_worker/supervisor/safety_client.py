"""The supervisor's handle on the safety process: start it, ask it, replace it when it dies.

`check` blocks (call it from a thread). Any failure - the process dying, a timeout, a check it
could not make - raises `SafetyUnavailable`, and the caller faults the job: an image that was not
checked is never submitted.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

from loguru import logger

from horde_worker.inference.process_guard import sigint_ignored
from horde_worker.safety.messages import SafetyCheck, SafetyFailed, SafetyReady, SafetyVerdicts

# After a failed (re)start, checks fail at once for this long instead of each waiting for another start.
RESTART_COOLDOWN = 30.0


class SafetyUnavailable(RuntimeError):
    """The images could not be checked."""


class SafetyClient:
    """One safety process on `device` (cpu, or a GPU with safety_on_gpu)."""

    def __init__(self, weights: Path, device: str, log_dir: str, start_timeout: float = 300.0) -> None:
        self.weights, self.device, self.log_dir = Path(weights), device, log_dir
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None
        self._failed_start_at: float | None = None

    def start(self) -> None:
        from horde_worker.safety.process import safety_main

        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=safety_main, args=(child, str(self.weights), self.device, self.log_dir),
                                        name="safety", daemon=True)
        with sigint_ignored():  # Ctrl+C is the supervisor's to handle, not the checker's
            self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.start_timeout):
            self.stop()
            raise SafetyUnavailable(f"the safety process did not start within {self.start_timeout:.0f}s")
        try:
            ready = parent.recv()
        except (EOFError, OSError):
            code = self._process.exitcode if self._process else None
            raise SafetyUnavailable(f"the safety process exited while starting (exit code {code}); "
                                    f"see logs/safety.log") from None
        if not isinstance(ready, SafetyReady):
            raise SafetyUnavailable(f"unexpected first message from the safety process: {ready!r}")
        logger.info("safety checker ready on {} ({}, process {})", self.device, self.weights.name, self._process.pid)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def check(self, job_id: str, images: list[Any], prompt: str, model_info: dict | None = None,
              timeout: float = 180.0) -> SafetyVerdicts:
        """One verdict per image, or SafetyUnavailable."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                if self._failed_start_at is not None and time.monotonic() - self._failed_start_at < RESTART_COOLDOWN:
                    raise SafetyUnavailable("the safety process failed to start moments ago")
                logger.warning("safety process not running; starting it")
                try:
                    self.start()
                except SafetyUnavailable:
                    self._failed_start_at = time.monotonic()
                    self.stop()
                    raise
                self._failed_start_at = None
            try:
                self._conn.send(SafetyCheck(job_id, list(images), prompt, model_info))
                if not self._conn.poll(timeout):
                    raise SafetyUnavailable(f"no answer within {timeout:.0f}s")
                answer = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                code = self._process.exitcode if self._process else None
                self.stop()  # the next check starts a new process
                raise SafetyUnavailable(f"the safety process died (exit code {code}): {exc}") from None
            except SafetyUnavailable:
                self.stop()
                raise
        if isinstance(answer, SafetyFailed):
            raise SafetyUnavailable(answer.reason)
        if not isinstance(answer, SafetyVerdicts) or len(answer.verdicts) != len(images):
            raise SafetyUnavailable(f"unexpected answer from the safety process: {answer!r}")
        return answer

    def kill(self) -> None:
        """End the process at once (second Ctrl+C)."""
        process = self._process
        if process is not None and process.is_alive():
            process.kill()

    def stop(self) -> None:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._process = None
