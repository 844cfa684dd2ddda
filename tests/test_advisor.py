"""The settings advisor (`--benchmark`): recommendations from measurements of typical machines, the settings file
rewritten with its comments kept, and the whole command run on this CPU."""

from __future__ import annotations

import os
import subprocess

import yaml

from horde_worker.advisor.recommend import GIB, DeviceFigures, Measurement, recommend, report
from horde_worker.advisor.write import write_settings
from tests.conftest import REPO


def _gpu(vram_gib: float, single: float, batched: float) -> DeviceFigures:
    return DeviceFigures("cuda:0", "a GPU", int(vram_gib * GIB), {1: single, 4: batched})


def test_a_slow_cpu_must_be_an_extra_slow_worker_with_small_jobs():
    advice = recommend(Measurement(16 * GIB, [DeviceFigures("cpu", "CPU", None, {1: 60.0, 4: 58.0})]))
    assert advice.settings["extra_slow_worker"] is True and advice.settings["max_power"] == 8
    assert advice.settings["max_batch"] == 1 and advice.settings["safety_on_gpu"] is False
    assert advice.baselines == ["stable_diffusion_1", "stable_diffusion_2"]
    assert advice.megapixelsteps_per_second < 0.5 and any("extra_slow_worker" in n for n in advice.notes)


def test_an_8_gib_card_serves_sdxl_at_moderate_sizes():
    advice = recommend(Measurement(16 * GIB, [_gpu(8, 2.5, 2.0)]))
    s = advice.settings
    assert s["extra_slow_worker"] is False and s["max_power"] == 16 and s["max_batch"] == 1
    assert "stable_diffusion_xl" in advice.baselines and "flux_1" not in advice.baselines
    assert s["load_large_models"] is False and s["safety_on_gpu"] is False


def test_a_24_gib_card_with_much_ram_takes_big_jobs_batches_and_large_models():
    advice = recommend(Measurement(64 * GIB, [_gpu(24, 0.8, 0.5)]))
    s = advice.settings
    assert s["max_power"] == 64 and s["max_batch"] == 6 and s["max_threads"] == 2 and s["queue_size"] == 2
    assert s["safety_on_gpu"] and s["post_process_job_overlap"] and s["load_large_models"]
    assert {"flux_1", "qwen_image", "z_image_turbo", "stable_cascade"} <= set(advice.baselines)
    assert advice.megapixelsteps_per_second == round(5.24288 / 0.8, 3)
    assert 3600 / 0.8 * 5.5 < advice.kudos_per_hour < 3600 / 0.8 * 6.0
    # No batching gain: one image at a time.
    assert recommend(Measurement(64 * GIB, [_gpu(24, 0.8, 0.79)])).settings["max_batch"] == 1
    # The same card short of RAM: no Qwen-Image.
    assert "qwen_image" not in recommend(Measurement(32 * GIB, [_gpu(24, 0.8, 0.5)])).baselines


def test_two_gpus_add_up_and_the_report_names_each():
    measurement = Measurement(64 * GIB, [_gpu(24, 1.0, 0.7), DeviceFigures("cuda:1", "another", 12 * GIB,
                                                                            {1: 2.0, 4: 1.5})])
    advice = recommend(measurement)
    assert advice.megapixelsteps_per_second == round(5.24288 / 1.0 + 5.24288 / 2.0, 3)
    text = report(measurement, advice)
    assert "cuda:1 (another, 12 GiB)" in text and "max_power:" in text and "kudos/hour" in text


def test_writing_keeps_comments_and_other_keys(tmp_path):
    path = tmp_path / "bridgeData.yaml"
    path.write_text("# my worker\napi_key: \"abc\"  # secret\nmax_power: 8  # how big\nqueue_size: 1\n")
    changed = write_settings(path, {"max_power": 32, "queue_size": 1, "safety_on_gpu": True})
    assert changed == ["max_power", "safety_on_gpu"]
    text = path.read_text()
    assert text.startswith("# my worker\napi_key: \"abc\"  # secret\nmax_power: 32  # how big\nqueue_size: 1\n")
    assert "safety_on_gpu: true  # set by --benchmark" in text
    assert yaml.safe_load(text)["max_power"] == 32
    assert (tmp_path / "bridgeData.yaml.bak").read_text().count("max_power: 8") == 1


def test_the_benchmark_command_runs_on_this_cpu_and_writes_the_file(tmp_path):
    config = tmp_path / "bridgeData.yaml"
    config.write_text("# kept\nmax_power: 8\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    env["HORDE_WORKER_DEVICE"] = "cpu"
    result = subprocess.run([str(REPO / "horde-bridge.sh"), "--log-dir", str(tmp_path / "logs"), "-c", str(config),
                             "--benchmark", "--benchmark-quick", "--write"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recommended settings:" in result.stdout and "batch 4:" in result.stdout
    written = yaml.safe_load(config.read_text())
    assert {"max_power", "max_batch", "extra_slow_worker", "safety_on_gpu"} <= set(written)
    assert config.read_text().startswith("# kept\n")


def test_a_file_it_cannot_rewrite_in_place_is_left_as_it_was(tmp_path):
    import pytest

    path = tmp_path / "bridgeData.yaml"
    original = "max_power:\n  8\nqueue_size: 1\n"
    path.write_text(original)
    with pytest.raises(ValueError, match="edit the file by hand"):
        write_settings(path, {"max_power": 32})
    assert path.read_text() == original and not (tmp_path / "bridgeData.yaml.bak").exists()
