"""Keeping the worker's child processes (inference, safety) tied to the supervisor.

A Ctrl+C in a terminal reaches every process of the foreground group, children included; the
supervisor alone decides how the children end, so they ignore SIGINT. A child whose supervisor
died (killed, crashed) has nobody to answer to and would hold its GPU memory forever, so a
watchdog thread ends it as soon as its parent is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import NoReturn


def ignore_sigint() -> None:
    """Ignore SIGINT in this process from now on (main thread only: Python sets handlers only there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored for the duration of the block, then the previous handler back.

    Wrap `process.start()` in it: a spawned child inherits the ignored disposition across exec, and
    Python keeps an inherited SIG_IGN for SIGINT at start-up, so the child ignores a Ctrl+C from its
    very first instruction, before its own code could set anything. Off the main thread it does
    nothing (handlers can only be changed there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        # None: the handler was set outside Python and cannot be put back; Python's own is the nearest.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def parent_pid() -> int:
    """The pid of the process that spawned this one, as multiprocessing recorded it at spawn time
    (os.getppid() would already name init if that parent died while this process was starting)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def install_orphan_watchdog(parent_pid: int, grace: float = 0.5) -> threading.Thread:
    """End this process (os._exit(0)) within about `grace` seconds of `parent_pid` being gone.

    A daemon thread polls every `grace` seconds. When `parent_pid` is this process's parent on POSIX, a
    changed os.getppid() (the orphan was re-parented) is the sign; otherwise the pid no longer running.
    os._exit works while the main thread is deep inside a torch op, which releases the GIL.
    """
    # POSIX re-parents an orphan, so a direct child just compares getppid(); Windows never does.
    direct = os.name == "posix" and os.getppid() == parent_pid
    interval = max(0.05, grace)

    def gone() -> bool:
        return os.getppid() != parent_pid if direct else not _alive(parent_pid)

    def watch() -> None:
        while not gone():
            time.sleep(interval)
        with contextlib.suppress(Exception):
            from loguru import logger

            logger.warning("parent process {} is gone; exiting", parent_pid)
        os._exit(0)

    thread = threading.Thread(target=watch, name="orphan-watchdog", daemon=True)
    thread.start()
    return thread


def exit_soon(grace: float = 0.2, code: int = 0) -> NoReturn:
    """End the process after `grace` seconds, whatever its other threads are doing (log lines flush meanwhile)."""
    time.sleep(grace)
    os._exit(code)
