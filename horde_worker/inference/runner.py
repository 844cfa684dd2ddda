"""The inference process: owns one device and the pipelines resident on it.

Started by the supervisor with the `spawn` method, one per device slot. It answers each
`GenerateRequest` with a `GenerateResult` or a `GenerateFailed` and never touches the network.
Torch is imported here, inside the process, never in the supervisor.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

from horde_worker.inference.messages import (
    GenerateFailed,
    GenerateRequest,
    GenerateResult,
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
    """Keeps up to `max_resident` pipelines on the device, least recently used evicted first."""

    def __init__(self, device_name: str, max_resident: int = 1) -> None:
        import torch

        self.device = resolve_device(device_name)
        on_gpu = device_name.startswith(("cuda", "directml"))
        self.dtype = torch.float16 if on_gpu else torch.float32
        self.max_resident = max(1, max_resident)
        self.resident: OrderedDict[str, object] = OrderedDict()

    def device_name(self) -> str:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return str(self.device)

    def model(self, request: GenerateRequest):
        """The pipeline for the request's model, loaded if it is not resident."""
        from horde_worker.inference.pipelines import load_pipeline

        loaded = self.resident.get(request.model_name)
        if loaded is not None:
            self.resident.move_to_end(request.model_name)
            return loaded, 0.0
        while len(self.resident) >= self.max_resident:
            self._evict()
        loaded = load_pipeline(Path(request.model_path), self.device, self.dtype, name=request.model_name,
                               v_prediction=request.v_prediction)
        self.resident[request.model_name] = loaded
        return loaded, loaded.load_seconds

    def _evict(self) -> None:
        import gc

        import torch

        self.resident.popitem(last=False)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def generate(self, request: GenerateRequest, send) -> GenerateResult:
        """Run one job and return its images."""
        import torch

        from horde_worker.inference.pipelines import txt2img

        loaded, load_seconds = self.model(request)
        start = time.perf_counter()
        with torch.inference_mode():
            images = txt2img(loaded, request, on_step=lambda s, t: send(Progress(request.job_id, s, t)))
        return GenerateResult(
            job_id=request.job_id,
            images=images,
            load_seconds=load_seconds,
            sample_seconds=time.perf_counter() - start,
            resident_models=list(self.resident),
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
    runner = ModelRunner(spec.device, spec.max_resident_models)
    conn.send(SlotReady(spec.slot, os.getpid(), runner.device_name()))
    logger.info("slot {} ready on {}", spec.slot, runner.device_name())
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if isinstance(message, Shutdown):
            break
        if not isinstance(message, GenerateRequest):
            logger.warning("unknown message {!r}", message)
            continue
        try:
            conn.send(runner.generate(message, conn.send))
        except Exception as exc:
            logger.exception("job {} failed", message.job_id)
            conn.send(GenerateFailed(message.job_id, f"{type(exc).__name__}: {exc}", list(runner.resident)))
    logger.info("slot {} exits", spec.slot)
