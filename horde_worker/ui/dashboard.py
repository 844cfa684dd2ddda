"""The worker's local web dashboard and Prometheus endpoint, served by aiohttp on the supervisor's own loop.

    /            the page (one HTML file of this package, no assets from elsewhere)
    /api/state   the dashboard's picture of the worker (ui/snapshot.py) as JSON
    /events      the same picture every second, as server-sent events
    /metrics     Prometheus text format (ui/metrics.py)
    /healthz     200 while the supervisor runs (Docker's healthcheck)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from loguru import logger

PAGE = Path(__file__).parent / "assets" / "dashboard.html"
EVENT_INTERVAL = 1.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Dashboard:
    """The server; `start()` binds it, `stop()` closes it."""

    def __init__(self, sup, host: str, port: int) -> None:
        self.sup, self.host, self.port = sup, host, port
        self._runner = None
        self.bound_port: int | None = None

    def _app(self):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from horde_worker.ui.metrics import registry_for
        from horde_worker.ui.snapshot import snapshot

        registry = registry_for(self.sup)
        page = PAGE.read_text(encoding="utf-8")
        loopback = self.host in LOOPBACK_HOSTS

        @web.middleware
        async def same_host_only(request, handler):
            # Listening on loopback, only pages of this machine may read it: a web page whose name was made to
            # point at 127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused.
            if loopback and (request.host or "").rsplit(":", 1)[0].strip("[]") not in LOOPBACK_HOSTS:
                return web.Response(status=403, text="the dashboard answers requests for this machine only")
            return await handler(request)

        async def index(_request):
            return web.Response(text=page, content_type="text/html")

        async def state(_request):
            return web.json_response(snapshot(self.sup))

        async def metrics(_request):
            body = generate_latest(registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(_request):
            return web.json_response({"ok": self.sup.fatal is None, "jobs_done": self.sup.stats.jobs_done},
                                     status=200 if self.sup.fatal is None else 503)

        async def events(request):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                while True:
                    await response.write(f"data: {json.dumps(snapshot(self.sup))}\n\n".encode())
                    await asyncio.sleep(EVENT_INTERVAL)
            except ConnectionResetError:  # the page went away
                pass
            return response

        app = web.Application(middlewares=[same_host_only])
        app.add_routes([web.get("/", index), web.get("/api/state", state), web.get("/metrics", metrics),
                        web.get("/healthz", health), web.get("/events", events)])
        return app

    async def start(self) -> int | None:
        """Bind the server; returns the port, or None when it could not be bound (the worker runs on without it)."""
        from aiohttp import web

        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            logger.warning("dashboard not started: {}:{} cannot be bound ({}); set dashboard_port to a free port or "
                           "dashboard: false", self.host, self.port, exc)
            await runner.cleanup()
            return None
        self._runner = runner
        addresses = runner.addresses
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        logger.info("dashboard on http://{}:{}/ (metrics at /metrics)", self.host, self.bound_port)
        return self.bound_port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
