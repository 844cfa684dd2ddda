"""The local horde's HTTP face: the horde's routes on 127.0.0.1, rate limits and fault injection.

`LocalHorde` runs in a thread of the caller (the worker's `--local` mode, the tests) or on its
own (`python -m horde_worker.localhorde`). Images are PUT to and served from `/r2/...`, as
the real horde's presigned storage URLs would be.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from horde_worker.localhorde.rules import LocalHordeError
from horde_worker.localhorde.state import HordeState

FAULT_KINDS = ("500", "503", "429", "reset", "reset_after", "slow")


@dataclass
class FaultPlan:
    """Injected failures for one endpoint: with probability `rate`, one of `kinds`."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("500",)
    slow_seconds: float = 2.0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass
class RateLimit:
    """At most `count` calls per `seconds` per API key and route."""

    count: int
    seconds: float


@dataclass
class ServerOptions:
    """Tunables of the local horde."""

    rate_limits: dict[str, RateLimit] = field(default_factory=lambda: {
        "pop": RateLimit(60, 1.0), "submit": RateLimit(60, 1.0), "*": RateLimit(90, 60.0),
        "r2": RateLimit(10_000, 1.0),
    })
    sweep_interval: float = 60.0
    fault_seed: int = 0


def _endpoint(method: str, path: str) -> str:
    """Short endpoint name used by fault plans and rate limits."""
    if path.startswith("/r2/"):
        return "upload" if method == "PUT" else "download"
    tail = path.split("/v2/", 1)[-1]
    for prefix, name in (("generate/pop", "pop"), ("generate/submit", "submit"), ("generate/async", "async"),
                         ("generate/status", "status"), ("generate/check", "status"), ("find_user", "find_user"),
                         ("workers", "workers"), ("stats", "stats"), ("status/heartbeat", "heartbeat"),
                         ("status/models", "models")):
        if tail.startswith(prefix):
            return name
    return tail


class LocalHorde:
    """A horde on loopback that plays the real server by the contract."""

    def __init__(self, models: list[str], *, host: str = "127.0.0.1", port: int = 0, owner_key: str | None = None,
                 min_ttl: int = 150, options: ServerOptions | None = None, flux_models: set[str] | None = None,
                 fixed_ttl: int | None = None) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the local horde only listens on loopback")
        self.state = HordeState(models, owner_key=owner_key, min_ttl=min_ttl, flux_models=flux_models,
                                fixed_ttl=fixed_ttl)
        self.options = options or ServerOptions()
        self.faults: dict[str, FaultPlan] = {}
        self._fault_random = random.Random(self.options.fault_seed)
        self._fault_lock = threading.Lock()
        self.faults_injected: dict[str, int] = defaultdict(int)
        self._calls: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def root_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The API base URL a worker's `horde_url` points at."""
        return self.root_url + "/api"

    @property
    def api_key(self) -> str:
        """The worker owner's API key."""
        return self.state.owner_key

    def start(self) -> LocalHorde:
        serve = threading.Thread(target=self._httpd.serve_forever, name="localhorde-http", daemon=True)
        sweep = threading.Thread(target=self._sweep_loop, name="localhorde-ttl", daemon=True)
        self._threads = [serve, sweep]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LocalHorde:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.options.sweep_interval):
            self.state.sweep()

    def set_faults(self, plans: dict[str, FaultPlan]) -> None:
        """Replace the fault plans (keys: pop, submit, upload, download, async, status, ..., or '*')."""
        with self._fault_lock:
            self.faults = dict(plans)

    def _pick_fault(self, endpoint: str) -> str | None:
        with self._fault_lock:
            plan = self.faults.get(endpoint) or self.faults.get("*")
            if plan is None or plan.rate <= 0 or self._fault_random.random() >= plan.rate:
                return None
            kind = self._fault_random.choice(plan.kinds)
            self.faults_injected[f"{endpoint}:{kind}"] += 1
            return kind

    def _over_limit(self, apikey: str, endpoint: str) -> float | None:
        group = endpoint if endpoint in self.options.rate_limits else (
            "r2" if endpoint in ("upload", "download") else "*")
        limit = self.options.rate_limits.get(group)
        if limit is None:
            return None
        now = time.monotonic()
        with self._fault_lock:
            calls = self._calls[(apikey, group)]
            while calls and now - calls[0] > limit.seconds:
                calls.popleft()
            if len(calls) >= limit.count:
                return max(0.1, limit.seconds - (now - calls[0]))
            calls.append(now)
        return None

    # --- routing ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], apikey: str | None,
               body: Any, raw: bytes) -> tuple[int, Any, str]:
        """Answer one call: (status, body, content type). Raises LocalHordeError for error answers."""
        state, base = self.state, self.root_url
        if path.startswith("/r2/"):
            key = path[len("/r2/"):]
            if method == "PUT":
                state.blobs[key] = raw
                return 200, b"", "text/plain"
            if key not in state.blobs:
                return 404, b"NoSuchKey", "text/plain"
            return 200, state.blobs[key], "image/webp"
        if not path.startswith("/api/v2/"):
            raise LocalHordeError(404, "NotFound", f"No route {path}")
        route = path[len("/api/v2/"):]
        parts = route.split("/")
        if method == "GET" and route == "status/heartbeat":
            return 200, {"message": "OK", "version": "local", "queue": state.counters()["pending"],
                         "db_connection": True}, "application/json"
        if method == "GET" and route == "find_user":
            return 200, state.find_user(apikey), "application/json"
        if method == "POST" and route == "generate/async":
            return 202, state.add_request(body or {}, apikey), "application/json"
        if method == "GET" and parts[:2] == ["generate", "status"] and len(parts) == 3:
            return 200, state.status(parts[2], base), "application/json"
        if method == "GET" and parts[:2] == ["generate", "check"] and len(parts) == 3:
            return 200, state.status(parts[2], base, with_generations=False), "application/json"
        if method == "POST" and route == "generate/pop":
            return 200, state.pop(apikey, body or {}, base), "application/json"
        if method == "POST" and route == "generate/submit":
            return 200, state.submit(apikey, body or {}), "application/json"
        if parts[0] == "workers" and len(parts) == 3 and parts[1] == "name" and method == "GET":
            return 200, state.worker_view(name=parts[2]), "application/json"
        if parts[0] == "workers" and len(parts) == 2:
            if method == "GET":
                return 200, state.worker_view(worker_id=parts[1]), "application/json"
            if method == "PUT":
                return 200, state.update_worker(apikey, parts[1], body or {}), "application/json"
        if method == "GET" and route == "stats/img/models":
            return 200, state.model_stats(), "application/json"
        if method == "GET" and route == "status/models":
            return 200, state.models_status(), "application/json"
        raise LocalHordeError(404, "NotFound", f"No route {method} /api/v2/{route}")

    def _handler_class(self):
        horde = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the console for the worker
                pass

            def _serve(self, method: str) -> None:
                split = urlsplit(self.path)
                path, query = split.path, parse_qs(split.query)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                endpoint = _endpoint(method, path)
                apikey = self.headers.get("apikey")
                fault = horde._pick_fault(endpoint)
                if fault == "reset":
                    return self._reset()
                if fault == "slow":
                    time.sleep(horde.faults.get(endpoint, horde.faults.get("*", FaultPlan())).slow_seconds)
                if fault in ("500", "503"):
                    return self._reply(int(fault), {"message": "injected server error", "rc": "InternalError"})
                wait = horde._over_limit(apikey or self.client_address[0], endpoint)
                if fault == "429" or wait is not None:
                    return self._reply(429, {"message": "Rate limit exceeded", "rc": "TooManyRequests"},
                                       retry_after=wait or 0.2)
                body: Any = None
                if raw and not path.startswith("/r2/"):
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        return self._reply(400, {"message": "Body is not JSON", "rc": "BadRequest"})
                try:
                    status, answer, content_type = horde.handle(method, path, query, apikey, body, raw)
                except LocalHordeError as exc:
                    status, answer, content_type = exc.status, exc.body(), "application/json"
                if fault == "reset_after":  # the call took effect, but its answer is lost
                    return self._reset()
                self._reply(status, answer, content_type)

            def _reset(self) -> None:
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _reply(self, status: int, answer: Any, content_type: str = "application/json",
                       retry_after: float | None = None) -> None:
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", f"{retry_after:.2f}")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

        return Handler
