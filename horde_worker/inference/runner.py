"""The inference process: owns one device and the pipelines resident on it.

Started by the supervisor with the `spawn` method, one per device slot. It answers each
`GenerateRequest` with a `GenerateResult` or a `GenerateFailed` and never touches the network.
Torch is imported here, inside the process, never in the supervisor.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from horde_worker.inference.messages import (
    GenerateFailed,
    GenerateRequest,
    GenerateResult,
    Preload,
    Preloaded,
    Progress,
    Shutdown,
    SlotReady,
    SlotSpec,
)


def resolve_device(name: str):
    """Turn a slot's device string into a torch device (DirectML through torch-directml)."""
    import torch

    if name.startswith("directml"):
        import torch_directml  # type: ignore[import-not-found]

        index = int(name.split(":")[1]) if ":" in name else 0
        return torch_directml.device(index)
    return torch.device(name)


class ModelRunner:
    """Owns the device: places models within the budgets and runs jobs."""

    def __init__(self, spec: SlotSpec) -> None:
        import torch

        from horde_worker.config.bridge_data import parse_amount
        from horde_worker.inference.residency import Residency

        self.device = resolve_device(spec.device)
        on_gpu = spec.device.startswith(("cuda", "directml"))
        self.dtype = torch.float16 if on_gpu else torch.float32
        device_budget = None
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            device_budget = max(0, total - parse_amount(spec.vram_to_leave_free, total)) // max(1, spec.slots_on_device)
        self.residency = Residency(self.device, self.dtype, spec.ram_budget, device_budget)
        self.postprocessors = None

    def device_name(self) -> str:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return str(self.device)

    def preload(self, message: Preload) -> Preloaded:
        seconds, error = 0.0, None
        try:
            seconds = self.residency.preload(message.model_name, message.model_path, message.v_prediction)
        except Exception as exc:  # reported; the job itself will try again and fault properly
            error = f"{type(exc).__name__}: {exc}"
        return Preloaded(message.model_name, seconds, self.residency.names(), error)

    def generate(self, request: GenerateRequest, send) -> GenerateResult:
        """Run one job and return its images."""
        import torch

        from horde_worker.inference.generate import run_job

        loaded, source, load_seconds = self.residency.acquire(request.model_name, request.model_path,
                                                               request.v_prediction)
        start = time.perf_counter()
        with torch.inference_mode():
            output = run_job(loaded, request, on_step=lambda s, t: send(Progress(request.job_id, s, t)))
        if request.post_processing:
            if self.postprocessors is None:
                from horde_worker.inference.postprocess import PostProcessors

                self.postprocessors = PostProcessors(self.device, self.dtype)
            output.images = [self.postprocessors.apply(img, request.post_processing) for img in output.images]
        return GenerateResult(
            job_id=request.job_id,
            images=output.images,
            notes=output.notes,
            load_seconds=load_seconds,
            sample_seconds=time.perf_counter() - start,
            resident_models=self.residency.names(),
            load_source=source,
            resident_bytes=self.residency.ram_bytes(),
        )


def slot_main(conn, spec: SlotSpec) -> None:
    """Entry point of an inference process."""
    from loguru import logger

    logger.remove()
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
    logger.add(Path(spec.log_dir) / f"inference-{spec.slot}.log", rotation="20 MB", retention=3, level="DEBUG")
    if spec.device == "cpu":
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("HORDE_WORKER_CPU_THREADS", os.cpu_count() or 1))))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    runner = ModelRunner(spec)
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    jobs: queue.Queue = queue.Queue()
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preload")

    def read() -> None:
        # Reading in its own thread lets a preload start while a job samples.
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                jobs.put(Shutdown())
                return
            if isinstance(message, Preload):
                loader.submit(lambda m=message: send(runner.preload(m)))
                continue
            jobs.put(message)
            if isinstance(message, Shutdown):
                return

    threading.Thread(target=read, name="slot-reader", daemon=True).start()
    send(SlotReady(spec.slot, os.getpid(), runner.device_name()))
    logger.info("slot {} ready on {}", spec.slot, runner.device_name())
    while True:
        message = jobs.get()
        if isinstance(message, Shutdown):
            break
        if not isinstance(message, GenerateRequest):
            logger.warning("unknown message {!r}", message)
            continue
        try:
            send(runner.generate(message, send))
        except Exception as exc:
            logger.exception("job {} failed", message.job_id)
            send(GenerateFailed(message.job_id, f"{type(exc).__name__}: {exc}", runner.residency.names()))
    loader.shutdown(wait=False, cancel_futures=True)
    logger.info("slot {} exits", spec.slot)
