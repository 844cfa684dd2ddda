"""bridgeData.yaml: the template, validation messages, AIWORKER_* overrides, live reload."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from horde_worker.config import ConfigError, ConfigWatcher, load_config
from horde_worker.config.bridge_data import NOT_YET_HONOURED, BridgeData
from tests.conftest import REPO

REGEN_KEYS = [
    "allow_controlnet", "allow_lora", "allow_painting", "allow_post_processing", "allow_sdxl_controlnet",
    "allow_unsafe_ip", "api_key", "blacklist", "cache_home", "censor_nsfw", "censorlist", "civitai_api_token",
    "dreamer_name", "exit_on_unhandled_faults", "extra_slow_worker", "high_memory_mode", "high_performance_mode",
    "horde_url", "limit_max_steps", "limited_console_messages", "load_large_models", "max_batch",
    "max_lora_cache_size", "max_power", "max_threads", "models_to_load", "models_to_skip",
    "moderate_performance_mode", "nsfw", "post_process_job_overlap", "priority_usernames",
    "purge_loras_on_download", "queue_size", "ram_to_leave_free", "remove_maintenance_on_init",
    "require_upfront_kudos", "safety_on_gpu", "stats_output_frequency", "unload_models_from_vram_often",
    "very_fast_disk_mode", "vram_to_leave_free", "custom_models", "allow_img2img",
]


def test_template_documents_every_regen_key_and_validates():
    text = (REPO / "bridgeData_template.yaml").read_text()
    data = yaml.safe_load(text)
    # The reference worker's keys that do nothing here are out of the template, each named with its reason.
    missing = [key for key in REGEN_KEYS if key not in data and not (key in NOT_YET_HONOURED and key in text)]
    assert not missing
    loaded = load_config(REPO / "bridgeData_template.yaml", environ={})
    assert not [n for n in loaded.notices if "unknown key" in n]
    assert loaded.data.max_pixels == 64 * 64 * 8 * loaded.data.max_power


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_threads", "many", "max_threads = 'many': Input should be a valid integer"),
    ("max_batch", 50, "max_batch = 50: Input should be less than or equal to 20"),
    ("nsfw", "perhaps", "nsfw = 'perhaps': Input should be a valid boolean"),
    ("priority_usernames", ["db0"], "must be written as alias#id"),
    ("ram_to_leave_free", "lots", "must be a percentage such as '80%'"),
    ("horde_url", "aihorde.net", "must be an http(s) URL"),
])
def test_wrong_values_name_the_key_value_and_what_is_allowed(tmp_path, key, value, expected):
    path = tmp_path / "bridgeData.yaml"
    path.write_text(yaml.safe_dump({"api_key": "k", key: value}))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert expected in str(err.value) and str(path) in str(err.value)


def test_api_key_value_is_never_echoed_in_errors(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text("api_key: [not, a, string]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "api_key" in str(err.value) and "not" not in str(err.value).split("api_key", 1)[1].split(":", 1)[0]


def test_not_yaml_mapping_is_refused(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path, environ={})


def test_env_overrides_file_and_cli_overrides_env(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text(yaml.safe_dump({"api_key": "file", "max_threads": 1, "dreamer_name": "file-name"}))
    env = {"AIWORKER_MAX_THREADS": "2", "AIWORKER_MODELS_TO_LOAD": "Deliberate, stable_diffusion",
           "AIWORKER_NSFW": "false", "AIWORKER_API_KEY": "0123456789", "AIWORKER_DREAMER_NAME": "env-name"}
    loaded = load_config(path, {"dreamer_name": "cli-name"}, environ=env)
    assert loaded.data.max_threads == 2 and loaded.data.nsfw is False
    assert loaded.data.models_to_load == ["Deliberate", "stable_diffusion"]
    assert loaded.data.api_key == "0123456789" and loaded.data.dreamer_name == "cli-name"


def test_unknown_and_not_yet_honoured_keys_are_reported(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text(yaml.safe_dump({"api_key": "k", "max_thread": 2, "allow_sdxl_controlnet": True,
                                     "high_performance_mode": True, "high_memory_mode": True,
                                     "post_process_job_overlap": True}))
    notices = load_config(path, environ={}).notices
    assert any("unknown key 'max_thread'" in n for n in notices)
    assert any(n.startswith("allow_sdxl_controlnet is set but not acted on yet") for n in notices)
    honoured = ("post_process_job_overlap", "high_memory_mode", "high_performance_mode")
    assert not any(key in n for n in notices for key in honoured)  # honoured now


def test_empty_models_to_load_means_top_two():
    assert BridgeData(models_to_load=[]).models_to_load == ["TOP 2"]


def test_watcher_applies_live_keys_and_flags_restart_keys(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text(yaml.safe_dump({"api_key": "k", "nsfw": True, "max_threads": 1}))
    watcher = ConfigWatcher(load_config(path, environ={}))
    assert watcher.poll() == ({}, [])
    path.write_text(yaml.safe_dump({"api_key": "k", "nsfw": False, "max_threads": 2, "blacklist": ["x"]}))
    stamp = time.time() + 5
    os.utime(path, (stamp, stamp))
    applied, restart = watcher.poll()
    assert applied == {"nsfw": False, "blacklist": ["x"]}
    assert watcher.current.data.nsfw is False and watcher.current.data.max_threads == 1
    assert restart == [f"max_threads changed in {path}: restart the worker to apply it"]


def test_a_file_that_is_not_utf8_is_named_with_the_fix(tmp_path):
    from horde_worker.config import ConfigError, load_config

    path = tmp_path / "bridgeData.yaml"
    path.write_bytes(b"dreamer_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bridgeData.yaml: byte b.\\xe9. at position 17 is not UTF-8; save"):
        load_config(path)


def test_performance_modes_pop_jobs_ahead_and_are_live():
    from horde_worker.config.bridge_data import LIVE_KEYS, NOT_YET_HONOURED, BridgeData

    assert BridgeData().extra_queue(4) == 0
    assert BridgeData(moderate_performance_mode=True).extra_queue(4) == 1
    assert BridgeData(high_performance_mode=True).extra_queue(4) == 4  # a whole engine's worth
    assert BridgeData(high_performance_mode=True, moderate_performance_mode=True).extra_queue(1) == 2
    assert {"high_performance_mode", "moderate_performance_mode"} <= LIVE_KEYS
    assert not {"high_performance_mode", "moderate_performance_mode"} & set(NOT_YET_HONOURED)


def test_preload_timeout_must_be_positive():
    import pydantic

    from horde_worker.config.bridge_data import BridgeData

    assert BridgeData().preload_timeout == 80
    with pytest.raises(pydantic.ValidationError, match="preload_timeout"):
        BridgeData(preload_timeout=0)


def test_the_ram_budget_covers_every_process_of_the_worker(tmp_path):
    import psutil

    from horde_worker.cli import SAFETY_PROCESS_RAM, slot_specs

    total = psutil.virtual_memory().total
    one = slot_specs(["cpu"], BridgeData(ram_to_leave_free="50%"), tmp_path)
    two = slot_specs(["cuda:0", "cuda:1"], BridgeData(ram_to_leave_free="50%"), tmp_path)
    assert one[0].ram_budget == max(0, total - total // 2 - SAFETY_PROCESS_RAM)
    assert [s.ram_budget for s in two] == [one[0].ram_budget // 2] * 2
