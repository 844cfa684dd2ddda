"""Inference processes, one per device slot, and the pipes to them.

Each slot is a spawned process running `horde_worker.inference.runner.slot_main`. A reader
thread per slot receives its messages; when the pipe breaks, the process is dead, and its exit
code is reported at once rather than discovered by a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from horde_worker.inference.messages import Shutdown, SlotReady, SlotSpec


@dataclass
class Slot:
    """One inference process as the supervisor sees it."""

    spec: SlotSpec
    process: mp.process.BaseProcess | None = None
    conn: object | None = None
    ready: bool = False
    pid: int | None = None
    device_name: str = ""
    job_id: str | None = None  # the job sampling on it
    resident: list[str] = field(default_factory=list)
    preloading: set[str] = field(default_factory=set)
    restarts: int = 0
    generation: int = 0  # bumps on every restart so stale reader threads are ignored

    @property
    def idle(self) -> bool:
        return self.ready and self.job_id is None


class SlotPool:
    """Starts, feeds, watches and restarts the inference processes."""

    def __init__(self, specs: list[SlotSpec], on_message: Callable[[Slot, object], None],
                 on_death: Callable[[Slot, int | None], None]) -> None:
        self._context = mp.get_context("spawn")
        self.slots = [Slot(spec) for spec in specs]
        self._on_message = on_message
        self._on_death = on_death
        self._stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: Slot) -> None:
        from horde_worker.inference.runner import slot_main

        parent, child = self._context.Pipe()
        process = self._context.Process(target=slot_main, args=(child, slot.spec), daemon=True,
                                        name=f"horde-inference-{slot.spec.slot}")
        process.start()
        child.close()  # so that the parent's end reads EOF when the process dies
        slot.generation += 1
        slot.process, slot.conn, slot.ready, slot.job_id, slot.resident = process, parent, False, None, []
        slot.preloading = set()
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

    def send(self, slot: Slot, message: object) -> None:
        slot.conn.send(message)

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
            except (OSError, BrokenPipeError):
                pass
        for slot in self.slots:
            if slot.process is None:
                continue
            slot.process.join(timeout=timeout)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(timeout=5)
