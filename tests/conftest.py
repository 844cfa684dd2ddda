"""Shared fixtures: tiny real-architecture models, a local horde, a worker started as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from horde_worker.inference.tiny import DEMO_MODEL_NAME, ensure_demo_model
from horde_worker.localhorde import LocalHorde, ServerOptions

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests reach loopback hosts only: this process and every process it starts load the guard.
NETGUARD = Path(__file__).resolve().parent / "netguard"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(NETGUARD))
import sitecustomize  # noqa: E402, F401  (the guard, for this process)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory, postprocessor_cache) -> Path:
    """A cache_home with the tiny demo checkpoint in its compvis/ folder (and the post-processors' files,
    linked: local mode would otherwise write another gigabyte of them)."""
    cache = tmp_path_factory.mktemp("cache")
    link_tree(postprocessor_cache, cache)
    ensure_demo_model(cache)
    from horde_worker.safety.tiny import write_tiny_clip

    write_tiny_clip(cache / "clip" / "tiny-clip-clean.safetensors", ["landscape", "mountain"])
    return cache


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file under `source` to the same place under `target`."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target / path.relative_to(source))


@pytest.fixture(scope="session")
def postprocessor_cache(tmp_path_factory) -> Path:
    """Local weights for every post-processor but 4xNomos2_hq_dat2 (whose absence a job must be told of)."""
    from horde_worker.inference.tiny_postprocess import write_all

    cache = tmp_path_factory.mktemp("postprocessors")
    write_all(cache)
    (cache / "esrgan" / "4xNomos2_hq_dat2.safetensors").unlink()
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoint(model_cache) -> Path:
    return model_cache / "compvis" / "horde-worker-tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def safety(model_cache, tmp_path_factory):
    """A real safety process on the tiny clean CLIP, for in-process supervisors (tests/supervisor_harness.py)."""
    from horde_worker.supervisor.safety_client import SafetyClient

    client = SafetyClient(model_cache / "clip" / "tiny-clip-clean.safetensors", "cpu",
                          str(tmp_path_factory.mktemp("safety-logs")))
    client.start()
    yield client
    client.stop()


@pytest.fixture
def horde() -> Iterator[LocalHorde]:
    """The local horde serving the demo model, sweeping expired jobs twice a second, 60 s time limits."""
    server = LocalHorde([DEMO_MODEL_NAME], options=ServerOptions(sweep_interval=0.5), fixed_ttl=60).start()
    yield server
    server.stop()


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (a job's source image or mask)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def local_horde() -> Iterator[LocalHorde]:
    horde = LocalHorde([DEMO_MODEL_NAME], options=ServerOptions(sweep_interval=1.0)).start()
    yield horde
    horde.stop()


def job_request(**overrides):
    """A GenerateRequest for a tiny SD1 model with the tests' usual defaults; `overrides` win."""
    from horde_worker.inference.messages import GenerateRequest

    fields = dict(job_id="j", model_name="tiny", model_path="", baseline="stable_diffusion_1", prompt="a cat",
                  negative_prompt="", width=128, height=128, steps=4, cfg_scale=7.0, sampler_name="k_euler",
                  karras=False, seeds=[7])
    fields.update(overrides)
    return GenerateRequest(**fields)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    """Poll until `condition()` holds, or fail the test naming `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerProcess:
    """The worker started with `python -m horde_worker` in its own folder."""

    def __init__(self, folder: Path, settings: dict, extra_args: list[str] | None = None, *,
                 env: dict[str, str] | None = None, new_session: bool = False, append: bool = False) -> None:
        self.folder = folder
        (folder / "bridgeData.yaml").write_text(yaml.safe_dump(settings))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HORDE_WORKER_CPU_THREADS": "2", **(env or {})}
        full_env = {k: v for k, v in full_env.items() if not k.startswith("AIWORKER_")}
        self.log = open(folder / "worker.out", "a" if append else "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "horde_worker", "--device", "cpu", *(extra_args or [])],
            cwd=folder, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=new_session,
        )

    def output(self) -> str:
        self.log.flush()
        return (self.folder / "worker.out").read_text(errors="replace")

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


def worker_settings(folder: Path, model_cache: Path, horde_url: str, api_key: str, cache_with: Path | None = None,
                    **overrides) -> dict:
    """bridgeData for a test worker in `folder`: the tiny model linked into its own cache_home (with the
    files under `cache_with` too), the tiny safety CLIP, a quiet console; `overrides` win."""
    cache = folder / "cache"
    (cache / "compvis").mkdir(parents=True, exist_ok=True)
    if cache_with:  # other weights, linked in
        link_tree(cache_with, cache)
    demo = model_cache / "compvis" / "horde-worker-tiny-sd15.safetensors"
    target = cache / "compvis" / demo.name
    if not target.exists():
        os.link(demo, target)
    return {
        "horde_url": horde_url, "api_key": api_key, "dreamer_name": "test-worker",
        "models_to_load": [DEMO_MODEL_NAME], "cache_home": str(cache), "max_threads": 1,
        "queue_size": 1, "max_batch": 4, "max_power": 8, "stats_output_frequency": 5,
        "limited_console_messages": True, "model_reference_url": "",
        "safety_model": str(model_cache / "clip" / "tiny-clip-clean.safetensors"),
        # Post-processor weights would be downloaded from the internet: tests that want them link local ones.
        "allow_post_processing": False,
        **overrides,
    }


@pytest.fixture
def start_worker(tmp_path, model_cache) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(horde: LocalHorde, cache_with: Path | None = None, **overrides) -> WorkerProcess:
        settings = worker_settings(tmp_path, model_cache, horde.url, horde.api_key, cache_with, **overrides)
        worker = WorkerProcess(tmp_path, settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class GroupWorkerProcess(WorkerProcess):
    """The worker in its own session, so its own process group: Ctrl+C can reach every process of it at
    once, as a terminal sends it, and teardown kills whatever it left. A restart in the same folder adds
    to the same worker.out."""

    def __init__(self, folder: Path, settings: dict, env: dict[str, str] | None = None) -> None:
        super().__init__(folder, settings, env=env, new_session=True, append=True)
        self.pgid = self.process.pid

    def interrupt_group(self) -> None:
        """SIGINT to the whole process group, as Ctrl+C in a terminal."""
        os.killpg(self.pgid, signal.SIGINT)

    def kill_group(self) -> None:
        """SIGKILL to every process left in the group."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:  # nothing left
            return

    def stop(self) -> None:
        self.kill_group()
        super().stop()


@pytest.fixture
def start_group_worker(tmp_path, model_cache) -> Iterator[Callable[..., GroupWorkerProcess]]:
    """`start(horde_url, api_key, env=None, **settings)`: a GroupWorkerProcess in tmp_path with the tiny
    model; called again, it starts the worker again in the same folder (same cache, same journal)."""
    started: list[GroupWorkerProcess] = []

    def start(horde_url: str, api_key: str, env: dict[str, str] | None = None, **overrides) -> GroupWorkerProcess:
        settings = worker_settings(tmp_path, model_cache, horde_url, api_key, **overrides)
        worker = GroupWorkerProcess(tmp_path, settings, env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
