"""Log files in logs/: bridge.log has everything, trace.log warnings and errors; both rotated."""

from __future__ import annotations

import sys
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
    logger.add(sink, level=console_level, format=CONSOLE_FORMAT, diagnose=False, colorize=None)
