"""The README's local-mode commands, run as a volunteer would run them."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import REPO


def run_bridge(tmp_path, model_cache, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    env.update({"AIWORKER_CACHE_HOME": str(model_cache), "HORDE_WORKER_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    return subprocess.run([str(REPO / "horde-bridge.sh"), "--log-dir", str(tmp_path / "logs"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_local_jobs_serves_samples_and_ends_with_a_summary(tmp_path, model_cache):
    result = run_bridge(tmp_path, model_cache, "--local", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("summary: jobs=2 ") and "images=2" in last and "megapixelsteps/s=" in last
    assert "LOCAL MODE" in result.stderr
    assert (tmp_path / "logs" / "bridge.log").read_text().count("submitted: 1 image(s)") == 2
    # A quiet console: only the worker's own lines (no library warnings, progress bars or "0/0" while loading).
    noise = [line for line in result.stderr.splitlines() if line.strip() and not re.match(r"^\d\d:\d\d:\d\d ", line)]
    assert noise == [], noise[:5]
    assert " 0/0 " not in result.stderr and "Warning" not in result.stderr


def test_other_libraries_warnings_go_to_the_log_files_not_the_console(tmp_path):
    code = ("import logging, warnings, pathlib; from horde_worker.ui.logs import setup_logging; "
            f"setup_logging(pathlib.Path({str(tmp_path / 'logs')!r})); "
            "warnings.warn('a library is deprecated', FutureWarning); "
            "logging.getLogger('somelib').warning('weights initialised randomly'); "
            "from loguru import logger; logger.warning('the worker speaks')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "the worker speaks" in result.stderr
    assert "deprecated" not in result.stderr and "randomly" not in result.stderr
    trace = (tmp_path / "logs" / "trace.log").read_text()
    assert "FutureWarning: a library is deprecated" in trace and "somelib: weights initialised randomly" in trace


def test_local_requests_file_is_replayed_into_out(tmp_path, model_cache):
    def b64(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="WEBP", lossless=True)
        return base64.b64encode(buffer.getvalue()).decode()

    red = Image.new("RGB", (64, 64), "red")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    house = Image.new("RGB", (64, 64), "white")
    house.paste((0, 0, 0), (16, 16, 48, 48))
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps([
        {"prompt": "a red square ### blue", "params": {"n": 2, "steps": 3, "width": 192, "height": 128,
                                                      "seed": "77", "sampler_name": "k_euler"}},
        {"prompt": "a portrait", "params": {"n": 1, "steps": 3, "width": 64, "height": 64, "facefixer_strength": 1.0,
                                            "post_processing": ["GFPGAN", "RealESRGAN_x2plus", "strip_background"]}},
        {"prompt": "a castle", "models": ["horde-worker-tiny-sdxl"], "params": {"steps": 3, "width": 128, "height": 128}},
        {"prompt": "a fox ### sea", "models": ["horde-worker-tiny-flux"],
         "params": {"steps": 3, "width": 128, "height": 128, "sampler_name": "k_euler", "cfg_scale": 2.0}},
        {"prompt": "a lighthouse", "models": ["horde-worker-tiny-sd2"], "params": {"steps": 3, "width": 128, "height": 128}},
        {"prompt": "a tower", "models": ["horde-worker-tiny-zimage"],
         "params": {"steps": 9, "width": 128, "height": 64, "sampler_name": "k_euler", "cfg_scale": 1.0}},
        {"prompt": "a harbour ### fog", "models": ["horde-worker-tiny-qwen"],
         "params": {"steps": 20, "width": 64, "height": 128, "sampler_name": "k_euler", "cfg_scale": 2.5}},
        {"prompt": "a meadow", "models": ["horde-worker-tiny-cascade"],
         "params": {"steps": 20, "width": 128, "height": 64, "sampler_name": "k_dpmpp_2m", "cfg_scale": 4.0,
                    "post_processing": ["RealESRGAN_x2plus"]}},
        {"prompt": "a red door", "models": ["horde-worker-tiny-sd15-inpainting"], "source_processing": "inpainting",
         "source_image": b64(red), "source_mask": b64(mask), "params": {"steps": 3, "width": 64, "height": 64}},
        {"prompt": "a blue boat", "source_image": b64(red), "params": {"steps": 3, "width": 64, "height": 64,
                                                                       "denoising_strength": 0.5}},
        {"prompt": "a knight", "params": {"steps": 3, "width": 64, "height": 64, "seed": "3",
                                          "loras": [{"name": "1", "inject_trigger": "any"}, {"name": "999"}],
                                          "tis": [{"name": "horde-worker-tiny-ti-sd15", "inject_ti": "negprompt"}]}},
        {"prompt": "a house", "source_image": b64(house), "params": {"steps": 3, "width": 64, "height": 64,
                                                                     "control_type": "canny",
                                                                     "return_control_map": True}},
        {"prompt": "a house", "source_image": b64(house), "params": {"steps": 3, "width": 64, "height": 64,
                                                                     "control_type": "hed"}},
    ]))
    out = tmp_path / "out"
    result = run_bridge(tmp_path, model_cache, "--local", "--requests", str(requests_file), "--out", str(out),
                        "--name", "replayer")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 13, result.stderr[-3000:]
    first = results[0]
    assert first["done"] and [g["seed"] for g in first["generations"]] == ["77", "78"]
    for gen in first["generations"]:
        assert (gen["width"], gen["height"]) == (192, 128) and gen["state"] == "ok"
        assert gen["model"] == "horde-worker-tiny-sd15"
        with Image.open(out / gen["file"]) as image:
            assert image.format == "WEBP" and image.size == (192, 128)
    # Post-processing in the job's order: face fixed, upscaled x2, background cut out (alpha channel).
    portrait = results[1]["generations"][0]
    assert results[1]["done"] and portrait["state"] == "ok" and portrait["gen_metadata"] == []
    with Image.open(out / portrait["file"]) as image:
        assert image.size == (128, 128) and image.mode == "RGBA"
        assert np.asarray(image)[:, :, 3].std() > 0
    # Every baseline has a tiny model in local mode.
    models = ["horde-worker-tiny-sdxl", "horde-worker-tiny-flux", "horde-worker-tiny-sd2", "horde-worker-tiny-zimage",
              "horde-worker-tiny-qwen", "horde-worker-tiny-cascade"]
    for entry, model in zip(results[2:8], models, strict=True):
        assert entry["done"] and [g["model"] for g in entry["generations"]] == [model], entry
    with Image.open(out / results[5]["generations"][0]["file"]) as image:
        assert image.size == (128, 64)
    with Image.open(out / results[6]["generations"][0]["file"]) as image:
        assert image.size == (64, 128)
    with Image.open(out / results[7]["generations"][0]["file"]) as image:
        assert image.size == (256, 128)  # post-processed as any other baseline's image: upscaled x2
    results = results[:5] + results[8:]  # the rest as before
    inpainted, img2img = results[5]["generations"][0], results[6]["generations"][0]
    with Image.open(out / inpainted["file"]) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    assert np.abs(pixels[:, 40:] - [255, 0, 0]).max() <= 8  # kept half: still red (lossy WebP aside)
    assert np.abs(pixels[:, :28] - [255, 0, 0]).mean() > 20  # repainted half changed
    assert img2img["state"] == "ok" and img2img["model"] == "horde-worker-tiny-sd15"
    knight = results[7]["generations"][0]
    assert knight["state"] == "ok"
    assert knight["gen_metadata"] == [{"type": "lora", "value": "download_failed", "ref": "999"}]
    assert results[8]["generations"], result.stderr[-5000:]
    with Image.open(out / results[8]["generations"][0]["file"]) as image:
        edges = np.asarray(image.convert("L"), dtype=int)
    assert edges[32, 32] < 60 and edges[16:48, 14:18].max() > 150  # Canny: dark inside, bright at the square's edge
    assert results[9]["done"] and results[9]["generations"][0]["state"] == "ok", (results[9], result.stderr[-3000:])


def test_bad_requests_file_is_a_clear_error(tmp_path, model_cache):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "not a list"}')
    result = run_bridge(tmp_path, model_cache, "--local", "--requests", str(bad))
    assert result.returncode == 2 and "must be a JSON list" in result.stderr
