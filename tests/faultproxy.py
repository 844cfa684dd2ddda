"""A fault-injecting HTTP proxy between the worker and the local horde, with a log of every job id.

The worker's `horde_url` points at the proxy. Every call (`/api/...` and `/r2/...`) is forwarded to
the local horde and the horde's root URL in each answer is rewritten to the proxy's, so the presigned
uploads and source downloads a pop hands out come through the proxy too. By endpoint (pop, submit,
upload, download, other) and seeded chance the proxy answers 500/502/503, 429 with Retry-After,
resets the connection before forwarding or after (the call took effect, its answer is lost), answers
a few seconds late, or cuts a 200 answer half-way (with a Content-Length that claims the whole body,
or one that matches the cut). A share of the pops that carry a job are spoiled (`malformed_jobs`),
ids kept, so that the worker has to fault them.

Started with `HTTP_PROXY`/`HTTPS_PROXY` pointing at the proxy (and loopback in `NO_PROXY`), a worker's
request for any other host arrives here as well: it is refused, never made, and logged.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.faultlog import ProxyLog, SubmitSeen
from tests.malformed_jobs import BOMB_PATH, MUTATIONS, SINGLE_ID_ONLY, png_bomb, real_png

ENDPOINTS = ("pop", "submit", "upload", "download", "other")
FAULT_KINDS = ("500", "502", "503", "429", "reset", "reset_after", "slow", "truncate_long", "truncate_short")
# Faults that only make sense on a 200 answer with a body; elsewhere they are not injected.
TRUNCATIONS = ("truncate_long", "truncate_short")
FORWARDED_HEADERS = ("apikey", "content-type", "user-agent", "client-agent", "accept")


@dataclass(frozen=True)
class Faults:
    """Injected failures for one endpoint: with probability `rate`, one of `kinds` (equally likely)."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("500",)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass(frozen=True)
class ProxyPlan:
    """What the proxy injects: per-endpoint faults and the share of job pops it spoils."""

    faults: dict[str, Faults] = field(default_factory=dict)
    malformed_rate: float = 0.0
    malformations: tuple[str, ...] = tuple(MUTATIONS)
    slow_seconds: tuple[float, float] = (2.0, 4.0)
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        if set(self.faults) - set(ENDPOINTS):
            raise ValueError(f"fault endpoints must be among {ENDPOINTS}")
        if set(self.malformations) - set(MUTATIONS):
            raise ValueError(f"malformations must be among {sorted(MUTATIONS)}")


def is_loopback(host: str | None) -> bool:
    """True for loopback names and addresses."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def endpoint_of(method: str, path: str) -> str:
    """The fault plan's name for a call."""
    if path.startswith("/r2/"):
        return "upload" if method == "PUT" else "download"
    if path == BOMB_PATH:
        return "download"
    if path.startswith("/api/v2/generate/pop"):
        return "pop"
    if path.startswith("/api/v2/generate/submit"):
        return "submit"
    return "other"


class FaultProxy:
    """The proxy: `FaultProxy(upstream_root_url, seed=..., plan=...).start()`; `.url` is a worker's horde_url."""

    def __init__(self, upstream_root_url: str, *, seed: int, plan: ProxyPlan, workdir: Path | None = None) -> None:
        upstream = urlsplit(upstream_root_url)
        if not is_loopback(upstream.hostname):
            raise ValueError("the fault proxy only forwards to a loopback horde")
        self.upstream_root = f"{upstream.scheme}://{upstream.netloc}"
        self._upstream = (upstream.hostname, upstream.port or 80)
        self.plan = plan
        self.log = ProxyLog()
        self._random = random.Random(seed)
        self._spoil_queue: list[str] = []
        self._lock = threading.Lock()
        folder = Path(workdir or tempfile.mkdtemp(prefix="faultproxy-"))
        self.file_source = real_png(folder / "file-source.png")
        self._bomb = png_bomb()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def root_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The API base a worker's `horde_url` points at."""
        return self.root_url + "/api"

    def proxy_env(self) -> dict[str, str]:
        """Environment that sends a worker's requests for non-loopback hosts here, to be refused and logged."""
        loopback = "127.0.0.1,localhost,::1"
        return {"HTTP_PROXY": self.root_url, "HTTPS_PROXY": self.root_url, "http_proxy": self.root_url,
                "https_proxy": self.root_url, "NO_PROXY": loopback, "no_proxy": loopback}

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_plan(self, plan: ProxyPlan) -> None:
        """Inject by `plan` from the next call on."""
        with self._lock:
            self.plan = plan

    # --- decisions (seeded, under the lock) --------------------------------------------------

    def _pick_fault(self, endpoint: str) -> str | None:
        with self._lock:
            faults = self.plan.faults.get(endpoint)
            if faults is None or faults.rate <= 0 or self._random.random() >= faults.rate:
                return None
            return self._random.choice(faults.kinds)

    def _pick_malformation(self, ids: list[str]) -> str | None:
        # Which pops are spoiled is chance; the kinds come round in a seeded order, so that a run of a
        # few dozen spoiled jobs has every kind.
        with self._lock:
            plan = self.plan
            if plan.malformed_rate <= 0 or self._random.random() >= plan.malformed_rate:
                return None
            for _ in range(2):
                if not self._spoil_queue:
                    self._spoil_queue = list(plan.malformations)
                    self._random.shuffle(self._spoil_queue)
                kind = next((m for m in self._spoil_queue if len(ids) == 1 or m not in SINGLE_ID_ONLY), None)
                if kind is not None:
                    self._spoil_queue.remove(kind)
                    return kind
                self._spoil_queue = []
            return None

    def _slow_seconds(self) -> float:
        with self._lock:
            return self._random.uniform(*self.plan.slow_seconds)

    # --- forwarding --------------------------------------------------------------------------

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() in ("content-type", "retry-after")}
            return response.status, kept, data
        finally:
            conn.close()

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream_root.encode(), self.root_url.encode())

    def _spoil(self, answer: dict[str, Any], kind: str) -> bytes:
        mutate, _expected = MUTATIONS[kind]
        mutate(answer, {"proxy_root": self.root_url, "file_source": self.file_source})
        return json.dumps(answer).encode()  # NaN stays NaN: Python's json reads it back

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # the test's output stays readable
                pass

            def _serve(self, method: str) -> None:
                received = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                target = urlsplit(self.path)
                # Absolute form: asked to act as a forward proxy, for another host.
                if (target.scheme or target.netloc) and not is_loopback(target.hostname):
                    proxy.log.refused_target(method, f"{target.scheme}://{target.netloc}{target.path}")
                    return self._reply(403, b"refused: not a loopback host", "text/plain", close=True)
                path = target.path + (f"?{target.query}" if target.query else "")
                endpoint = endpoint_of(method, target.path)
                proxy.log.call(endpoint)
                if target.path == BOMB_PATH:
                    return self._reply(200, proxy._bomb, "image/png")
                body = _json_or_none(raw) if endpoint in ("pop", "submit") else None
                job_id = _job_id(endpoint, target.path, body)
                fault = proxy._pick_fault(endpoint)
                if fault and fault not in TRUNCATIONS:
                    proxy.log.fault(endpoint, fault, job_id)
                if fault in ("500", "502", "503", "429", "reset"):
                    if endpoint == "submit":
                        proxy.log.submitted(body, _seen(body, received, fault, forwarded=False))
                    if fault == "reset":
                        return self._reset()
                    return self._error(int(fault), target.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED_HEADERS}
                try:
                    status, upstream_headers, data = proxy._forward(method, path, headers, raw)
                except OSError:
                    return self._error(502, target.path)
                if fault in TRUNCATIONS and (status != 200 or len(data) < 2):
                    fault = None  # nothing to cut
                elif fault in TRUNCATIONS:
                    proxy.log.fault(endpoint, fault, job_id)
                if endpoint == "submit":
                    rc = (_json_or_none(data) or {}).get("rc") if status != 200 else None
                    proxy.log.submitted(body, _seen(body, received, fault, forwarded=True, status=status, rc=rc))
                data = proxy._rewrite(data)
                if endpoint == "pop" and status == 200:
                    data = self._record_pop(received, data, fault)
                if fault == "slow":
                    time.sleep(proxy._slow_seconds())
                if fault == "reset_after":
                    return self._reset()
                content_type = upstream_headers.get("Content-Type", "application/json")
                if fault == "truncate_long":  # claims the full length, sends half, hangs up
                    return self._reply(status, data[: len(data) // 2], content_type, claimed=len(data), close=True)
                if fault == "truncate_short":  # a well-framed answer whose JSON is cut
                    return self._reply(status, data[: len(data) // 2], content_type)
                self._reply(status, data, content_type, retry_after=upstream_headers.get("Retry-After"))

            def _record_pop(self, received: float, data: bytes, fault: str | None) -> bytes:
                answer = _json_or_none(data)
                if not isinstance(answer, dict) or not answer.get("ids"):
                    return data
                withheld = fault in ("reset_after", *TRUNCATIONS)
                kind = None if withheld else proxy._pick_malformation(list(answer["ids"]))
                proxy.log.popped(received, answer, delivered=not withheld, withheld_by=fault if withheld else None,
                                 malformed=kind)
                if kind is None:
                    return data
                proxy.log.fault("pop", f"malformed:{kind}", answer["ids"][0])
                return proxy._spoil(answer, kind)

            def _error(self, status: int, path: str) -> None:
                if path.startswith("/api/"):
                    rc = "TooManyRequests" if status == 429 else "InternalServerError"
                    body = json.dumps({"message": "injected by the fault proxy", "rc": rc}).encode()
                    retry = f"{proxy.plan.retry_after:.2f}" if status == 429 else None
                    return self._reply(status, body, "application/json", retry_after=retry)
                retry = f"{proxy.plan.retry_after:.2f}" if status == 429 else None
                self._reply(status, b"injected by the fault proxy", "text/plain", retry_after=retry)

            def _reset(self) -> None:
                self.close_connection = True
                try:  # linger 0: the client sees a reset, not an orderly close
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _reply(self, status: int, data: bytes, content_type: str, *, retry_after: str | None = None,
                       claimed: int | None = None, close: bool = False) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(claimed if claimed is not None else len(data)))
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    if close:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:  # the worker hung up first
                    self.close_connection = True
                if close:
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_CONNECT(self) -> None:  # noqa: N802  (an HTTPS tunnel to somewhere: never)
                proxy.log.refused_target("CONNECT", self.path)
                self._reply(403, b"refused: not a loopback host", "text/plain", close=True)

        return Handler


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _job_id(endpoint: str, path: str, body: Any) -> str | None:
    if endpoint == "submit" and isinstance(body, dict) and isinstance(body.get("id"), str):
        return body["id"]
    if endpoint in ("upload", "download") and path.startswith("/r2/gen/"):
        return path.rsplit("/", 1)[-1].removesuffix(".webp")
    return None


def _seen(body: Any, at: float, fault: str | None, *, forwarded: bool, status: int | None = None,
          rc: str | None = None) -> SubmitSeen:
    body = body if isinstance(body, dict) else {}
    generation = body.get("generation")
    metadata = body.get("gen_metadata")
    return SubmitSeen(at=at, state=body.get("state"), gen_metadata=list(metadata) if isinstance(metadata, list) else [],
                      generation="R2" if generation == "R2" else "base64", fault=fault, forwarded=forwarded,
                      upstream_status=status, upstream_rc=rc)
