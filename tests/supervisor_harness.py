"""An in-process Supervisor against the real local horde over HTTP, with stand-in or real slot processes.

The supervisor runs its own asyncio loop in a thread; the test drives the horde (posting requests,
changing its answers) and reads the outcome from the horde's own records.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from horde_worker.config.bridge_data import BridgeData
from horde_worker.horde.client import HordeClient, RetryPolicy
from horde_worker.inference.messages import SlotSpec
from horde_worker.inference.tiny import DEMO_MODEL_NAME
from horde_worker.localhorde import LocalHorde
from horde_worker.models.catalog import ModelCatalog, ServedModel
from horde_worker.supervisor.loop import Supervisor
from tests.fake_slot import fake_slot_main


class RunningSupervisor:
    """A Supervisor running in a background thread until `stop()`."""

    def __init__(self, tmp_path: Path, horde: LocalHorde, safety: Any, *, slots: int = 1,
                 target: Callable | None = fake_slot_main, checkpoint: Path | None = None, **settings: Any) -> None:
        self.horde = horde
        self.log_dirs = [tmp_path / f"slot-logs-{i}" for i in range(slots)]
        for folder in self.log_dirs:
            folder.mkdir(parents=True, exist_ok=True)
        values = {"dreamer_name": "harness-worker", "api_key": horde.api_key, "horde_url": horde.url,
                  "cache_home": str(tmp_path / "cache"), "max_threads": slots, "queue_size": 1, "max_batch": 4,
                  "max_power": 8, "allow_post_processing": False, "model_reference_url": "", "dashboard_port": 0,
                  **settings}
        self.settings = BridgeData.model_validate(values)
        client = HordeClient(horde.url, horde.api_key, retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2))
        catalog = ModelCatalog([ServedModel(DEMO_MODEL_NAME, checkpoint or tmp_path / "unused.safetensors",
                                            "stable_diffusion_1")])
        specs = [SlotSpec(slot=i, device="cpu", log_dir=str(self.log_dirs[i])) for i in range(slots)]
        self.journal_dir = tmp_path / "journal"
        self.supervisor = Supervisor(self.settings, client, catalog, specs, self.journal_dir, pop_interval=0.1,
                                     maintenance_interval=1.0, safety=safety, slot_target=target)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="supervisor-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(self.supervisor.run())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> RunningSupervisor:
        self._thread.start()
        return self

    def call(self, function: Callable, *args: Any) -> None:
        """Run `function(*args)` on the supervisor's loop."""
        while self.supervisor._loop is None:
            time.sleep(0.01)
        self.supervisor._loop.call_soon_threadsafe(function, *args)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Ask for a stop (as a first Ctrl+C does) and wait for the supervisor to return."""
        if self._thread.is_alive():
            self.call(self.supervisor.request_stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the supervisor did not stop within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.exit_code

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the supervisor to stop on its own."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the supervisor did not stop by itself within {timeout:.0f}s")
        return self.exit_code

    def kill_slots(self) -> None:
        """Teardown: no stand-in process outlives the test."""
        pool = self.supervisor.pool
        if pool is not None:
            pool.kill_all()


def post(horde: LocalHorde, prompt: str, n: int = 1, **params: Any) -> str:
    """Queue a request on the local horde; returns its id."""
    body = {"prompt": prompt, "params": {"steps": 4, "width": 64, "height": 64, "n": n, **params},
            "models": [DEMO_MODEL_NAME]}
    answer = requests.post(f"{horde.url}/v2/generate/async", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def generations(horde: LocalHorde, request_id: str) -> list[Any]:
    """The horde's records of every job handed out for a request (one per id, re-queues included)."""
    with horde.state.lock:
        request = horde.state.requests[request_id]
        return [horde.state.generations[gid] for gid in request.generation_ids]


def answered(horde: LocalHorde, request_id: str) -> bool:
    """Every job handed out for the request has been answered (done or faulted), and at least one was."""
    gens = generations(horde, request_id)
    return bool(gens) and all(g.state in ("done", "faulted") for g in gens)


def reasons(gen: Any) -> list[str]:
    """The reasons a faulted submit gave, from its gen_metadata."""
    return [m.get("ref", "") for m in gen.gen_metadata if m.get("type") == "information"]


def mutate_pops(horde: LocalHorde, mutations: list[Callable[[dict], None]]) -> list[dict]:
    """Make the horde's next pops that hand out a job answer as `mutations` change them (in order);
    returns the list of mutated answers as sent."""
    original = horde.state.pop
    sent: list[dict] = []

    def pop(apikey, body, base_url):
        answer = original(apikey, body, base_url)
        if answer.get("ids") and mutations:
            mutations.pop(0)(answer)
            sent.append(answer)
        return answer

    horde.state.pop = pop
    return sent
