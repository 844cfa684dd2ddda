"""HTTP client for the worker's side of the horde API.

Transient failures (connection errors, resets, timeouts, 5xx, 429) are retried with
exponential backoff and full jitter, honouring Retry-After. Answers the worker must act on are
turned into typed outcomes. The API key lives only in a request header: it is never part of
a message, a repr or a URL.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import requests
from loguru import logger
from pydantic import ValidationError

from horde_worker import BRIDGE_AGENT
from horde_worker.horde.wire import PopRequest, PopResponse, SubmitRequest


class _Secret:
    """Holds the API key so that no repr, log line or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'**********'"

    __str__ = __repr__


class HordeError(Exception):
    """An error answer of the horde: HTTP status, `rc` code and message."""

    def __init__(self, status: int, rc: str, message: str) -> None:
        super().__init__(f"{status} {rc}: {message}")
        self.status = status
        self.rc = rc
        self.message = message


class HordeUnreachable(Exception):
    """The horde could not be reached or kept failing after every retry."""


class MalformedPop(Exception):
    """A pop answer that does not read as a job: `raw` is what came, `problem` what is wrong with it."""

    def __init__(self, raw: Any, problem: str) -> None:
        super().__init__(problem)
        self.raw = raw
        self.problem = problem


class SubmitOutcome(Enum):
    """What became of a submit."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # already submitted: counts as done
    ABORTED = "aborted"  # the horde gave up on the job (TTL): final
    INVALID_ID = "invalid_id"  # unknown job id: final


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential delay before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return min(self.max_delay, retry_after)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


TRANSIENT_STATUS = {429, 500, 502, 503, 504, 520, 521, 522, 524}


def redact_url(url: str) -> str:
    """A presigned URL without its signature, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class HordeClient:
    """Talks to one horde at `base_url` (for example https://aihorde.net/api)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = _Secret(api_key)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._sleep = sleep
        self._session = requests.Session()
        self._session.headers["User-Agent"] = BRIDGE_AGENT
        self._session.headers["Client-Agent"] = BRIDGE_AGENT

    def __repr__(self) -> str:
        return f"HordeClient({self.base_url!r})"

    def _send(self, method: str, url: str, *, authed: bool, retry: RetryPolicy, what: str, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if authed:
            headers["apikey"] = self._api_key.reveal()
        last_problem = ""
        for attempt in range(retry.attempts):
            retry_after = None
            try:
                response = self._session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                # Only the exception's class: its text can hold the URL's signature.
                last_problem = type(exc).__name__
            else:
                if response.status_code not in TRANSIENT_STATUS:
                    return response
                last_problem = f"HTTP {response.status_code}"
                header = response.headers.get("Retry-After")
                if header:
                    try:
                        retry_after = float(header)
                    except ValueError:
                        retry_after = None
            if attempt + 1 < retry.attempts:
                delay = retry.delay(attempt, retry_after)
                logger.debug("{} failed ({}), retry {} in {:.2f}s", what, last_problem, attempt + 1, delay)
                self._sleep(delay)
        raise HordeUnreachable(f"{what}: {last_problem} after {retry.attempts} attempts")

    def _api(self, method: str, path: str, *, retry: RetryPolicy | None = None, **kwargs) -> Any:
        response = self._send(
            method, f"{self.base_url}/v2/{path.lstrip('/')}", authed=True, retry=retry or self.retry,
            what=f"{method} /v2/{path.split('?')[0]}", **kwargs,
        )
        try:
            data = response.json()
        except ValueError:
            if response.status_code < 400:  # a 200 cut short or garbled: never read it as "nothing"
                raise HordeUnreachable(f"{method} /v2/{path.split('?')[0]}: unreadable answer "
                                       f"(HTTP {response.status_code}, {len(response.content)} bytes)") from None
            data = {}
        if response.status_code >= 400:
            if not isinstance(data, dict):
                data = {}
            rc = data.get("rc") or ("ValidationError" if "errors" in data else "Unknown")
            message = data.get("message", response.reason or "")
            if "errors" in data:
                message = f"{message} {data['errors']}"
            raise HordeError(response.status_code, rc, message)
        return data

    # --- the calls a worker makes -------------------------------------------------------------

    def heartbeat(self) -> dict[str, Any]:
        """GET /v2/status/heartbeat."""
        return self._api("GET", "status/heartbeat")

    def find_user(self) -> dict[str, Any]:
        """GET /v2/find_user: the owner of the API key."""
        return self._api("GET", "find_user")

    def get_worker(self, worker_id: str) -> dict[str, Any]:
        """GET /v2/workers/{id}."""
        return self._api("GET", f"workers/{worker_id}")

    def get_worker_by_name(self, name: str) -> dict[str, Any]:
        """GET /v2/workers/name/{name}."""
        return self._api("GET", f"workers/name/{requests.utils.quote(name, safe='')}")

    def set_maintenance(self, worker_id: str, maintenance: bool, message: str | None = None) -> dict[str, Any]:
        """PUT /v2/workers/{id} with the maintenance flag (owner only)."""
        body: dict[str, Any] = {"maintenance": maintenance}
        if message:
            body["maintenance_msg"] = message
        return self._api("PUT", f"workers/{worker_id}", json=body)

    def model_stats(self) -> dict[str, Any]:
        """GET /v2/stats/img/models?model_state=known."""
        return self._api("GET", "stats/img/models?model_state=known")

    def pop(self, request: PopRequest, retry: RetryPolicy | None = None) -> PopResponse:
        """POST /v2/generate/pop."""
        data = self._api("POST", "generate/pop", json=request.model_dump(), retry=retry)
        if not isinstance(data, dict):
            raise MalformedPop(data, f"the answer is a {type(data).__name__}, not an object")
        try:
            return PopResponse.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise MalformedPop(data, problems) from None

    def submit(self, request: SubmitRequest, retry: RetryPolicy | None = None) -> tuple[SubmitOutcome, float]:
        """POST /v2/generate/submit; returns the outcome and the reward."""
        try:
            data = self._api("POST", "generate/submit", json=request.to_wire(), retry=retry)
        except HordeError as exc:
            if exc.rc == "DuplicateGen":
                return SubmitOutcome.DUPLICATE, 0.0
            if exc.rc == "AbortedGen":
                return SubmitOutcome.ABORTED, 0.0
            if exc.rc == "InvalidJobID":
                return SubmitOutcome.INVALID_ID, 0.0
            raise
        reward = data.get("reward", 0.0) if isinstance(data, dict) else 0.0
        try:
            return SubmitOutcome.ACCEPTED, float(reward or 0.0)
        except (TypeError, ValueError):
            return SubmitOutcome.ACCEPTED, 0.0

    def upload(self, url: str, data: bytes, retry: RetryPolicy | None = None) -> None:
        """PUT image bytes to a presigned URL (no API key goes there)."""
        response = self._send(
            "PUT", url, authed=False, retry=retry or self.retry, what=f"upload to {redact_url(url)}",
            data=data, headers={"Content-Type": "image/webp"},
        )
        if response.status_code >= 400:
            raise HordeUnreachable(f"upload to {redact_url(url)} refused: HTTP {response.status_code}")

    def download(self, url: str, max_bytes: int, retry: RetryPolicy | None = None) -> bytes:
        """GET a presigned URL (a source image), refusing bodies over `max_bytes`."""
        response = self._send(
            "GET", url, authed=False, retry=retry or self.retry, what=f"download of {redact_url(url)}", stream=True
        )
        if response.status_code >= 400:
            raise HordeUnreachable(f"download of {redact_url(url)}: HTTP {response.status_code}")
        chunks, size = [], 0
        for chunk in response.iter_content(65536):
            size += len(chunk)
            if size > max_bytes:
                raise HordeUnreachable(f"download of {redact_url(url)}: larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
