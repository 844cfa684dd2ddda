"""Worker settings: bridgeData.yaml, AIWORKER_* variables, command-line overrides."""

from horde_worker.config.bridge_data import BridgeData
from horde_worker.config.loader import ConfigError, ConfigWatcher, LoadedConfig, load_config

__all__ = ["BridgeData", "ConfigError", "ConfigWatcher", "LoadedConfig", "load_config"]
