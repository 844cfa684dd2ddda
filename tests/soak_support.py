"""Pieces of the fault soak: the request poster, the worker's processes, memory samples, secret scans."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import statistics
import threading
import time
from pathlib import Path

import psutil
import requests

from horde_worker.inference.tiny import DEMO_MODEL_NAME

SAFETY_READY = re.compile(r"safety checker ready on \S+ \(.*, process (\d+)\)")


class RequestPoster:
    """Keeps requests waiting on the local horde (sent straight to it, with the owner's key) until stopped.

    Seeded: sizes 64..128, 2-4 steps, some n>1, some img2img with a source image the horde serves.
    The soak faults jobs on purpose, far more than 20 an hour, so every few seconds the poster also does
    what an owner would: it clears the worker's maintenance flag (and with it the horde's fault count)."""

    def __init__(self, horde, seed: int, keep_waiting: int = 6, forgive_every: float = 5.0) -> None:
        self.horde = horde
        self.random = random.Random(seed)
        self.keep_waiting = keep_waiting
        self.forgive_every = forgive_every
        self.posted: list[str] = []
        self.errors: list[str] = []
        self.maintenance_seen = 0  # times the worker was found in maintenance before it was cleared
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-poster", daemon=True)
        source = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (128, 128), (40, 90, 200)).save(source, format="WEBP", lossless=True)
        self._source = base64.b64encode(source.getvalue()).decode()

    def body(self) -> dict:
        """The next request's body."""
        r = self.random
        n = r.choice((1, 1, 1, 2, 3, 4))
        params = {"width": r.choice((64, 128)), "height": r.choice((64, 128)), "steps": r.randint(2, 4), "n": n,
                  "sampler_name": r.choice(("k_euler", "k_euler_a", "k_lms")), "cfg_scale": 7.0,
                  "seed": str(r.randrange(10**6))}
        body = {"prompt": f"soak picture {len(self.posted)} ### blur", "params": params, "models": [DEMO_MODEL_NAME]}
        if r.random() < 0.2:
            body["source_image"] = self._source
            params["denoising_strength"] = 0.6
        return body

    def _forgive(self) -> None:
        key = {"apikey": self.horde.api_key}
        for worker_id in self.horde.state.counters()["workers"].values():
            view = requests.get(f"{self.horde.url}/v2/workers/{worker_id}", headers=key, timeout=10).json()
            self.maintenance_seen += bool(view.get("maintenance_mode"))
            requests.put(f"{self.horde.url}/v2/workers/{worker_id}", json={"maintenance": False}, headers=key,
                         timeout=10)

    def _run(self) -> None:
        forgiven = time.monotonic()
        while not self._stop.wait(0.3):
            try:
                if time.monotonic() - forgiven > self.forgive_every:
                    forgiven = time.monotonic()
                    self._forgive()
                if self.horde.state.counters()["pending"] >= self.keep_waiting:
                    continue
                answer = requests.post(f"{self.horde.url}/v2/generate/async", json=self.body(),
                                       headers={"apikey": self.horde.api_key}, timeout=10)
                if answer.status_code == 202:
                    self.posted.append(answer.json()["id"])
                else:
                    self.errors.append(f"{answer.status_code} {answer.text[:200]}")
            except requests.RequestException as exc:
                self.errors.append(type(exc).__name__)

    def start(self) -> RequestPoster:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def safety_pid(output: str, main_pid: int) -> int | None:
    """The safety process's pid, from the worker's last 'safety checker ready' line, if it is still its child."""
    pids = SAFETY_READY.findall(output)
    if not pids:
        return None
    pid = int(pids[-1])
    return pid if pid in {c.pid for c in children(main_pid)} else None


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def spawned_children(pid: int) -> list[psutil.Process]:
    """Children started by multiprocessing's spawn (inference slots and the safety process)."""
    found = []
    for child in children(pid):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def inference_processes(output: str, main_pid: int) -> list[psutil.Process]:
    """The worker's inference processes: its spawned children other than the safety process."""
    safety = safety_pid(output, main_pid)
    if safety is None:
        return []
    return [c for c in spawned_children(main_pid) if c.pid != safety]


def alive(process: psutil.Process) -> bool:
    """True while the process runs (a zombie has ended)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree_rss(pid: int) -> int | None:
    """Resident memory of a process and all its children, in bytes (None when it is gone)."""
    try:
        main = psutil.Process(pid)
        total = main.memory_info().rss
    except psutil.Error:
        return None
    for child in children(pid):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


def quarter_medians(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """Median RSS of the first and of the last quarter (by time) of `samples`."""
    if len(samples) < 8:
        return 0.0, 0.0
    start, end = samples[0][0], samples[-1][0]
    span = end - start
    first = [rss for t, rss in samples if t <= start + span / 4]
    last = [rss for t, rss in samples if t >= end - span / 4]
    return statistics.median(first), statistics.median(last)


def files_holding(folder: Path, secret: str, skip: tuple[str, ...] = ("bridgeData.yaml",)) -> list[str]:
    """Text files under `folder` (logs, outputs, journals) in which `secret` appears."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in skip or path.suffix not in (".log", ".out", ".json", ".txt", ".yaml"):
            continue
        if secret in path.read_text(errors="replace"):
            found.append(str(path.relative_to(folder)))
    return found


def journal_ids(journal: Path) -> set[str]:
    """Every job id the worker's journal holds."""
    ids: set[str] = set()
    for entry in journal.glob("*/job.json"):
        try:
            ids.update(json.loads(entry.read_text())["pop"]["ids"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ids


def largest_gap(times: list[float], start: float, end: float, excluded: list[tuple[float, float]]) -> float:
    """The longest stretch of [start, end] with no time in `times`, not counting the `excluded` windows."""
    points = sorted([start, *[t for t in times if start <= t <= end], end])
    longest = 0.0
    for a, b in zip(points, points[1:], strict=False):
        gap = b - a
        for lo, hi in excluded:
            gap -= max(0.0, min(b, hi) - max(a, lo))
        longest = max(longest, gap)
    return longest


def wait_until(condition, timeout: float, interval: float = 0.5) -> bool:
    """Poll `condition()` until it holds or `timeout` passes; returns whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
