"""Post-processing: upscalers of the real architectures (tiny widths, random weights) loaded by
spandrel from weight files, applied in the job's order, tiled without seams; and what is offered."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from horde_worker.inference.messages import SlotSpec
from horde_worker.inference.postprocess import PostProcessors, upscale
from horde_worker.inference.tiny_postprocess import write_all, write_tiny_upscaler
from horde_worker.models.postprocessors import HORDE_POSTPROCESSORS, plan_postprocessors
from tests.conftest import job_request, link_tree


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("esrgan")
    return {"x4": str(write_tiny_upscaler(folder / "x4.safetensors", 4, 1)),
            "x2": str(write_tiny_upscaler(folder / "x2.safetensors", 2, 2))}


def picture(height: int = 40, width: int = 56) -> np.ndarray:
    generator = np.random.default_rng(0)
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + generator.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def test_scales_and_order(upscalers):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image = picture()
    assert processors.apply(image, [("RealESRGAN_x4plus", upscalers["x4"])])[0].shape == (160, 224, 3)
    assert processors.apply(image, [("RealESRGAN_x2plus", upscalers["x2"])])[0].shape == (80, 112, 3)
    a, _ = processors.apply(image, [("RealESRGAN_x2plus", upscalers["x2"]), ("RealESRGAN_x4plus", upscalers["x4"])])
    b, _ = processors.apply(image, [("RealESRGAN_x4plus", upscalers["x4"]), ("RealESRGAN_x2plus", upscalers["x2"])])
    assert a.shape == b.shape == (320, 448, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # the job's order is the order applied


def test_tiles_leave_no_seams(upscalers):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    model = processors.model(upscalers["x4"])
    image = picture(90, 130)
    whole = upscale(model, image, torch.device("cpu"), tile=4096)
    tiled = upscale(model, image, torch.device("cpu"), tile=48, overlap=16)
    assert tiled.shape == whole.shape == (360, 520, 3)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 2


def test_reference_files_downloads_and_what_is_offered(tmp_path, postprocessor_cache):
    setup, tasks = plan_postprocessors(tmp_path)
    by_name = {task.dest.relative_to(tmp_path).as_posix(): task for task in tasks}
    assert {"esrgan/RealESRGAN_x4plus.pth", "esrgan/RealESRGAN_x2plus.pth", "esrgan/RealESRGAN_x4plus_anime_6B.pth",
            "esrgan/NMKD_Siax.pth", "esrgan/4x_AnimeSharp.pth", "gfpgan/GFPGANv1.4.pth",
            "gfpgan/detection_Resnet50_Final.pth", "gfpgan/parsing_parsenet.pth", "codeformer/CodeFormers.pth",
            "rembg/u2net.onnx"} == set(by_name)
    assert all(task.sha256 for name, task in by_name.items() if name != "rembg/u2net.onnx")
    assert by_name["rembg/u2net.onnx"].md5 and by_name["codeformer/CodeFormers.pth"].url.endswith("codeformer.pth")
    assert not setup.offered and not setup.files
    link_tree(postprocessor_cache, tmp_path)  # most files from the shared cache, to save time and disk
    write_all(tmp_path)  # writes what is missing
    setup, tasks = plan_postprocessors(tmp_path)
    assert tasks == [] and setup.offered and all(setup.has(name) for name in HORDE_POSTPROCESSORS)
    # Weights the reference has no file for are optional: without them the step is skipped, still offered.
    (tmp_path / "esrgan" / "4xNomos8kSC.safetensors").unlink()
    setup, _ = plan_postprocessors(tmp_path)
    assert setup.offered and setup.steps(["4xNomos8kSC", "GFPGAN"])[0] == ("4xNomos8kSC", "")
    # ...but a missing face detector takes every face fixer away, and the worker stops offering.
    (tmp_path / "gfpgan" / "detection_Resnet50_Final.pth").unlink()
    setup, tasks = plan_postprocessors(tmp_path)
    assert not setup.offered and not setup.has("CodeFormers") and len(tasks) == 1


@pytest.fixture(scope="module")
def face_home(postprocessor_cache):
    setup, _ = plan_postprocessors(postprocessor_cache)
    return setup


def face_picture(size: int = 128) -> np.ndarray:
    generator = np.random.default_rng(3)
    image = np.full((size, size, 3), 90, np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 200
    return np.clip(image + generator.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def test_face_fixers_restore_faces_with_strength(face_home):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image, face_dir = face_picture(), str(face_home.face_dir)
    unchanged, _ = processors.apply(image, face_home.steps(["CodeFormers"]), 0.0, face_dir)
    assert np.array_equal(unchanged, image)  # strength 0: the face fixer does nothing
    fixer = processors.face_fixer(face_dir)
    full, faces = fixer.apply(image, str(face_home.files["RestoreFormer"]), 1.0)
    half, _ = fixer.apply(image, str(face_home.files["RestoreFormer"]), 0.5)
    assert faces == 1 and full.shape == image.shape
    changed = np.abs(full.astype(int) - image).max(axis=2) > 3
    assert 0.02 < changed.mean() < 0.98  # the face's region changed, not the whole picture
    full_change = np.abs(full.astype(int) - image).mean()
    assert 0.2 * full_change < np.abs(half.astype(int) - image).mean() < 0.8 * full_change
    for name in ("GFPGAN", "CodeFormers"):
        fixed, notes = processors.apply(image, face_home.steps([name]), 1.0, face_dir)
        assert notes == [] and np.abs(fixed.astype(int) - image).mean() > 1, name


def test_order_of_face_fixing_and_upscaling_matters(face_home):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image, face_dir = face_picture(64), str(face_home.face_dir)
    fix_then_up, _ = processors.apply(image, face_home.steps(["RestoreFormer", "RealESRGAN_x2plus"]), 1.0, face_dir)
    up_then_fix, _ = processors.apply(image, face_home.steps(["RealESRGAN_x2plus", "RestoreFormer"]), 1.0, face_dir)
    assert fix_then_up.shape == up_then_fix.shape == (128, 128, 3)
    assert np.abs(fix_then_up.astype(int) - up_then_fix).mean() > 2


def test_strip_background_gives_transparent_webp(face_home):
    from PIL import Image

    from horde_worker.supervisor.jobspec import encode_webp

    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image = np.full((96, 128, 3), 30, np.uint8)
    image[24:72, 32:96] = 230  # the tiny remover takes what is bright for the subject
    cut, notes = processors.apply(image, face_home.steps(["strip_background", "RealESRGAN_x2plus"]))
    assert notes == [] and cut.shape == (192, 256, 4)
    assert cut[96, 128, 3] > 240 and cut[10, 10, 3] < 15
    with Image.open(io.BytesIO(encode_webp(cut))) as decoded:
        assert decoded.mode == "RGBA" and decoded.size == (256, 192)
        alpha = np.asarray(decoded)[:, :, 3]
    assert alpha[96, 128] > 240 and alpha[10, 10] < 15


def test_missing_weights_skip_the_step_and_say_so(upscalers):
    processors = PostProcessors(torch.device("cpu"), torch.float32)
    image = picture()
    out, notes = processors.apply(image, [("4xNomos2_hq_dat2", ""), ("RealESRGAN_x2plus", upscalers["x2"])])
    assert out.shape == (80, 112, 3)
    assert notes == [("information", "see_ref", "post-processing skipped: 4xNomos2_hq_dat2 has no weights on this worker")]


def test_runner_post_processes_after_generation(tiny_checkpoint, upscalers, tmp_path):
    from horde_worker.inference.runner import ModelRunner

    runner = ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path)))
    request = job_request(model_path=str(tiny_checkpoint), width=64, height=64, steps=2, seeds=[1, 2],
                          post_processing=[("RealESRGAN_x4plus", upscalers["x4"])])
    result = runner.generate(request, send=lambda message: None)
    assert [img.shape for img in result.images] == [(256, 256, 3), (256, 256, 3)]


def test_overlap_samples_the_next_job_while_one_is_post_processed(tiny_checkpoint, face_home, tmp_path):
    import threading

    from horde_worker.inference.messages import GenerateResult, Progress, SamplingDone
    from horde_worker.inference.runner import ModelRunner

    runner = ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path), post_process_overlap=True))
    messages, done = [], threading.Event()

    def send(message) -> None:
        messages.append(message)
        if isinstance(message, GenerateResult) and message.job_id == "second":
            done.set()

    def request(job_id: str):
        return job_request(job_id=job_id, model_path=str(tiny_checkpoint), prompt="a face", width=64, height=64,
                           steps=2, seeds=[1], post_processing=face_home.steps(["RestoreFormer", "RealESRGAN_x2plus"]),
                           facefixer_strength=1.0, extra={"face_dir": str(face_home.face_dir)})

    assert runner.generate(request("first"), send) is None  # handed to the post-processing thread
    assert runner.generate(request("second"), send) is None
    assert done.wait(120)
    runner.close()
    kinds = [(type(m).__name__, m.job_id) for m in messages]
    first_result = kinds.index(("GenerateResult", "first"))
    # The second job sampled (its progress came) while the first was still being post-processed.
    assert kinds.index(("Progress", "second")) < first_result
    assert kinds.index(("SamplingDone", "first")) < kinds.index(("Progress", "second"))
    assert kinds.index(("SamplingDone", "second")) > first_result  # one job post-processes at a time
    results = [m for m in messages if isinstance(m, GenerateResult)]
    assert [r.images[0].shape for r in results] == [(128, 128, 3), (128, 128, 3)]
    assert all(r.postprocess_seconds > 0 for r in results)
    assert all(isinstance(m, Progress | SamplingDone | GenerateResult) for m in messages)


def test_postprocess_and_overlap_benchmarks_run_on_cpu(capsys):
    import json

    from horde_worker.bench import overlap, postprocess

    assert postprocess.main(["--sizes", "48", "--count", "1", "--only", "RealESRGAN_x2plus,strip_background"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{\n") + 1:])  # after one line per post-processor, the whole report
    assert set(report["seconds"]) == {"RealESRGAN_x2plus", "strip_background"}
    assert all(times["48x48"] > 0 for times in report["seconds"].values())
    assert overlap.main(["--jobs", "2", "--size", "64", "--steps", "2", "--post-processing", "RealESRGAN_x2plus"]) == 0
    report = json.loads(capsys.readouterr().out)
    for run in ("without_overlap", "with_overlap"):
        assert report[run]["jobs"] == 2 and report[run]["postprocess_seconds"] > 0


def test_the_engine_post_processes_a_finished_job_beside_the_others(tiny_checkpoint, upscalers, tmp_path):
    from horde_worker.inference.cancellation import Cancellations
    from horde_worker.inference.engine import Engine
    from horde_worker.inference.messages import GenerateResult, Progress, SamplingDone
    from horde_worker.inference.runner import ModelRunner

    runner = ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=str(tmp_path)))  # overlap setting off
    sent: list = []
    cancels = Cancellations()
    engine = Engine(runner, sent.append, cancels.reason, cancels.forget, max_jobs=2)
    short = job_request(job_id="short", model_path=str(tiny_checkpoint), width=64, height=64, steps=2, seeds=[1],
                        post_processing=[("RealESRGAN_x4plus", upscalers["x4"])])
    long = job_request(job_id="long", model_path=str(tiny_checkpoint), width=64, height=64, steps=12, seeds=[2])
    for request in (short, long):
        cancels.admit(request.job_id)
        engine.submit(request)
    engine.iterate()
    while engine.jobs:
        engine.iterate()
    runner.close()
    kinds = [(type(m).__name__, m.job_id) for m in sent]
    # The short job left the engine when its sampling ended; the long one went on stepping.
    assert ("SamplingDone", "short") in kinds, kinds
    assert kinds.index(("SamplingDone", "short")) < kinds.index(("GenerateResult", "long"))
    steps_after = [m for m in sent[kinds.index(("SamplingDone", "short")):] if isinstance(m, Progress)
                   and m.job_id == "long"]
    assert steps_after
    results = {m.job_id: m for m in sent if isinstance(m, GenerateResult)}
    assert results["short"].images[0].shape == (256, 256, 3) and results["long"].images[0].shape == (64, 64, 3)
    assert not [m for m in sent if isinstance(m, SamplingDone) and m.job_id == "long"]  # nothing to post-process
