"""A loopback file server with HTTP Range support and switches to misbehave on purpose.

Faults: `cut_once[path] = n` drops the connection after n body bytes on the next request for
`path`, `cut_always[path] = n` on every request, `cuts[path] = [n1, n2, ...]` on the next requests
in turn; `redirects[path] = location` answers 302; `status[path] = code` answers that status with
an empty body; `trickle[path] = (n, seconds)` sends the body n bytes at a time, `seconds` apart;
`gate`, once cleared, holds every answer until it is set again (a transfer that
is "in progress" for as long as a test needs).
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `files` (path -> bytes) on 127.0.0.1, with the faults described above."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}
        self.cut_always: dict[str, int] = {}
        self.cuts: dict[str, list[int]] = {}
        self.redirects: dict[str, str] = {}
        self.status: dict[str, int] = {}
        self.trickle: dict[str, tuple[int, float]] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _empty(self, code: int, **headers: str) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                server.requests.append((path, self.headers.get("Range")))
                server.gate.wait(30)
                if path in server.redirects:
                    self._empty(302, Location=server.redirects[path])
                    return
                if path in server.status:
                    self._empty(server.status[path])
                    return
                data = server.files.get(path)
                if data is None:
                    self._empty(404)
                    return
                start = 0
                match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self._empty(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_once.pop(path, server.cut_always.get(path))
                if cut is None and server.cuts.get(path):
                    cut = server.cuts[path].pop(0)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if path in server.trickle:
                    step, pause = server.trickle[path]
                    try:
                        for offset in range(0, len(body), step):
                            self.wfile.write(body[offset:offset + step])
                            self.wfile.flush()
                            time.sleep(pause)
                    except OSError:  # the client gave up
                        self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for one, and every test stops a server.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
