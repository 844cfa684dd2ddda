"""The worker as a real process against the local horde over real HTTP."""

from __future__ import annotations

import io
import re
import signal
import time

import numpy as np
import psutil
import requests
from PIL import Image

from horde_worker.localhorde import FaultPlan
from tests.conftest import wait_for


def post(horde, prompt: str, **params) -> str:
    body = {"prompt": prompt, "params": {"steps": 4, "width": 256, "height": 256, "n": 1, **params},
            "models": ["horde-worker-tiny-sd15"]}
    answer = requests.post(f"{horde.url}/v2/generate/async", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def status(horde, request_id: str) -> dict:
    return requests.get(f"{horde.url}/v2/generate/status/{request_id}", timeout=10).json()


def images_of(horde, request_id: str) -> list[tuple[dict, np.ndarray]]:
    out = []
    for gen in status(horde, request_id)["generations"]:
        data = requests.get(gen["img"], timeout=10).content
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        out.append((gen, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    return out


def test_batch_seed_and_ctrl_c_drain(local_horde, start_worker):
    worker = start_worker(local_horde)
    batch = post(local_horde, "a lighthouse ### fog", n=3, width=320, height=256, seed="1234")
    wait_for(lambda: status(local_horde, batch)["done"], 180, "the n=3 request")
    images = images_of(local_horde, batch)
    assert len(images) == 3
    assert all(img.shape == (256, 320, 3) for _, img in images)
    pixels = [img.astype(int) for _, img in images]
    assert np.abs(pixels[0] - pixels[1]).mean() > 5 and np.abs(pixels[1] - pixels[2]).mean() > 5
    seeds = sorted(int(gen["seed"]) for gen, _ in images)
    assert seeds == [1234, 1235, 1236]

    # The seed submitted for an image regenerates that image when requested alone.
    second = next(img for gen, img in images if gen["seed"] == "1235")
    again = post(local_horde, "a lighthouse ### fog", width=320, height=256, seed="1235")
    wait_for(lambda: status(local_horde, again)["done"], 120, "the single-seed request")
    (gen, alone), = images_of(local_horde, again)
    assert gen["seed"] == "1235"
    assert np.abs(alone.astype(int) - second.astype(int)).mean() < 2.0

    # Ctrl+C while a job runs: popping stops, the job is finished and submitted, exit 0.
    slow = post(local_horde, "a slow one", steps=40, width=512, height=512)
    wait_for(lambda: status(local_horde, slow)["processing"] == 1, 60, "the slow job to be popped")
    worker.interrupt()
    queued = post(local_horde, "arrives after Ctrl+C")
    assert worker.wait(timeout=180) == 0, worker.output()
    assert status(local_horde, slow)["done"], worker.output()
    assert status(local_horde, queued)["waiting"] == 1  # never popped
    assert worker.output().strip().splitlines()[-1].startswith("summary: jobs=")


def test_killed_inference_process_is_replaced_and_job_answered(local_horde, start_worker):
    worker = start_worker(local_horde)
    request = post(local_horde, "a fox", steps=40, width=512, height=512)
    wait_for(lambda: status(local_horde, request)["processing"] == 1, 90, "the job to be popped")

    def safety_pid() -> int | None:
        found = re.search(r"safety checker ready on \S+ \(.*, process (\d+)\)", worker.output())
        return int(found.group(1)) if found else None

    def inference_children() -> list[psutil.Process]:
        children = psutil.Process(worker.process.pid).children(recursive=True)
        return [c for c in children if "spawn_main" in " ".join(c.cmdline()) and c.pid != safety_pid()]

    wait_for(lambda: safety_pid() and len(inference_children()) == 1 and "slot 0 ready" in worker.output(), 60,
             "the inference process to take the job")
    time.sleep(2)  # let it start sampling
    victim = inference_children()[0]
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: status(local_horde, request)["done"], 240, "the job after the kill")
    (gen, img), = images_of(local_horde, request)
    assert img.shape == (512, 512, 3)
    output = worker.output()
    assert "died (exit code -9)" in output and "runs again" in output
    new_children = inference_children()
    assert new_children and new_children[0].pid != victim.pid


def test_injected_faults_lose_nothing_and_duplicate_nothing(local_horde, start_worker):
    local_horde.set_faults({
        "pop": FaultPlan(rate=0.3, kinds=("500", "503", "429", "reset")),
        "upload": FaultPlan(rate=0.4, kinds=("500", "503", "429", "reset", "reset_after")),
        "submit": FaultPlan(rate=0.4, kinds=("500", "503", "429", "reset", "reset_after")),
    })
    worker = start_worker(local_horde)
    ids = [post(local_horde, f"picture {i}", n=2, seed=str(100 + i)) for i in range(4)]
    wait_for(lambda: all(status(local_horde, r)["done"] for r in ids), 240, "every request under faults")
    counters = local_horde.state.counters()
    done = [g for g, s in counters["states"].items() if s == "done"]
    assert len(done) == 8
    assert all(counters["accepted_per_generation"][g] == 1 for g in done)
    for request_id in ids:
        for _gen, img in images_of(local_horde, request_id):
            assert img.shape == (256, 256, 3) and img.std() > 1
    injected = dict(local_horde.faults_injected)
    assert sum(v for k, v in injected.items() if k.startswith("submit")) > 0, injected
    assert sum(v for k, v in injected.items() if k.startswith("upload")) > 0, injected
    worker.interrupt()
    assert worker.wait(timeout=60) == 0


def test_bad_bridge_data_fails_fast_naming_the_key(local_horde, start_worker):
    worker = start_worker(local_horde, max_threads="many")
    code = worker.wait(timeout=60)
    assert code == 2
    output = worker.output()
    assert "max_threads" in output and "'many'" in output and "valid integer" in output


def test_two_models_switch_preload_and_sdxl_through_the_worker(tmp_path, local_horde, start_worker):
    from horde_worker.inference.tiny import write_tiny_checkpoint

    xl = write_tiny_checkpoint(tmp_path / "my-xl.safetensors", "stable_diffusion_xl")
    local_horde.state.models.append("my-xl")
    worker = start_worker(local_horde, models_to_load=["horde-worker-tiny-sd15", "my-xl"],
                          custom_models=[{"name": "my-xl", "baseline": "stable_diffusion_xl", "filepath": str(xl)}],
                          queue_size=2, ram_to_leave_free="0%")
    ids = []
    for i in range(4):
        body = {"prompt": f"switch {i}", "models": ["my-xl" if i % 2 else "horde-worker-tiny-sd15"],
                "params": {"steps": 3, "width": 192, "height": 192, "n": 1}}
        ids.append(requests.post(f"{local_horde.url}/v2/generate/async", json=body, timeout=10).json()["id"])
    wait_for(lambda: all(status(local_horde, r)["done"] for r in ids), 240, "requests for two models")
    for request_id, model in zip(ids, ["horde-worker-tiny-sd15", "my-xl"] * 2, strict=True):
        ((gen, img),) = images_of(local_horde, request_id)
        assert gen["model"] == model and img.shape == (192, 192, 3)
    log = worker.output()
    assert "serving 2 model(s)" in log
    assert "preloaded in" in log and "model switch to my-xl: from ram" in log
    worker.interrupt()
    assert worker.wait(timeout=60) == 0


def test_models_added_to_bridge_data_while_running_are_served(tmp_path, local_horde, start_worker):
    import os

    import yaml

    from horde_worker.inference.tiny import write_tiny_checkpoint

    local_horde.state.models.append("my-sd2")
    worker = start_worker(local_horde)
    wait_for(lambda: "slot 0 ready" in worker.output(), 90, "the worker to start")
    sd2 = write_tiny_checkpoint(tmp_path / "my-sd2.safetensors", "stable_diffusion_2")
    config = tmp_path / "bridgeData.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["models_to_load"].append("my-sd2")
    settings["custom_models"] = [{"name": "my-sd2", "baseline": "stable_diffusion_2", "filepath": str(sd2)}]
    config.write_text(yaml.safe_dump(settings))
    later = time.time() + 10
    os.utime(config, (later, later))
    body = {"prompt": "new model", "models": ["my-sd2"], "params": {"steps": 3, "width": 128, "height": 128}}
    request_id = requests.post(f"{local_horde.url}/v2/generate/async", json=body, timeout=10).json()["id"]
    wait_for(lambda: status(local_horde, request_id)["done"], 120, "the request for the added model")
    ((gen, img),) = images_of(local_horde, request_id)
    assert gen["model"] == "my-sd2" and img.shape == (128, 128, 3)
    assert "added my-sd2" in worker.output()


def test_source_images_arrive_by_url_and_bad_ones_become_gen_metadata(local_horde, start_worker):
    import base64

    start_worker(local_horde)
    source = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(source, format="WEBP", lossless=True)
    encoded = base64.b64encode(source.getvalue()).decode()

    def post_source(source_image: str, **extra) -> str:
        body = {"prompt": "a boat", "params": {"steps": 4, "width": 256, "height": 256, "n": 1, "seed": "5",
                                              "denoising_strength": 0.5},
                "models": ["horde-worker-tiny-sd15"], "source_image": source_image, **extra}
        answer = requests.post(f"{local_horde.url}/v2/generate/async", json=body, timeout=10)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    good = post_source(encoded)  # the worker gets a presigned-style URL on the local horde
    unreachable = post_source("http://127.0.0.1:9/nothing-listens-here.webp")
    garbage = post_source(base64.b64encode(b"this is not an image").decode())
    txt2img = post(local_horde, "a boat", seed="5", width=256, height=256)
    for request_id in (good, unreachable, garbage, txt2img):
        wait_for(lambda rid=request_id: status(local_horde, rid)["done"], 180, "the source-image requests")
    (good_gen, good_img), = images_of(local_horde, good)
    (_, plain_img), = images_of(local_horde, txt2img)
    assert good_gen["state"] == "ok" and not good_gen.get("gen_metadata")
    assert np.abs(good_img.astype(int) - plain_img.astype(int)).mean() > 3  # the source was used
    for request_id, value in ((unreachable, "download_failed"), (garbage, "parse_failed")):
        (gen, image), = images_of(local_horde, request_id)
        assert gen["state"] == "ok" and image.shape == (256, 256, 3)
        assert gen["gen_metadata"] == [{"type": "source_image", "value": value}]


def test_post_processing_with_overlap_through_the_worker(local_horde, start_worker, postprocessor_cache):
    # queue_size 1: the second job is already here when the first one's sampling ends.
    worker = start_worker(local_horde, allow_post_processing=True, post_process_job_overlap=True,
                          cache_with=postprocessor_cache)
    ids = [post(local_horde, "a portrait", seed=str(seed), width=128, height=128, facefixer_strength=1.0,
                post_processing=["RestoreFormer", "RealESRGAN_x4plus", "4xNomos2_hq_dat2"]) for seed in (1, 2)]
    plain = post(local_horde, "a portrait", seed="1", width=128, height=128)
    for request_id in (*ids, plain):
        wait_for(lambda rid=request_id: status(local_horde, rid)["done"], 240, "the post-processing requests")
    for request_id in ids:
        (gen, image), = images_of(local_horde, request_id)
        assert gen["state"] == "ok" and image.shape == (512, 512, 3)  # x4, and DAT-2 weights are not here
        assert gen["gen_metadata"] == [{"type": "information", "value": "see_ref",
                                        "ref": "post-processing skipped: 4xNomos2_hq_dat2 has no weights on this worker"}]
    (_, plain_image), = images_of(local_horde, plain)
    assert plain_image.shape == (128, 128, 3)
    log = (worker.folder / "logs" / "bridge.log").read_text()
    assert log.count("post-processing it while the slot takes the next job") == 2, log[-3000:]


def test_jobs_in_hand_share_one_inference_process_and_its_steps(local_horde, start_worker):
    worker = start_worker(local_horde, max_threads=3, queue_size=2)
    requests_ = [post(local_horde, f"a painting of a {subject}", steps=8, width=256, height=256, seed=str(i))
                 for i, subject in enumerate(("river", "castle", "forest"))]
    wide = post(local_horde, "a wide valley", steps=4, width=320, height=256, seed="9")
    for request_id in [*requests_, wide]:
        wait_for(lambda r=request_id: status(local_horde, r)["done"], 240, f"request {request_id}")
    output = worker.output()
    # One engine held the jobs: the three of one size shared their steps.
    assert "inference slot 0 starting" in output and "inference slot 1 starting" not in output, output
    shared = [int(n) for n in re.findall(r"its steps shared with (\d+) other job", output)]
    assert shared and max(shared) >= 1, output
    images = [images_of(local_horde, r)[0][1] for r in requests_]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5
