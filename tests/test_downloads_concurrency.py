"""Downloads side by side and offline: one transfer per file however many ask, part files never
shared between processes, held adapters never evicted, and no connection at all fails in seconds
with a message that says where to put the file by hand."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from horde_worker.inference.messages import AdapterFile
from horde_worker.localhorde.civitai import CivitaiModel, LocalCivitai
from horde_worker.models.civitai import AdapterCache
from horde_worker.models.download import DownloadError, DownloadTask, HostUnreachable, download, download_all
from horde_worker.models.safety_files import SafetyWeightsMissing, prepare_safety
from horde_worker.supervisor.inputs import AdapterCaches
from tests.conftest import REPO
from tests.fileserver import FileServer


def payload(size: int = 1 << 20) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def wait_until(condition, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def in_threads(count: int, target) -> tuple[list, list]:
    results, errors = [], []

    def run() -> None:
        try:
            results.append(target())
        except Exception as exc:  # the test looks at every thread's outcome
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, [results, errors]


def test_two_threads_asking_for_one_file_share_one_transfer(tmp_path):
    data, sha = payload()
    with FileServer() as server:
        server.files["/m"] = data
        server.gate.clear()
        task = DownloadTask(f"{server.url}/m", tmp_path / "m.safetensors", sha, len(data))
        threads, (results, errors) = in_threads(2, lambda: download(task))
        wait_until(lambda: server.requests)
        time.sleep(0.4)  # time enough for a second request, were one to be sent
        server.gate.set()
        for thread in threads:
            thread.join(30)
        assert errors == [] and results == [task.dest, task.dest]
        assert server.requests == [("/m", None)]
    assert task.dest.read_bytes() == data and list(tmp_path.iterdir()) == [task.dest]


def test_two_processes_never_share_a_part_file(tmp_path):
    data, sha = payload(4 << 20)
    with FileServer() as server:
        server.files["/m"] = data
        server.gate.clear()
        dest = tmp_path / "m.safetensors"
        threads, (results, errors) = in_threads(1, lambda: download(DownloadTask(f"{server.url}/m", dest, sha)))
        other = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from horde_worker.models.download import DownloadTask, download; "
             "download(DownloadTask(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))", f"{server.url}/m", str(dest), sha],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: len(server.requests) == 2, 60)  # both transfers are under way
            server.gate.set()
            output, _ = other.communicate(timeout=60)
        finally:
            other.kill()
        threads[0].join(30)
    assert errors == [] and results == [dest]
    assert other.returncode == 0, output
    assert dest.read_bytes() == data and list(tmp_path.iterdir()) == [dest]


class RoutedCivitai(LocalCivitai):
    """CivitAI whose download URLs point at a test file server (which can hold a transfer)."""

    def __init__(self, models, files: FileServer) -> None:
        super().__init__(models)
        self.files = files
        for model in models:
            files.files[f"/lora/{model.version_id}"] = model.data

    def answer(self, path, query):
        status, body = super().answer(path, query)
        for version in body.get("modelVersions", []) if isinstance(body, dict) else []:
            for file in version["files"]:
                file["downloadUrl"] = f"{self.files.url}/lora/{version['id']}"
        return status, body


def lora_model(model_id: int) -> CivitaiModel:
    return CivitaiModel(model_id=model_id, version_id=model_id * 10, name=f"Lora {model_id}", kind="LORA",
                        base_model="SD 1.5", data=os.urandom(200_000 + model_id))


@pytest.fixture
def routed():
    with FileServer() as files:
        civitai = RoutedCivitai([lora_model(i) for i in (101, 102, 103, 104)], files).start()
        yield civitai, files
        civitai.stop()


def test_two_jobs_asking_for_one_uncached_lora_download_it_once(routed, tmp_path):
    civitai, files = routed
    cache = AdapterCache("lora", tmp_path / "lora", 1 << 30, api_url=civitai.url, timeout=5)
    files.gate.clear()
    threads, (results, errors) = in_threads(3, lambda: cache.fetch("101"))
    wait_until(lambda: files.requests)
    time.sleep(0.4)
    files.gate.set()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(results) == 3
    assert {path for path, _ in results} == {tmp_path / "lora" / "1010.safetensors"}
    assert results[0][0].read_bytes() == civitai.models[101].data
    assert files.requests == [("/lora/1010", None)]
    assert not list((tmp_path / "lora").glob("*.part"))


def test_adapters_handed_to_jobs_stay_until_released_or_their_hold_ends(routed, tmp_path):
    civitai, _files = routed
    size = len(civitai.models[101].data)
    cache = AdapterCache("lora", tmp_path / "lora", int(size * 1.5), api_url=civitai.url, timeout=5, hold_seconds=1.0)
    first, _ = cache.fetch("101")
    cache.fetch("101")  # a second job gets the same file
    second, _ = cache.fetch("102")
    assert first.exists() and second.exists()  # over the cap while both are in use
    cache.release(first)
    third, _ = cache.fetch("103")
    assert first.exists() and second.exists() and third.exists()  # the second job still has it
    cache.release(first)
    fourth, _ = cache.fetch("104")
    assert not first.exists() and second.exists() and third.exists() and fourth.exists()
    time.sleep(1.1)
    again, _ = cache.fetch("101")
    assert again.exists() and not any(p.exists() for p in (second, third, fourth))
    assert cache.cached_bytes() <= int(size * 1.5)


def test_a_zero_sized_worker_cache_still_hands_out_the_file(routed, tmp_path):
    civitai, _files = routed
    caches = AdapterCaches.from_settings(str(tmp_path), 0, civitai.url, "")
    path, _ = caches.loras.fetch("101")
    assert path.read_bytes() == civitai.models[101].data  # not evicted the moment it arrived
    caches.release([AdapterFile(name="101", path=str(path))])
    caches.loras.fetch("102")
    assert not path.exists()


# --- resuming ---------------------------------------------------------------------------------

def test_a_transfer_cut_many_times_is_still_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    data, sha = payload()
    with FileServer() as server:
        server.files["/m"] = data
        server.cuts["/m"] = [100_000, 200_000, 300_000, 150_000]  # more cuts than tries to connect
        dest = tmp_path / "m.safetensors"
        download(DownloadTask(f"{server.url}/m", dest, sha, len(data)))
        ranges = [r for _, r in server.requests]
    assert dest.read_bytes() == data and len(ranges) == 5 and ranges[0] is None
    assert all(r and r.startswith("bytes=") for r in ranges[1:])


def test_an_abandoned_part_is_resumed_and_a_running_downloads_part_left_alone(tmp_path):
    data, sha = payload()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dest = tmp_path / "m.safetensors"
        abandoned = tmp_path / f"m.safetensors.{finished.pid}-1-ab.part"
        abandoned.write_bytes(data[:1000])
        busy = tmp_path / f"m.safetensors.{running.pid}-1-cd.part"
        busy.write_bytes(data[:5000])
        unrelated = tmp_path / "m.safetensors.old.part"  # the part file of another file, m.safetensors.old
        unrelated.write_bytes(b"x")
        with FileServer() as server:
            server.files["/m"] = data
            download(DownloadTask(f"{server.url}/m", dest, sha))
            assert server.requests == [("/m", "bytes=1000-")]
        assert dest.read_bytes() == data and not abandoned.exists()
        assert busy.read_bytes() == data[:5000] and unrelated.read_bytes() == b"x"
    finally:
        running.kill()
        running.wait()


# --- offline ----------------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("url", ["https://models.example.invalid/sd/m.safetensors", "http://127.0.0.1:{port}/m"])
def test_no_connection_at_all_fails_in_seconds_and_says_how_to_place_the_file(tmp_path, url):
    url = url.format(port=closed_port())
    dest = tmp_path / "compvis" / "m.safetensors"
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as failure:
        download(DownloadTask(url, dest, "00" * 32))
    assert time.monotonic() - started < 6
    message = str(failure.value)
    assert url in message and str(dest.parent) in message and "m.safetensors" in message
    assert not dest.exists()


def test_an_offline_first_start_reports_the_missing_safety_model_in_seconds(tmp_path):
    started = time.monotonic()
    with pytest.raises(SafetyWeightsMissing) as failure:
        prepare_safety("", str(tmp_path), show_progress=False)
    assert time.monotonic() - started < 6
    message = str(failure.value)
    assert "ViT-L-14.pt" in message and str(tmp_path / "clip") in message and "openaipublic" in message


def test_other_files_of_an_unreachable_host_are_not_tried(tmp_path):
    port = closed_port()
    tasks = [DownloadTask(f"http://127.0.0.1:{port}/{name}", tmp_path / name, None) for name in ("a", "b", "c")]
    started = time.monotonic()
    errors = download_all(tasks, show_progress=False)
    assert time.monotonic() - started < 6
    assert len(errors) == 3 and all("not tried" in e for e in errors[1:])
    assert all(str(tmp_path) in e for e in errors)


def test_a_missing_file_fails_at_once(tmp_path):
    with FileServer() as server:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(DownloadTask(f"{server.url}/nothing", tmp_path / "m", None))
        assert len(server.requests) == 1
