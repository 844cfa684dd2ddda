"""HTTP client for the worker's side of the horde API.

Transient failures (connection errors, resets, timeouts, 5xx, 429) are retried with
exponential backoff and full jitter, honouring Retry-After. Answers the worker must act on are
turned into typed outcomes. The API key lives only in a request header: it is never part of
a message, a repr or a URL.
"""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from loguru import logger
from pydantic import ValidationError

from horde_worker import BRIDGE_AGENT
from horde_worker.horde.urls import refuse_reason
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

    def download(self, url: str, max_bytes: int, retry: RetryPolicy | None = None, *, allow_private: bool = True,
                 max_redirects: int = 3, max_seconds: float = 60.0) -> bytes:
        """GET a source image's URL (no API key goes there), refusing bodies over `max_bytes`.

        Redirects are followed by hand, at most `max_redirects` of them, and every hop must pass
        `urls.refuse_reason(hop, allow_private)` before anything connects to it. Transient failures,
        a transfer cut mid-body included, are retried under `retry`; a body still arriving after
        `max_seconds` is given up (a server trickling bytes cannot hold a thread for hours). Every
        failure raises HordeUnreachable; DownloadRefused (a subclass) when the URL must not be
        fetched at all.
        """
        retry = retry or self.retry
        what = f"download of {redact_url(url)}"
        problem = ""
        for attempt in range(retry.attempts):
            try:
                return self._download_once(url, max_bytes, allow_private, max_redirects, what,
                                           time.monotonic() + max_seconds)
            except _TransientDownload as exc:
                problem, retry_after = str(exc), exc.retry_after
            if attempt + 1 < retry.attempts:
                delay = retry.delay(attempt, retry_after)
                logger.debug("{} failed ({}), retry {} in {:.2f}s", what, problem, attempt + 1, delay)
                self._sleep(delay)
        raise HordeUnreachable(f"{what}: {problem} after {retry.attempts} attempts")

    def _download_once(self, url: str, max_bytes: int, allow_private: bool, max_redirects: int, what: str,
                       deadline: float) -> bytes:
        hop = url
        for _ in range(max_redirects + 1):
            reason = refuse_reason(hop, allow_private)
            if reason is not None:
                raise DownloadRefused(f"{what} refused: {reason}")
            try:
                # identity: the byte cap then counts what is stored, with no decompression in between.
                response = self._session.get(hop, timeout=(min(5.0, self.timeout), self.timeout), stream=True,
                                             allow_redirects=False, headers={"Accept-Encoding": "identity"})
            except requests.RequestException as exc:
                # Only the exception's class: its text can hold the URL's signature.
                if isinstance(exc, ValueError):  # InvalidURL, InvalidSchema...: trying again cannot help
                    raise HordeUnreachable(f"{what}: {type(exc).__name__}") from None
                raise _TransientDownload(type(exc).__name__) from None
            with response:
                status = response.status_code
                if status in REDIRECT_STATUS:
                    location = response.headers.get("Location")
                    if not location:
                        raise HordeUnreachable(f"{what}: HTTP {status} without a Location")
                    hop = urljoin(hop, location)
                    continue
                if status in TRANSIENT_STATUS:
                    raise _TransientDownload(f"HTTP {status}", _retry_after(response))
                if not 200 <= status < 300:
                    raise HordeUnreachable(f"{what}: HTTP {status}")
                return _read_capped(response, max_bytes, what, deadline)
        raise DownloadRefused(f"{what}: more than {max_redirects} redirects")


class DownloadRefused(HordeUnreachable):
    """A download the worker must not make: a forbidden scheme or address, or too many redirects."""


class _TransientDownload(Exception):
    """A download attempt that may work when tried again."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


REDIRECT_STATUS = {301, 302, 303, 307, 308}


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _body_pieces(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. urllib3 2's read1 returns what one receive brings, so the caller's
    checks run however slowly the bytes come; iter_content would wait for a whole chunk."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1.x
        yield from response.iter_content(8192)
        return
    while piece := read1(65536):
        yield piece


def _read_capped(response: requests.Response, max_bytes: int, what: str, deadline: float) -> bytes:
    """The body of `response`, refused once it passes `max_bytes` or `deadline` (monotonic); a cut
    transfer is transient."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise HordeUnreachable(f"{what}: larger than {max_bytes} bytes")
    chunks, size = [], 0
    try:
        for chunk in _body_pieces(response):
            size += len(chunk)
            if size > max_bytes:
                raise HordeUnreachable(f"{what}: larger than {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise HordeUnreachable(f"{what}: still arriving after the time limit ({size} bytes so far)")
            chunks.append(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
        raise _TransientDownload(f"{type(exc).__name__} after {size} bytes") from None
    return b"".join(chunks)
