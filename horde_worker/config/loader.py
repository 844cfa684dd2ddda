"""Reading bridgeData.yaml, applying AIWORKER_* overrides and watching the file for changes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from horde_worker.config.bridge_data import LIVE_KEYS, NOT_YET_HONOURED, BridgeData

ENV_PREFIX = "AIWORKER_"


class ConfigError(ValueError):
    """A setting is wrong; the message names the key, the value and what is allowed."""


def _describe(error: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(file)"
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    shown = "********" if key == "api_key" else repr(value)
    return f"{source}: {key} = {shown}: {message}"


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings given as AIWORKER_<KEY> environment variables (values parsed as YAML)."""
    environ = os.environ if environ is None else environ
    known = set(BridgeData.model_fields)
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in known:
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if key in ("api_key", "dreamer_name", "civitai_api_token"):
            value = text
        out[key] = value
    return out


@dataclass
class LoadedConfig:
    """Validated settings plus what the user should be told about them."""

    data: BridgeData
    path: Path | None
    raw_keys: set[str] = field(default_factory=set)
    notices: list[str] = field(default_factory=list)
    # The environment the settings were read with (None: the process's own), read again on reload.
    environ: dict[str, str] | None = None


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file, or a ConfigError saying what is wrong with it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: byte {exc.object[exc.start:exc.start + 1]!r} at position {exc.start} is not UTF-8; "
                          "save the file as UTF-8 (any text editor can)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value lines, like bridgeData_template.yaml")
    return data


def load_config(path: Path | None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> LoadedConfig:
    """File, then AIWORKER_* variables, then command-line overrides; validated."""
    raw: dict[str, Any] = read_yaml(path) if path is not None and path.exists() else {}
    merged = {**raw, **env_overrides(environ), **(overrides or {})}
    source = str(path) if path is not None else "settings"
    try:
        data = BridgeData.model_validate(merged)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    notices = [f"{source}: unknown key {key!r} is ignored (check its spelling against bridgeData_template.yaml)"
               for key in data.unknown_keys()]
    defaults = BridgeData()
    for key, why in NOT_YET_HONOURED.items():
        if key in merged and getattr(data, key) != getattr(defaults, key):
            notices.append(f"{key} is set but not acted on yet: {why}")
    return LoadedConfig(data=data, path=path, raw_keys=set(merged), notices=notices, environ=environ)


class ConfigWatcher:
    """Re-reads the file when it changes and reports which keys changed."""

    def __init__(self, loaded: LoadedConfig, overrides: dict[str, Any] | None = None) -> None:
        self.current = loaded
        self.overrides = overrides or {}
        self._stamp = self._mtime()

    def _mtime(self) -> float | None:
        path = self.current.path
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None

    def poll(self) -> tuple[dict[str, Any], list[str]]:
        """Applied live changes ({key: new value}) and messages for changes that need a restart."""
        stamp = self._mtime()
        if stamp is None or stamp == self._stamp:
            return {}, []
        self._stamp = stamp
        fresh = load_config(self.current.path, self.overrides, self.current.environ)
        old, new = self.current.data, fresh.data
        applied, restart = {}, []
        for key in BridgeData.model_fields:
            before, after = getattr(old, key), getattr(new, key)
            if before == after:
                continue
            if key in LIVE_KEYS:
                applied[key] = after
            else:
                restart.append(f"{key} changed in {self.current.path}: restart the worker to apply it")
        for key, value in applied.items():
            setattr(self.current.data, key, value)
        return applied, restart
