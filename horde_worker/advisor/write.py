"""Putting the advisor's settings into bridgeData.yaml, keeping its comments and every other line as it was."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml


def _value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def write_settings(path: Path, settings: dict[str, Any]) -> list[str]:
    """Set each top-level key in `path` (a copy of the old file is kept beside it as .bak); keys the file lacks
    are added at its end. Returns the keys changed or added."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    changed = []
    for key, value in settings.items():
        pattern = re.compile(rf"^({re.escape(key)}:[ \t]*)([^#\n]*?)([ \t]*#.*)?$")
        for index, line in enumerate(lines):
            match = pattern.match(line)
            if match:
                if match.group(2).strip() != _value(value):
                    lines[index] = f"{match.group(1)}{_value(value)}{match.group(3) or ''}"
                    changed.append(key)
                break
        else:
            lines.append(f"{key}: {_value(value)}  # set by --benchmark")
            changed.append(key)
    text = "\n".join(lines) + "\n"
    try:
        written = yaml.safe_load(text)  # checked before anything is written
    except yaml.YAMLError:
        written = None
    if not isinstance(written, dict) or any(written.get(k) != v for k, v in settings.items()):
        raise ValueError(f"{path}: the settings could not be written in place (a value on its own line?); edit "
                         "the file by hand")
    if path.exists():
        shutil.copy2(path, path.with_suffix(path.suffix + ".bak"))
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return changed
