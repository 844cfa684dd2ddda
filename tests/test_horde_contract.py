"""The horde client and the local horde against the contract and the real server's recorded answers."""

from __future__ import annotations

import json
import time

import pytest
import requests
from loguru import logger

from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy, SubmitOutcome
from horde_worker.horde.wire import GenMetadata, PopRequest, PopResponse, SubmitRequest
from horde_worker.localhorde import FaultPlan, LocalHorde, RateLimit, ServerOptions
from tests.conftest import SHARED_DATA

RECORDED = json.loads((SHARED_DATA / "horde-recorded.json").read_text())["calls"]


def recorded(name: str) -> dict:
    return next(call for call in RECORDED if call["name"] == name)


def fast_client(horde: LocalHorde, key: str | None = None, attempts: int = 4) -> HordeClient:
    return HordeClient(horde.url, key if key is not None else horde.api_key,
                       retry=RetryPolicy(attempts=attempts, base_delay=0.01, max_delay=0.05))


def add(horde: LocalHorde, **params) -> str:
    body = {"prompt": "a cat ### dog", "params": {"steps": 10, "n": 1, **params}}
    return requests.post(f"{horde.url}/v2/generate/async", json=body, timeout=5).json()["id"]


def pop(client: HordeClient, amount: int = 4, **extra) -> PopResponse:
    return client.pop(PopRequest(name="w1", models=["m1"], bridge_agent="test:1:x", amount=amount, **extra))


@pytest.fixture
def horde():
    with LocalHorde(["m1"], options=ServerOptions(sweep_interval=3600)) as h:
        yield h


def test_recorded_no_job_pop_parses_as_no_job_despite_payload():
    answer = recorded("pop_no_job")["response"]
    parsed = PopResponse.model_validate(answer)
    assert answer["payload"] and not parsed.has_job


def test_recorded_batch_pop_parses_with_string_seed():
    parsed = PopResponse.model_validate(recorded("pop_txt2img_batch")["response"])
    assert parsed.has_job and len(parsed.ids) == 2 == parsed.payload.n_iter
    assert parsed.payload.seed == "879064477"
    body = SubmitRequest(id=parsed.ids[0], generation="R2", seed=int(parsed.payload.seed)).to_wire()
    assert body == recorded("submit_ok_r2")["request_body"]


def test_local_pop_answers_have_the_recorded_shapes(horde):
    client = fast_client(horde)
    empty = requests.post(f"{horde.url}/v2/generate/pop", headers={"apikey": horde.api_key},
                          json={"name": "w1", "models": ["m1"], "amount": 4}, timeout=5).json()
    assert set(recorded("pop_no_job")["response"]) <= set(empty)
    assert empty["ids"] == [] and empty["id"] is None and empty["payload"]
    add(horde, n=2)
    job = requests.post(f"{horde.url}/v2/generate/pop", headers={"apikey": horde.api_key},
                        json={"name": "w1", "models": ["m1"], "amount": 4}, timeout=5).json()
    real = recorded("pop_txt2img_batch")["response"]
    assert set(real) <= set(job)
    assert set(real["payload"]) - {"prompt"} <= set(job["payload"])
    assert isinstance(job["payload"]["seed"], str) and len(job["ids"]) == 2 == len(job["r2_uploads"])
    assert client.heartbeat()["message"] == "OK"


def test_batching_by_amount_and_seed_variation(horde):
    client = fast_client(horde)
    add(horde, n=5, seed="42", seed_variation=3)
    first, second = pop(client, amount=3), pop(client, amount=3)
    assert len(first.ids) == 3 and len(second.ids) == 2
    assert first.payload.seed == "45" and second.payload.seed == "48"


def test_submit_outcomes_duplicate_aborted_invalid_and_seed_type(horde):
    client = fast_client(horde)
    add(horde)
    job = pop(client)
    as_string = {"id": job.ids[0], "generation": "R2", "seed": job.payload.seed}
    answer = requests.post(f"{horde.url}/v2/generate/submit", json=as_string, headers={"apikey": horde.api_key},
                           timeout=5)
    assert answer.status_code == 400 and "seed" in answer.json()["errors"]  # as the real server answers
    ok = SubmitRequest(id=job.ids[0], generation="R2", seed=int(job.payload.seed))
    assert client.submit(ok)[0] is SubmitOutcome.ACCEPTED
    assert client.submit(ok)[0] is SubmitOutcome.DUPLICATE
    assert client.submit(SubmitRequest(id="00000000-0000-0000-0000-000000000000", generation="R2",
                                       seed=1))[0] is SubmitOutcome.INVALID_ID


def test_ttl_abort_requeues_and_late_submit_is_aborted():
    with LocalHorde(["m1"], fixed_ttl=1, options=ServerOptions(sweep_interval=0.2)) as horde:
        client = fast_client(horde)
        request_id = add(horde)
        job = pop(client)
        assert job.ttl == 1
        time.sleep(job.ttl + 0.6)
        outcome, _ = client.submit(SubmitRequest(id=job.ids[0], generation="R2", seed=1))
        assert outcome is SubmitOutcome.ABORTED
        again = pop(client)
        assert again.has_job and again.ids != job.ids
        status = requests.get(f"{horde.url}/v2/generate/status/{request_id}", timeout=5).json()
        assert status["restarted"] == 1


def test_ttl_formula_follows_the_server():
    from horde_worker.localhorde.rules import job_ttl

    assert job_ttl({"steps": 30}) == 150
    assert job_ttl({"steps": 50, "width": 1024, "height": 1024}) == 430
    assert job_ttl({"steps": 50, "width": 1024, "height": 1024, "sampler_name": "k_heun"}) == 830
    assert job_ttl({"steps": 30}, extra_slow=True) == 450


def test_faulted_jobs_requeue_and_too_many_put_the_worker_in_maintenance(horde):
    client = fast_client(horde)
    for _ in range(3):  # the horde gives up on a request after 10 restarts
        add(horde, n=1)
    for _ in range(21):
        job = pop(client)
        assert job.has_job
        meta = [GenMetadata(type="source_image", value="download_failed")]
        reward = client.submit(SubmitRequest(id=job.ids[0], generation="R2", seed=1, state="faulted",
                                             gen_metadata=meta))
        assert reward == (SubmitOutcome.ACCEPTED, 0.0)
    with pytest.raises(HordeError) as err:
        pop(client)
    assert err.value.status == 403 and err.value.rc == "WorkerMaintenance"
    worker_id = client.find_user()["worker_ids"][0]
    assert client.get_worker(worker_id)["maintenance_mode"] is True
    assert client.set_maintenance(worker_id, False) == {"maintenance": False}
    assert pop(client).has_job


def test_identity_errors(horde):
    assert_rc = [(fast_client(horde, "0000000000"), 403, "AnonForbiddenWorker"),
                 (fast_client(horde, "not-a-key"), 401, "InvalidAPIKey")]
    for client, status, rc in assert_rc:
        with pytest.raises(HordeError) as err:
            pop(client)
        assert (err.value.status, err.value.rc) == (status, rc)
    with pytest.raises(HordeError) as err:
        fast_client(horde).pop(PopRequest(name="w1", models=["unknown"], bridge_agent="x"))
    assert err.value.rc == "BadRequest" and "unrecognised models" in err.value.message


def test_retries_5xx_resets_and_429_with_retry_after(horde):
    client = fast_client(horde, attempts=30)
    horde.set_faults({"heartbeat": FaultPlan(rate=0.6, kinds=("500", "503", "reset", "429"))})
    for _ in range(10):
        assert client.heartbeat()["message"] == "OK"
    assert sum(horde.faults_injected.values()) > 0
    horde.set_faults({"heartbeat": FaultPlan(rate=1.0, kinds=("503",))})
    with pytest.raises(HordeUnreachable, match="HTTP 503 after 30 attempts"):
        client.heartbeat()


def test_rate_limit_answers_429_with_retry_after():
    options = ServerOptions(rate_limits={"pop": RateLimit(2, 60.0), "*": RateLimit(100, 1.0)})
    with LocalHorde(["m1"], options=options) as horde:
        headers = {"apikey": horde.api_key}
        body = {"name": "w1", "models": ["m1"]}
        codes = [requests.post(f"{horde.url}/v2/generate/pop", json=body, headers=headers, timeout=5)
                 for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert float(codes[2].headers["Retry-After"]) > 0
        slept = []
        client = HordeClient(horde.url, horde.api_key, retry=RetryPolicy(attempts=2), sleep=slept.append)
        with pytest.raises(HordeUnreachable, match="HTTP 429"):
            pop(client)
        assert slept and slept[0] > 1.0  # honoured Retry-After instead of a short backoff


def test_api_key_never_appears_in_logs_or_reprs(horde):
    secret = "super-secret-key-123"
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", diagnose=True, backtrace=True)
    try:
        client = HordeClient("http://127.0.0.1:9", secret, retry=RetryPolicy(attempts=2, base_delay=0.01))
        try:
            client.heartbeat()
        except HordeUnreachable:
            logger.exception("heartbeat failed")
    finally:
        logger.remove(sink)
    assert lines and not any(secret in line for line in lines)
    assert secret not in repr(client) and secret not in repr(vars(client))


def test_tests_cannot_reach_the_internet(tmp_path):
    """The suite's network guard: non-loopback hosts fail at once, here and in child processes."""
    import socket
    import subprocess
    import sys

    import pytest
    import requests

    with pytest.raises(requests.ConnectionError, match="not a loopback host"):
        requests.get("https://github.com/", timeout=5)
    with pytest.raises(OSError, match="test network guard"):
        socket.create_connection(("1.1.1.1", 443), timeout=5)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with raw, pytest.raises(ConnectionRefusedError, match="not a loopback address"):
        raw.connect(("93.184.216.34", 80))
    child = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('example.com', 80)"],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode != 0 and "not a loopback host" in child.stderr
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname(), timeout=5):
        pass  # loopback still works


def test_a_cut_or_invalid_pop_answer_is_never_read_as_no_job(horde):
    from horde_worker.horde.client import MalformedPop

    client = HordeClient(horde.url, horde.api_key, retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))
    request = PopRequest(name="w", models=["m1"], bridge_agent="t:1:x")
    horde.state.pop = lambda apikey, body, base: b'{"id": "abc", "ids": ["abc"], "payl'
    with pytest.raises(HordeUnreachable, match="unreadable answer"):
        client.pop(request)
    horde.state.pop = lambda apikey, body, base: {"id": "abc", "ids": "abc", "payload": {"prompt": 5}}
    with pytest.raises(MalformedPop) as caught:
        client.pop(request)
    assert caught.value.raw["id"] == "abc" and "ids" in caught.value.problem and "prompt" in caught.value.problem
