"""LoRAs and textual inversions from CivitAI, kept in a size-capped cache.

A job names an adapter by CivitAI model id, model name, or version id (`is_version`). The
newest version's primary file is downloaded with the owner's `civitai_api_token`, checked
against CivitAI's sha256, and kept under `cache_home/lora` (or `/ti`). The cache is capped at
`max_lora_cache_size` GB; the least recently used files go first. What each lookup found is
remembered, so a cached adapter still works while CivitAI is unreachable.
"""

from __future__ import annotations

import difflib
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from loguru import logger

from horde_worker.models.download import DownloadError, DownloadTask, civitai_headers, download

DEFAULT_CIVITAI_URL = "https://civitai.com/api/v1"
# Larger files are refused: no real LoRA of the supported baselines needs more, and one file
# must not be able to fill a volunteer's disk.
MAX_FILE_BYTES = {"lora": 1 << 30, "ti": 50 << 20}
CIVITAI_TYPES = {"lora": {"LORA", "LoCon", "DoRA", "LyCORIS"}, "ti": {"TextualInversion"}}
QUERY_TYPES = {"lora": "LORA", "ti": "TextualInversion"}

# CivitAI's baseModel labels, by the worker's baselines.
BASE_MODELS = {
    "stable_diffusion_1": ("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
    "stable_diffusion_2": ("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"),
    "stable_diffusion_xl": ("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Turbo", "SDXL Lightning", "SDXL Hyper",
                            "Pony", "Illustrious", "NoobAI"),
    "flux_1": ("Flux.1 S", "Flux.1 D", "Flux.1 Krea", "Flux.1 Kontext"),
}


class AdapterUnavailable(Exception):
    """The adapter cannot be had; `value` is the gen_metadata value to report."""

    def __init__(self, value: str, detail: str) -> None:
        super().__init__(detail)
        self.value = value


@dataclass
class AdapterVersion:
    """One version of a CivitAI LoRA or TI, as the cache remembers it."""

    kind: str  # lora | ti
    version_id: int
    model_name: str
    base_model: str
    trained_words: list[str]
    file_name: str
    download_url: str
    size: int
    sha256: str | None
    last_used: float = field(default_factory=time.time)

    @property
    def baseline(self) -> str | None:
        for baseline, labels in BASE_MODELS.items():
            if self.base_model in labels:
                return baseline
        return None

    @property
    def local_name(self) -> str:
        suffix = Path(self.file_name).suffix.lower() or ".safetensors"
        return f"{self.version_id}{suffix}"


def pick_trigger(version: AdapterVersion, inject: str | None) -> str | None:
    """The text a LoRA's `inject_trigger` adds to the prompt: "any" the first trained word, "all" every
    one, other text the trained word most like it (or the text itself when none is close)."""
    if not inject or not version.trained_words:
        return None if inject in (None, "", "any", "all") else inject
    if inject == "any":
        return version.trained_words[0]
    if inject == "all":
        return ", ".join(version.trained_words)
    lowered = {w.lower(): w for w in version.trained_words}
    close = difflib.get_close_matches(inject.lower(), list(lowered), n=1, cutoff=0.4)
    return lowered[close[0]] if close else inject


class AdapterCache:
    """CivitAI lookups and downloads for one kind of adapter, with an LRU size cap."""

    def __init__(self, kind: str, folder: Path, max_bytes: int, *, api_url: str = DEFAULT_CIVITAI_URL,
                 token: str | None = None, timeout: float = 20.0) -> None:
        self.kind = kind
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.api_url = api_url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.session = requests.Session()
        self._lock = threading.Lock()
        self._index_path = self.folder / "index.json"
        self._versions: dict[str, AdapterVersion] = {}
        self._refs: dict[str, str] = {}
        self._load_index()

    # --- index -------------------------------------------------------------------------------

    def _load_index(self) -> None:
        try:
            data = json.loads(self._index_path.read_text())
            self._versions = {k: AdapterVersion(**v) for k, v in data.get("versions", {}).items()}
            self._refs = dict(data.get("refs", {}))
        except (OSError, ValueError, TypeError):
            self._versions, self._refs = {}, {}

    def _save_index(self) -> None:
        data = {"versions": {k: asdict(v) for k, v in self._versions.items()}, "refs": self._refs}
        tmp = self._index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._index_path)

    def cached_bytes(self) -> int:
        return sum((self.folder / v.local_name).stat().st_size for v in self._versions.values()
                   if (self.folder / v.local_name).exists())

    # --- lookup ------------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = f"{self.api_url}{path}"
        try:
            response = self.session.get(url, params=params, timeout=self.timeout,
                                        headers=civitai_headers(url, self.token))
        except requests.RequestException as exc:
            raise AdapterUnavailable("download_failed", f"CivitAI unreachable: {exc}") from None
        if response.status_code == 404:
            raise AdapterUnavailable("download_failed", f"CivitAI knows no {path}")
        if response.status_code >= 400:
            raise AdapterUnavailable("download_failed", f"CivitAI answered HTTP {response.status_code} for {path}")
        try:
            return response.json()
        except ValueError:
            raise AdapterUnavailable("download_failed", f"CivitAI sent no JSON for {path}") from None

    def _version_from(self, version: dict[str, Any], model: dict[str, Any]) -> AdapterVersion:
        if model.get("type") not in CIVITAI_TYPES[self.kind]:
            raise AdapterUnavailable("download_failed", f"{model.get('name')!r} is a {model.get('type')}, "
                                                        f"not a {QUERY_TYPES[self.kind]}")
        files = [f for f in version.get("files", []) if f.get("type", "Model") == "Model"]
        files.sort(key=lambda f: (not f.get("primary"), not str(f.get("name", "")).endswith(".safetensors")))
        if not files:
            raise AdapterUnavailable("download_failed", f"version {version.get('id')} has no model file")
        chosen = files[0]
        sha = (chosen.get("hashes") or {}).get("SHA256")
        return AdapterVersion(
            kind=self.kind, version_id=int(version["id"]), model_name=str(model.get("name", "")),
            base_model=str(version.get("baseModel", "")), trained_words=list(version.get("trainedWords") or []),
            file_name=str(chosen.get("name", f"{version['id']}.safetensors")),
            download_url=str(chosen.get("downloadUrl") or version.get("downloadUrl")),
            size=int(float(chosen.get("sizeKB", 0)) * 1024), sha256=sha.lower() if sha else None)

    def lookup(self, name: str, is_version: bool = False) -> AdapterVersion:
        """Find the version a job means: a version id, a model id, or a model name."""
        ref = f"{'v' if is_version else 'm'}:{name.strip().lower()}"
        try:
            if is_version:
                data = self._get(f"/model-versions/{int(name)}")
                version = self._version_from(data, data.get("model") or {})
            elif re.fullmatch(r"\d+", name.strip()):
                model = self._get(f"/models/{int(name)}")
                version = self._version_from(_newest(model), model)
            else:
                found = self._get("/models", {"query": name, "types": QUERY_TYPES[self.kind], "limit": 20})
                items = found.get("items") or []
                exact = [m for m in items if str(m.get("name", "")).lower() == name.strip().lower()]
                if not (exact or items):
                    raise AdapterUnavailable("download_failed", f"CivitAI has no {QUERY_TYPES[self.kind]} named "
                                                                f"{name!r}")
                model = (exact or items)[0]
                version = self._version_from(_newest(model), model)
        except AdapterUnavailable:
            remembered = self._refs.get(ref)
            if remembered in self._versions and (self.folder / self._versions[remembered].local_name).exists():
                logger.info("CivitAI lookup of {} failed; using the cached file", name)
                return self._versions[remembered]
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterUnavailable("download_failed", f"unexpected CivitAI answer for {name!r}: {exc}") from None
        with self._lock:
            self._refs[ref] = str(version.version_id)
        return version

    # --- files -------------------------------------------------------------------------------

    def fetch(self, name: str, is_version: bool = False, baseline: str | None = None) -> tuple[Path, AdapterVersion]:
        """The adapter's file on disk (downloaded if needed) and what CivitAI says of it."""
        version = self.lookup(name, is_version)
        if baseline and version.baseline and version.baseline != baseline:
            raise AdapterUnavailable("baseline_mismatch", f"{name!r} is made for {version.base_model}")
        key = str(version.version_id)
        path = self.folder / version.local_name
        with self._lock:
            if path.exists():
                version.last_used = time.time()
                self._versions[key] = version
                self._save_index()
                return path, version
        if version.size > MAX_FILE_BYTES[self.kind]:
            raise AdapterUnavailable("download_failed", f"{name!r} is {version.size / 2**20:.0f} MB, over the "
                                                        f"{MAX_FILE_BYTES[self.kind] >> 20} MB limit")
        with self._lock:
            self._make_room(version.size)
        try:
            download(DownloadTask(version.download_url, path, version.sha256, version.size or None),
                     token=self.token, session=self.session, attempts=3, timeout=self.timeout)
        except DownloadError as exc:
            raise AdapterUnavailable("download_failed", str(exc)) from None
        if path.stat().st_size > MAX_FILE_BYTES[self.kind]:
            path.unlink()
            raise AdapterUnavailable("download_failed", f"{name!r} is over the size limit")
        with self._lock:
            version.last_used = time.time()
            self._versions[key] = version
            self._make_room(0)
            self._save_index()
        logger.info("{} {} ({}) downloaded: {:.1f} MB", self.kind, name, version.model_name,
                    path.stat().st_size / 2**20)
        return path, version

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used files until `incoming` more bytes fit under the cap."""
        for key, version in sorted(self._versions.items(), key=lambda kv: kv[1].last_used):
            if self.cached_bytes() + incoming <= self.max_bytes:
                return
            (self.folder / version.local_name).unlink(missing_ok=True)
            del self._versions[key]
            logger.info("{} cache full: removed {} ({})", self.kind, version.model_name, version.local_name)
        self._save_index()


def _newest(model: dict[str, Any]) -> dict[str, Any]:
    versions = model.get("modelVersions") or []
    if not versions:
        raise AdapterUnavailable("download_failed", f"{model.get('name')!r} has no versions")
    return versions[0]  # CivitAI lists the newest first
