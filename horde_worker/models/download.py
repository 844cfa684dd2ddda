"""Verified, resumable model downloads, safe to run side by side.

A file is written to a part file of its own (`<name>.<pid>-<thread>-<random>.part`), resumed
with an HTTP Range request after an interruption, checked against the reference's sha256, and
only then renamed to its real name: a file under its real name is always complete.

In one process, one download per target runs at a time and a second asker waits for its
result. Processes never share a part file; a part file whose process is gone (or an old
`<name>.part`) is claimed by renaming it, and resumed. A server that cannot be reached at all
(no name, refused, no route) is tried `connect_attempts` times within a few seconds and the
error says how to place the file by hand; once bytes flow, a cut transfer is resumed patiently.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from loguru import logger

CHUNK = 1 << 16
CONNECT_TIMEOUT = 5.0
# Waits after the first and second failed connection: three tries take about two seconds.
CONNECT_DELAYS = (0.5, 1.5)
# A part file untouched this long is abandoned even if a process of its pid runs (pid reuse).
STALE_PART_SECONDS = 600

_inflight_lock = threading.Lock()
_inflight: dict[str, Future] = {}


class DownloadError(Exception):
    """A download that cannot be completed; the message says which file and why."""


class HostUnreachable(DownloadError):
    """No connection to the file's host could be made at all (offline, no such name, refused)."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


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
             on_progress: ProgressCallback | None = None, attempts: int = 6, timeout: float = 60.0,
             connect_attempts: int = 3, connect_timeout: float = CONNECT_TIMEOUT) -> Path:
    """Fetch `task.url` to `task.dest`, resuming a part file left by an earlier try.

    `attempts` bounds the tries that reached the server (a cut transfer is resumed that often);
    `connect_attempts` the tries in a row that could not connect at all, which then raise
    HostUnreachable. A download of the same `dest` already running in this process is waited
    for, and its result (or error) is this call's.
    """
    dest = Path(task.dest)
    key = os.path.realpath(dest)
    with _inflight_lock:
        pending = _inflight.get(key)
        mine = pending is None
        if mine:
            pending = _inflight[key] = Future()
    if not mine:
        logger.info("{} is already being downloaded; waiting for that download", dest.name)
        return pending.result()
    try:
        result = _download(task, dest, token=token, session=session or requests.Session(), on_progress=on_progress,
                           attempts=attempts, timeout=(connect_timeout, timeout), connect_attempts=connect_attempts)
        pending.set_result(result)
        return result
    except BaseException as exc:
        pending.set_exception(exc if isinstance(exc, Exception) else DownloadError(f"{dest.name}: download interrupted"))
        raise
    finally:
        with _inflight_lock:
            _inflight.pop(key, None)


def _why(exc: Exception) -> str:
    """The short reason inside a requests connection error ("Failed to resolve ...", "Connection refused")."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    text = str(reason if reason is not None else exc)
    return text.split(">: ", 1)[-1][:200]


def _unreachable(task: DownloadTask, dest: Path, exc: Exception, tries: int) -> HostUnreachable:
    host = urlsplit(task.url).hostname or task.url
    return HostUnreachable(
        f"{dest.name}: cannot connect to {host} after {tries} tries ({_why(exc)}); is this machine offline? "
        f"To place the file by hand, download {task.url} and save it as {dest.name} in {dest.parent}", host)


def _download(task: DownloadTask, dest: Path, *, token: str | None, session: requests.Session,
              on_progress: ProgressCallback | None, attempts: int, timeout: tuple[float, float],
              connect_attempts: int) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = claim_part(dest)
    headers = civitai_headers(task.url, token)
    total = task.size
    unanswered_in_a_row = transfer_failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        request_headers = dict(headers)
        if have:
            request_headers["Range"] = f"bytes={have}-"
        try:
            response = session.get(task.url, headers=request_headers, stream=True, timeout=timeout)
        except requests.RequestException as exc:
            if isinstance(exc, ValueError):  # InvalidURL, MissingSchema...: no try can work
                raise DownloadError(f"{dest.name}: cannot download {task.url!r}: {type(exc).__name__}") from None
            unanswered_in_a_row += 1
            if unanswered_in_a_row >= connect_attempts:
                raise _unreachable(task, dest, exc, unanswered_in_a_row) from None
            delay = CONNECT_DELAYS[min(unanswered_in_a_row, len(CONNECT_DELAYS)) - 1]
            logger.warning("{}: no connection ({}); trying again in {:.1f}s", dest.name, _why(exc), delay)
            time.sleep(delay)
            continue
        unanswered_in_a_row = 0
        try:
            with response:
                _transfer(task, dest, part, response, have, on_progress, total)
            break
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
            transfer_failures += 1
            if transfer_failures >= attempts:
                raise DownloadError(f"{dest.name}: download failed after {attempts} tries ({exc}); "
                                    f"run again to resume from {part.name}") from None
            delay = min(30.0, 2.0 ** (transfer_failures - 1))
            logger.warning("{}: {}; resuming in {:.0f}s", dest.name, exc, delay)
            time.sleep(delay)
        except OSError as exc:  # the disk, not the network (requests' errors are OSErrors too, caught above)
            raise DownloadError(f"{dest.name}: cannot write {part}: {exc}") from None
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


def _transfer(task: DownloadTask, dest: Path, part: Path, response: requests.Response, have: int,
              on_progress: ProgressCallback | None, total: int | None) -> None:
    """Write one answer's body to `part`, which is then complete. Raises DownloadError for an answer
    no retry can change, a requests error for one worth resuming."""
    status = response.status_code
    if status == 416 and have:  # nothing left to fetch
        return
    if status in (401, 403):
        hint = " (set civitai_api_token)" if "civitai" in task.url else ""
        raise DownloadError(f"{dest.name}: the server refused the download (HTTP {status}){hint}")
    if 400 <= status < 500 and status not in (408, 429):
        raise DownloadError(f"{dest.name}: {task.url} answered HTTP {status}")
    if status >= 400:
        raise requests.HTTPError(f"HTTP {status}")
    if status == 206 and not re.match(rf"bytes {have}-", response.headers.get("Content-Range", "")):
        part.unlink(missing_ok=True)  # not the range asked for: start again from zero
        raise requests.ConnectionError("the server resumed at another offset")
    if status != 206:  # 200: the whole file, whatever was asked
        have = 0
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        total = have + int(length)
    done = have
    with open(part, "ab" if status == 206 else "wb") as handle:
        for chunk in response.iter_content(CHUNK):
            handle.write(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, total)
    if total is not None and done < total:
        raise requests.ConnectionError(f"connection closed at {done} of {total} bytes")


def _part_pid(dest: Path, part: Path) -> int | None:
    """The pid in one of `dest`'s part file names; 0 for the old shared `<name>.part`; None if not one."""
    name = part.name
    if not (name.startswith(dest.name + ".") and name.endswith(".part")):
        return None
    middle = name[len(dest.name) + 1:-len(".part")]
    if middle == "":
        return 0
    match = re.fullmatch(r"(\d+)-[0-9a-f]+-[0-9a-f]+", middle)
    return int(match.group(1)) if match else None


def _abandoned(part: Path, pid: int) -> bool:
    """Whether no running download writes `part` (this process's own are abandoned: the caller
    holds the only download of their target here)."""
    import psutil

    if pid in (0, os.getpid()):
        return True
    try:
        stale = time.time() - part.stat().st_mtime > STALE_PART_SECONDS
    except OSError:
        return False
    return stale or not psutil.pid_exists(pid)


def claim_part(dest: Path) -> Path:
    """A part file for this download alone, holding the bytes of the largest abandoned part file
    of `dest` when there is one (the others are deleted)."""
    part = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident():x}-{secrets.token_hex(4)}.part")
    leftovers = []
    for path in dest.parent.iterdir():
        pid = _part_pid(dest, path)
        if pid is not None and _abandoned(path, pid):
            with contextlib.suppress(OSError):
                leftovers.append((path.stat().st_size, path))
    claimed = False
    for _size, path in sorted(leftovers, reverse=True):
        try:
            if claimed:
                path.unlink()
            else:
                os.rename(path, part)  # atomic: of two processes claiming one file, one wins
                claimed = True
                logger.info("{}: resuming from {} bytes left by an earlier download", dest.name, _size)
        except OSError:
            continue  # another process took it first
    return part


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


# Seconds between two progress lines of a download when there is no terminal for a bar.
LOG_PROGRESS_EVERY = 10.0


def mirrored(url: str | None, mirror: str) -> str | None:
    """`url` as served by a mirror (`download_mirror`): `<mirror>/<host>/<path>[?query]`; unchanged without one."""
    if not url or not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.hostname}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def download_all(tasks: list[DownloadTask], *, token: str | None = None, show_progress: bool = True,
                 mirror: str = "") -> list[str]:
    """Download every task with a progress bar each; returns error messages (empty when all worked), a
    lack of disk space included, for the caller to say once. Once a host cannot be reached at all, its other
    files are not tried. With `mirror`, every file comes from the mirror instead (see `mirrored`)."""
    if mirror:
        import dataclasses

        tasks = [dataclasses.replace(task, url=mirrored(task.url, mirror)) for task in tasks]
    needed = sum(t.size or 0 for t in tasks)
    if tasks:
        try:
            check_free_space(tasks[0].dest.parent, needed)
        except DownloadError as exc:
            return [str(exc)]
    errors = []
    unreachable: set[str] = set()
    progress = rich_progress() if show_progress else None
    if progress is not None:
        progress.start()
    try:
        for task in tasks:
            host = urlsplit(task.url).hostname or ""
            if host in unreachable:
                message = (f"{task.dest.name}: not tried, {host} cannot be reached. To place the file by hand, "
                           f"download {task.url} and save it as {task.dest.name} in {task.dest.parent}")
                errors.append(message)
                continue
            bar = progress.add_task(task.dest.name, total=task.size) if progress is not None else None
            logged = [time.monotonic()]

            def update(done: int, total: int | None, bar=bar, name=task.dest.name, logged=logged) -> None:
                if progress is not None:
                    progress.update(bar, completed=done, total=total)
                elif time.monotonic() - logged[0] >= LOG_PROGRESS_EVERY:  # no bar on a non-terminal: a line
                    logged[0] = time.monotonic()
                    share = f"{100 * done / total:.0f}% of {total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
                    logger.info("downloading {}: {}", name, share)

            try:
                download(task, token=token, on_progress=update)
                logger.info("downloaded and verified {}", task.dest.name)
            except DownloadError as exc:
                if isinstance(exc, HostUnreachable):
                    unreachable.add(exc.host)
                errors.append(str(exc))
    finally:
        if progress is not None:
            progress.stop()
    return errors
