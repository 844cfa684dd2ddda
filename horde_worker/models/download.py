"""Verified, resumable model downloads.

A file is written to `<name>.part`, resumed with an HTTP Range request after an interruption,
checked against the reference's sha256, and only then renamed to its real name: a file under
its real name is always complete. A hash mismatch deletes the part file and says so.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from loguru import logger

CHUNK = 1 << 16


class DownloadError(Exception):
    """A download that cannot be completed; the message says which file and why."""


@dataclass(frozen=True)
class DownloadTask:
    """One file to fetch."""

    url: str
    dest: Path
    sha256: str | None
    size: int | None = None
    # Only where the publisher gives no sha256 (rembg's models): checked the same way.
    md5: str | None = None


def civitai_headers(url: str, token: str | None) -> dict[str, str]:
    """CivitAI wants the user's API token for many files; no other host ever sees it."""
    host = urlsplit(url).hostname or ""
    if token and (host == "civitai.com" or host.endswith(".civitai.com")):
        return {"Authorization": f"Bearer {token}"}
    return {}


def check_free_space(folder: Path, needed: int, margin: int = 1 << 30) -> None:
    """Refuse to start downloads that cannot fit (keeping `margin` bytes free)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + margin > free:
        raise DownloadError(f"not enough disk space in {folder}: {needed / 1e9:.1f} GB needed (+{margin / 1e9:.0f} GB "
                            f"margin), {free / 1e9:.1f} GB free. Free some space or set cache_home elsewhere.")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


ProgressCallback = Callable[[int, int | None], None]


def download(task: DownloadTask, *, token: str | None = None, session: requests.Session | None = None,
             on_progress: ProgressCallback | None = None, attempts: int = 6, timeout: float = 60.0) -> Path:
    """Fetch `task.url` to `task.dest`, resuming a `.part` file left by an earlier try."""
    session = session or requests.Session()
    dest = Path(task.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    headers = civitai_headers(task.url, token)
    total = task.size
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request_headers = dict(headers)
        if have:
            request_headers["Range"] = f"bytes={have}-"
        try:
            with session.get(task.url, headers=request_headers, stream=True, timeout=timeout) as response:
                if response.status_code == 416 and have:  # nothing left to fetch
                    break
                if response.status_code in (401, 403):
                    hint = " (set civitai_api_token)" if "civitai" in task.url else ""
                    raise DownloadError(f"{dest.name}: the server refused the download (HTTP "
                                        f"{response.status_code}){hint}")
                if response.status_code >= 400:
                    raise requests.HTTPError(f"HTTP {response.status_code}")
                if response.status_code == 200 and have:  # the server ignored Range: start over
                    have = 0
                mode = "ab" if response.status_code == 206 else "wb"
                length = response.headers.get("Content-Length")
                if length is not None:
                    total = have + int(length)
                done = have
                with open(part, mode) as handle:
                    for chunk in response.iter_content(CHUNK):
                        handle.write(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, total)
                if total is not None and done < total:
                    raise requests.ConnectionError(f"connection closed at {done} of {total} bytes")
                break
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as exc:
            if attempt + 1 == attempts:
                raise DownloadError(f"{dest.name}: download failed after {attempts} tries ({exc}); "
                                    f"run again to resume from {part.name}") from None
            delay = min(30.0, 2.0 ** attempt)
            logger.warning("{}: {}; resuming in {:.0f}s", dest.name, exc, delay)
            time.sleep(delay)
    expected = ("sha256", task.sha256) if task.sha256 else ("md5", task.md5) if task.md5 else None
    if expected is not None:
        algorithm, digest = expected
        actual = file_digest(part, algorithm)
        if actual.lower() != digest.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(f"{dest.name}: {algorithm} mismatch (expected {digest.lower()}, got {actual}); "
                                "the damaged download was deleted")
    part.replace(dest)
    return dest


def rich_progress():
    """A rich progress display with one bar per file."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn())


def download_all(tasks: list[DownloadTask], *, token: str | None = None, show_progress: bool = True) -> list[str]:
    """Download every task with a progress bar each; returns error messages (empty when all worked), a
    lack of disk space included."""
    needed = sum(t.size or 0 for t in tasks)
    if tasks:
        try:
            check_free_space(tasks[0].dest.parent, needed)
        except DownloadError as exc:
            logger.error(str(exc))
            return [str(exc)]
    errors = []
    progress = rich_progress() if show_progress else None
    if progress is not None:
        progress.start()
    try:
        for task in tasks:
            bar = progress.add_task(task.dest.name, total=task.size) if progress is not None else None

            def update(done: int, total: int | None, bar=bar) -> None:
                if progress is not None:
                    progress.update(bar, completed=done, total=total)

            try:
                download(task, token=token, on_progress=update)
                logger.info("downloaded and verified {}", task.dest.name)
            except DownloadError as exc:
                logger.error(str(exc))
                errors.append(str(exc))
    finally:
        if progress is not None:
            progress.stop()
    return errors
