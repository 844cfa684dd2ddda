"""LoRAs and textual inversions from CivitAI, kept in a size-capped cache.

A job names an adapter by CivitAI model id, model name, or version id (`is_version`). The
newest version's primary file is downloaded with the owner's `civitai_api_token`, checked
against CivitAI's sha256, and kept under `cache_home/lora` (or `/ti`). The cache is capped at
`max_lora_cache_size` GB; the least recently used files go first. What each lookup found is
remembered, so a cached adapter still works while CivitAI is unreachable.

Several jobs may ask for the same file at once: it is downloaded once and the others wait for
that download's result. A file being downloaded, or handed to a job in the last `hold_seconds`
(until `release`), is never evicted; the cap may be passed for as long as they are in use.
Every file lives directly in the cache folder under a name made of its version id, whatever
names CivitAI or a job give.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from loguru import logger

from horde_worker.horde.urls import form_problem
from horde_worker.models.download import DownloadError, DownloadTask, civitai_headers, download

DEFAULT_CIVITAI_URL = "https://civitai.com/api/v1"
# Larger files are refused: no real LoRA of the supported baselines needs more, and one file
# must not be able to fill a volunteer's disk.
MAX_FILE_BYTES = {"lora": 1 << 30, "ti": 50 << 20}
CIVITAI_TYPES = {"lora": {"LORA", "LoCon", "DoRA", "LyCORIS"}, "ti": {"TextualInversion"}}
QUERY_TYPES = {"lora": "LORA", "ti": "TextualInversion"}
# How long a file handed to a job is kept from eviction unless released sooner: longer than a
# job waits in the queue and runs.
HOLD_SECONDS = 30 * 60
_SUFFIX = re.compile(r"\.[a-z0-9]{1,12}")

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
        """The file's name in the cache: the version id and a plain suffix, nothing CivitAI could steer."""
        suffix = Path(str(self.file_name)).suffix.lower()
        return f"{int(self.version_id)}{suffix if _SUFFIX.fullmatch(suffix) else '.safetensors'}"


def _valid_entry(key: str, version: AdapterVersion, kind: str) -> bool:
    """An index entry the cache can trust (the index is a file on disk: it could have been edited)."""
    return (type(version.version_id) is int and key == str(version.version_id) and version.kind == kind
            and isinstance(version.file_name, str) and isinstance(version.download_url, str)
            and isinstance(version.size, int) and isinstance(version.last_used, int | float))


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
                 token: str | None = None, timeout: float = 20.0, hold_seconds: float = 0.0) -> None:
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
        self.hold_seconds = hold_seconds
        # version key -> (jobs holding it, monotonic time the last hold ends)
        self._held: dict[str, tuple[int, float]] = {}
        self._inflight: dict[str, Future] = {}  # version key -> the download others wait for
        self._load_index()

    # --- index -------------------------------------------------------------------------------

    def _load_index(self) -> None:
        try:
            data = json.loads(self._index_path.read_text())
            versions = {}
            for key, entry in dict(data.get("versions", {})).items():
                try:
                    version = AdapterVersion(**entry)
                except TypeError:
                    continue
                if _valid_entry(key, version, self.kind):
                    versions[key] = version
            self._versions = versions
            self._refs = {str(k): str(v) for k, v in dict(data.get("refs", {})).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self._versions, self._refs = {}, {}

    def _save_index(self) -> None:
        data = {"versions": {k: asdict(v) for k, v in self._versions.items()}, "refs": self._refs}
        tmp = self._index_path.with_name(f"index.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self._index_path)
        except OSError as exc:  # the files are fine; only what the next start remembers suffers
            logger.warning("{} cache index not saved: {}", self.kind, exc)
            tmp.unlink(missing_ok=True)

    def path_of(self, version: AdapterVersion) -> Path:
        """Where `version`'s file is kept: always directly in the cache folder."""
        try:
            name = version.local_name
        except (TypeError, ValueError):
            raise AdapterUnavailable("download_failed", f"version id {version.version_id!r} is not a number") from None
        path = self.folder / name
        if "\0" in name or path.parent != self.folder or os.path.basename(name) != name:
            raise AdapterUnavailable("download_failed", f"refusing the file name {name!r}")
        return path

    def cached_bytes(self) -> int:
        """Bytes of the cache's files on disk."""
        total = 0
        for version in self._versions.values():
            with contextlib.suppress(OSError, AdapterUnavailable):
                total += self.path_of(version).stat().st_size
        return total

    def release(self, path: Path) -> None:
        """A job is done with the file at `path`: once no job holds it, it may be evicted again."""
        with self._lock:
            for key, version in self._versions.items():
                if key in self._held and self.folder / version.local_name == Path(path):
                    count, until = self._held[key]
                    if count > 1:
                        self._held[key] = (count - 1, until)
                    else:
                        del self._held[key]

    def _is_held(self, key: str, now: float) -> bool:
        count, until = self._held.get(key, (0, 0.0))
        return count > 0 and until > now

    # --- lookup ------------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = f"{self.api_url}{path}"
        try:
            # A short connect timeout: offline, a job must not wait long to hear the LoRA is missing.
            response = self.session.get(url, params=params, timeout=(min(5.0, self.timeout), self.timeout),
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
        files = [f for f in version.get("files") or [] if isinstance(f, dict) and f.get("type", "Model") == "Model"]
        files.sort(key=lambda f: (not f.get("primary"), not str(f.get("name", "")).endswith(".safetensors")))
        if not files:
            raise AdapterUnavailable("download_failed", f"version {version.get('id')} has no model file")
        chosen = files[0]
        url = chosen.get("downloadUrl") or version.get("downloadUrl")
        if form_problem(url) is not None:
            raise AdapterUnavailable("download_failed", f"version {version.get('id')} has no usable download URL "
                                                        f"({form_problem(url)})")
        sha = (chosen.get("hashes") or {}).get("SHA256")
        return AdapterVersion(
            kind=self.kind, version_id=int(version["id"]), model_name=str(model.get("name", "")),
            base_model=str(version.get("baseModel", "")),
            trained_words=[str(w) for w in version.get("trainedWords") or []],
            file_name=str(chosen.get("name", f"{version['id']}.safetensors")), download_url=url,
            size=int(float(chosen.get("sizeKB", 0)) * 1024), sha256=str(sha).lower() if sha else None)

    def lookup(self, name: str, is_version: bool = False) -> AdapterVersion:
        """Find the version a job means: a version id, a model id, or a model name. Raises only
        AdapterUnavailable; when CivitAI fails, a version found before whose file is cached serves."""
        ref = f"{'v' if is_version else 'm'}:{str(name).strip().lower()}"
        try:
            version = self._lookup_online(str(name), is_version)
        except Exception as exc:  # whatever CivitAI answers, the job only hears "unavailable"
            problem = exc if isinstance(exc, AdapterUnavailable) else AdapterUnavailable(
                "download_failed", f"unexpected CivitAI answer for {name!r}: {type(exc).__name__}: {exc}")
            remembered = self._versions.get(self._refs.get(ref, ""))
            if remembered is not None and self.path_of(remembered).exists():
                logger.info("CivitAI lookup of {} failed; using the cached file", name)
                return remembered
            raise problem from None
        with self._lock:
            self._refs[ref] = str(version.version_id)
        return version

    def _lookup_online(self, name: str, is_version: bool) -> AdapterVersion:
        if is_version:
            data = self._get(f"/model-versions/{int(name)}")
            return self._version_from(data, data.get("model") or {})
        if re.fullmatch(r"\d+", name.strip()):
            model = self._get(f"/models/{int(name)}")
            return self._version_from(_newest(model), model)
        found = self._get("/models", {"query": name, "types": QUERY_TYPES[self.kind], "limit": 20})
        items = [m for m in found.get("items") or [] if isinstance(m, dict)]
        exact = [m for m in items if str(m.get("name", "")).lower() == name.strip().lower()]
        if not (exact or items):
            raise AdapterUnavailable("download_failed", f"CivitAI has no {QUERY_TYPES[self.kind]} named {name!r}")
        model = (exact or items)[0]
        return self._version_from(_newest(model), model)

    # --- files -------------------------------------------------------------------------------

    def fetch(self, name: str, is_version: bool = False, baseline: str | None = None) -> tuple[Path, AdapterVersion]:
        """The adapter's file on disk (downloaded if needed) and what CivitAI says of it.

        Raises only AdapterUnavailable. A second asker for a file being downloaded waits for that
        download instead of starting its own.
        """
        try:
            return self._fetch(name, is_version, baseline)
        except AdapterUnavailable:
            raise
        except Exception as exc:  # disk, network or answer trouble: the adapter is unavailable
            raise AdapterUnavailable("download_failed", f"{type(exc).__name__}: {exc}") from None

    def _fetch(self, name: str, is_version: bool, baseline: str | None) -> tuple[Path, AdapterVersion]:
        version = self.lookup(name, is_version)
        if baseline and version.baseline and version.baseline != baseline:
            raise AdapterUnavailable("baseline_mismatch", f"{name!r} is made for {version.base_model}")
        key = str(version.version_id)
        path = self.path_of(version)
        with self._lock:
            if path.exists():
                self._hand_out(key, version)
                return path, version
            pending = self._inflight.get(key)
            mine = pending is None
            if mine:
                pending = self._inflight[key] = Future()
        if not mine:
            pending.result()  # the first asker's AdapterUnavailable, if its download failed
            with self._lock:
                self._hand_out(key, version)
            return path, version
        try:
            self._download(name, key, version, path)
            pending.set_result(path)
        except BaseException as exc:
            pending.set_exception(exc if isinstance(exc, AdapterUnavailable)
                                  else AdapterUnavailable("download_failed", f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        return path, version

    def _hand_out(self, key: str, version: AdapterVersion) -> None:
        """Record that a job gets `version`'s file now (call with the lock held)."""
        version.last_used = time.time()
        self._versions[key] = version
        if self.hold_seconds > 0:
            self._held[key] = (self._held.get(key, (0, 0.0))[0] + 1, time.monotonic() + self.hold_seconds)
        self._save_index()

    def _download(self, name: str, key: str, version: AdapterVersion, path: Path) -> None:
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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES[self.kind]:
            path.unlink(missing_ok=True)
            raise AdapterUnavailable("download_failed", f"{name!r} is over the size limit")
        with self._lock:
            self._hand_out(key, version)
            self._make_room(0)
        logger.info("{} {} ({}) downloaded: {:.1f} MB", self.kind, name, version.model_name, size / 2**20)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used files until `incoming` more bytes fit under the cap; files being
        downloaded or held for a job stay (call with the lock held)."""
        now = time.monotonic()
        removed = False
        for key, version in sorted(self._versions.items(), key=lambda kv: kv[1].last_used):
            if self.cached_bytes() + incoming <= self.max_bytes:
                break
            if key in self._inflight or self._is_held(key, now):
                continue
            self._held.pop(key, None)
            try:
                self.path_of(version).unlink(missing_ok=True)
            except (OSError, AdapterUnavailable) as exc:
                logger.warning("{} cache: cannot remove {}: {}", self.kind, version.local_name, exc)
                continue
            del self._versions[key]
            removed = True
            logger.info("{} cache full: removed {} ({})", self.kind, version.model_name, version.local_name)
        if removed:
            self._save_index()


def _newest(model: dict[str, Any]) -> dict[str, Any]:
    versions = model.get("modelVersions") or []
    if not versions:
        raise AdapterUnavailable("download_failed", f"{model.get('name')!r} has no versions")
    return versions[0]  # CivitAI lists the newest first
