"""Inference processes, one per device slot, and the pipes to them.

Each slot is a spawned process running `horde_worker.inference.runner.slot_main`. A reader
thread per slot receives its messages; when the pipe breaks, the process is dead, and its exit
code is reported at once rather than discovered by a timeout.

A slot whose process keeps dying is restarted with a growing delay (none for the first death,
then 2, 4, 8 ... s); after `MAX_FAILURES_IN_ROW` deaths without a job answered in between, its
device is marked unusable and the worker serves with the slots that work.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from horde_worker.inference.messages import Shutdown, SlotReady, SlotSpec
from horde_worker.inference.process_guard import sigint_ignored

MAX_FAILURES_IN_ROW = 5
MAX_RESTART_DELAY = 60.0


@dataclass
class Slot:
    """One inference process as the supervisor sees it."""

    spec: SlotSpec
    process: mp.process.BaseProcess | None = None
    conn: object | None = None
    ready: bool = False
    pid: int | None = None
    device_name: str = ""
    job_ids: set[str] = field(default_factory=set)  # the jobs its engine holds (up to spec.max_jobs)
    resident: list[str] = field(default_factory=list)
    # Models this slot is reading from disk ahead of their jobs: name -> when the read was asked for.
    preloading: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    generation: int = 0  # bumps on every restart so stale reader threads are ignored
    failures_in_row: int = 0  # deaths since the last job this slot answered
    restart_at: float | None = None  # monotonic time of a pending (backed-off) restart
    unusable: str | None = None  # why the slot was given up, once it has been
    stops: dict[str, float] = field(default_factory=dict)  # job id -> when the supervisor asked for its stop
    killed_on_purpose: bool = False  # the supervisor killed it (a stop not answered): not a crash

    @property
    def has_room(self) -> bool:
        """Ready, and holding fewer jobs than its engine may run at once."""
        return self.ready and self.unusable is None and len(self.job_ids) < self.spec.max_jobs

    @property
    def free_room(self) -> int:
        return max(0, self.spec.max_jobs - len(self.job_ids)) if self.usable else 0

    def release(self, job_id: str) -> None:
        """The process answered (or gave back) this job."""
        self.job_ids.discard(job_id)
        self.stops.pop(job_id, None)

    @property
    def usable(self) -> bool:
        """Running, starting or waiting to restart: the slot can still take jobs."""
        return self.unusable is None


class SlotPool:
    """Starts, feeds, watches and restarts the inference processes."""

    def __init__(self, specs: list[SlotSpec], on_message: Callable[[Slot, object], None],
                 on_death: Callable[[Slot, int | None], None], target: Callable | None = None,
                 backoff: float = 2.0) -> None:
        self._context = mp.get_context("spawn")
        self.slots = [Slot(spec) for spec in specs]
        self._on_message = on_message
        self._on_death = on_death
        self._target = target
        self.backoff = backoff
        self._stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: Slot) -> None:
        target = self._target
        if target is None:
            from horde_worker.inference.runner import slot_main as target

        parent, child = self._context.Pipe()
        process = self._context.Process(target=target, args=(child, slot.spec), daemon=True,
                                        name=f"horde-inference-{slot.spec.slot}")
        with sigint_ignored():  # Ctrl+C reaches the whole group; only the supervisor decides what it means
            process.start()
        child.close()  # so that the parent's end reads EOF when the process dies
        slot.generation += 1
        slot.process, slot.conn, slot.ready, slot.job_ids, slot.resident = process, parent, False, set(), []
        slot.preloading, slot.restart_at, slot.stops, slot.killed_on_purpose = {}, None, {}, False
        reader = threading.Thread(target=self._read, args=(slot, parent, slot.generation),
                                  name=f"slot-{slot.spec.slot}-reader", daemon=True)
        reader.start()
        logger.info("inference slot {} starting on {} (pid {})", slot.spec.slot, slot.spec.device, process.pid)

    def _read(self, slot: Slot, conn, generation: int) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if generation != slot.generation:
                return
            if isinstance(message, SlotReady):
                slot.pid, slot.device_name = message.pid, message.device_name
            self._on_message(slot, message)
        if generation != slot.generation or self._stopping:
            return
        process = slot.process
        if process is not None:
            process.join(timeout=5)
        self._on_death(slot, process.exitcode if process is not None else None)

    def send(self, slot: Slot, message: object) -> bool:
        """Send a message; False when the pipe is broken (the reader thread reports the death)."""
        try:
            slot.conn.send(message)
            return True
        except (OSError, EOFError, ValueError, AttributeError) as exc:
            logger.warning("inference slot {}: could not send {} ({})", slot.spec.slot, type(message).__name__,
                           type(exc).__name__)
            slot.ready = False
            return False

    def working(self) -> list[Slot]:
        """The slots that can still take jobs (running, starting or waiting to restart)."""
        return [slot for slot in self.slots if slot.usable]

    def kill(self, slot: Slot) -> None:
        """Kill a process that does not answer; its death is reported as any other."""
        if slot.process is not None and slot.process.is_alive():
            slot.process.kill()

    def record_death(self, slot: Slot, counts: bool = True) -> float | None:
        """Note a death and plan the restart: the delay in seconds, or None when the slot is now unusable."""
        slot.ready, slot.job_ids, slot.stops = False, set(), {}
        if counts:
            slot.failures_in_row += 1
        if slot.failures_in_row >= MAX_FAILURES_IN_ROW:
            slot.unusable = (f"its inference process died {slot.failures_in_row} times in a row "
                             f"(see logs/inference-{slot.spec.slot}.log)")
            slot.restart_at = None
            return None
        delay = 0.0 if slot.failures_in_row <= 1 else min(MAX_RESTART_DELAY,
                                                           self.backoff * 2.0 ** (slot.failures_in_row - 2))
        slot.restart_at = time.monotonic() + delay
        return delay

    def restart_due(self) -> list[Slot]:
        """Restart every slot whose backed-off restart time has come; returns them."""
        now, started = time.monotonic(), []
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and slot.unusable is None:
                self.restart(slot)
                started.append(slot)
        return started

    def restart(self, slot: Slot) -> None:
        """Replace a dead process with a fresh one."""
        slot.restarts += 1
        if slot.process is not None and slot.process.is_alive():
            slot.process.kill()
            slot.process.join(timeout=5)
        self._launch(slot)

    def stop(self, timeout: float = 20.0) -> None:
        """Ask every process to exit, then make sure it has."""
        self._stopping = True
        for slot in self.slots:
            try:
                if slot.conn is not None:
                    slot.conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=timeout)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(timeout=5)

    def kill_all(self) -> None:
        """End every process now (second Ctrl+C); deaths are reported as any other."""
        for slot in self.slots:
            self.kill(slot)
