"""The live status line: jobs done, queue, current progress, kudos and speed."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger
from rich.console import Console
from rich.live import Live
from rich.text import Text

# Seconds between two logged status lines on a non-terminal while jobs run (otherwise `every`).
BUSY_EVERY = 5.0


class StatusLine:
    """Redraws one line in place on a terminal; elsewhere logs it every `every` seconds, every BUSY_EVERY
    seconds while `busy()` says jobs are running (so a log shows long work moving)."""

    def __init__(self, render: Callable[[], str], every: float = 30.0, console: Console | None = None,
                 live: bool | None = None, busy: Callable[[], bool] | None = None) -> None:
        self.render = render
        self.every = every
        self.busy = busy
        self.console = console or Console(stderr=True)
        self.use_live = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._since_log = 0.0

    def start(self) -> None:
        if self.use_live:
            self._live = Live(Text(self.render()), console=self.console, refresh_per_second=2, transient=True)
            self._live.start()

    def tick(self, seconds: float) -> None:
        """Called about once a second by the supervisor."""
        if self._live is not None:
            self._live.update(Text(self.render()))
            return
        self._since_log += seconds
        every = min(self.every, BUSY_EVERY) if self.busy is not None and self.busy() else self.every
        if self._since_log >= every:
            self._since_log = 0.0
            logger.info(self.render())

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
