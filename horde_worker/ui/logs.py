"""Log files in logs/: bridge.log has everything, trace.log warnings and errors; both rotated.

Other libraries' warnings (Python's `warnings`, and their `logging` records) go to the files, never to the
console: a volunteer's console shows what the worker itself has to say, each thing once.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}"


def setup_logging(log_dir: Path, console_level: str = "INFO", console=None) -> None:
    """Send logs to logs/bridge.log, logs/trace.log and the console.

    `diagnose` stays off everywhere: with it loguru prints local variables in tracebacks,
    and one of them could be the API key.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.add(log_dir / "bridge.log", level="DEBUG", rotation="20 MB", retention=5, diagnose=False,
               enqueue=False, encoding="utf-8")
    logger.add(log_dir / "trace.log", level="WARNING", rotation="20 MB", retention=5, diagnose=False,
               backtrace=True, encoding="utf-8")
    sink = console if console is not None else sys.stderr
    logger.add(sink, level=console_level, format=CONSOLE_FORMAT, diagnose=False, colorize=None,
               filter=lambda record: not record["extra"].get("third_party"))
    capture_third_party()


class _ToLoguru(logging.Handler):
    """Standard-library log records of other libraries, into loguru (marked, so the console leaves them out)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            try:
                level = logger.level(record.levelname).name
            except ValueError:
                level = record.levelno
            logger.bind(third_party=True).log(level, "{}: {}", record.name, record.getMessage())
        except Exception:  # a library's malformed record must not raise into the library
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logger.bind(third_party=True).warning("{}: {} ({}:{})", category.__name__, message, filename, lineno)


def capture_third_party() -> None:
    """Route Python warnings and other libraries' logging (WARNING and up) into the log files of this process."""
    logging.root.handlers = [_ToLoguru()]
    logging.root.setLevel(logging.WARNING)
    warnings.showwarning = _show_warning
