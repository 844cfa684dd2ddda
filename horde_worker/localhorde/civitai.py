"""A loopback stand-in for CivitAI's public API, serving LoRAs and TIs held in memory.

It answers the routes the worker uses with CivitAI's response shapes: `GET /api/v1/models/{id}`,
`GET /api/v1/model-versions/{id}`, `GET /api/v1/models?query=...&types=...` and the file
download `GET /api/download/models/{versionId}` (with Range). Unknown ids are a 404 with
`{"error": ...}` as CivitAI answers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class CivitaiModel:
    """One model with one version and one file."""

    model_id: int
    version_id: int
    name: str
    kind: str  # CivitAI's type: LORA, TextualInversion, ...
    base_model: str
    data: bytes
    trained_words: list[str] = field(default_factory=list)
    file_name: str = ""
    # What the API claims; a wrong hash or size lets tests play a damaged or oversized file.
    claimed_sha256: str | None = None
    claimed_size_kb: float | None = None


class LocalCivitai:
    """The stand-in server; `url` is its API base for `civitai_api_url`."""

    def __init__(self, models: list[CivitaiModel] | None = None, port: int = 0) -> None:
        self.models: dict[int, CivitaiModel] = {m.model_id: m for m in models or []}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base}/api/v1"

    def add(self, model: CivitaiModel) -> None:
        self.models[model.model_id] = model

    def start(self) -> LocalCivitai:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- answers -------------------------------------------------------------------------------

    def _version(self, model: CivitaiModel) -> dict[str, Any]:
        sha = model.claimed_sha256 or hashlib.sha256(model.data).hexdigest().upper()
        download_url = f"{self.base}/api/download/models/{model.version_id}"
        size_kb = model.claimed_size_kb if model.claimed_size_kb is not None else len(model.data) / 1024
        return {
            "id": model.version_id, "modelId": model.model_id, "name": "v1.0", "baseModel": model.base_model,
            "trainedWords": model.trained_words, "downloadUrl": download_url,
            "files": [{"id": model.version_id * 10, "name": model.file_name or f"{model.name}.safetensors",
                       "sizeKB": size_kb, "type": "Model", "primary": True,
                       "metadata": {"format": "SafeTensor", "fp": "fp16", "size": "pruned"},
                       "hashes": {"SHA256": sha}, "downloadUrl": download_url}],
        }

    def _model(self, model: CivitaiModel) -> dict[str, Any]:
        return {"id": model.model_id, "name": model.name, "type": model.kind, "nsfw": False,
                "modelVersions": [self._version(model)]}

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 4 and parts[3].isdigit():
            model = self.models.get(int(parts[3]))
            return (200, self._model(model)) if model else (404, {"error": f"No model with id {parts[3]}"})
        if parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4 and parts[3].isdigit():
            model = next((m for m in self.models.values() if m.version_id == int(parts[3])), None)
            if model is None:
                return 404, {"error": f"Model version not found {parts[3]}"}
            return 200, {**self._version(model), "model": {"name": model.name, "type": model.kind, "nsfw": False}}
        if parts == ["api", "v1", "models"]:
            text = (query.get("query") or [""])[0].lower()
            types = set(query.get("types") or [])
            items = [self._model(m) for m in self.models.values()
                     if text in m.name.lower() and (not types or m.kind in types)]
            return 200, {"items": items, "metadata": {"totalItems": len(items), "currentPage": 1, "pageSize": 20}}
        return 404, {"error": "Not found"}

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                split = urlsplit(self.path)
                outer.requests.append((self.path, dict(self.headers)))
                parts = [p for p in split.path.split("/") if p]
                if parts[:3] == ["api", "download", "models"] and len(parts) == 4 and parts[3].isdigit():
                    self._file(int(parts[3]))
                    return
                status, body = outer.answer(split.path, parse_qs(split.query))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _file(self, version_id: int) -> None:
                model = next((m for m in outer.models.values() if m.version_id == version_id), None)
                if model is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, status = model.data, 200
                start = 0
                range_header = self.headers.get("Range", "")
                if range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0] or 0)
                    data, status = data[start:], 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(model.data) - 1}/{len(model.data)}")
                self.end_headers()
                self.wfile.write(data)

        return Handler
