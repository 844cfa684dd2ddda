"""The two ways the engine runs a job: batched (its sampler stepped by the engine, sharing forwards) or
solo (its own pipeline call, on a thread that pauses at every step boundary until the engine lets it
take the next step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from horde_worker.inference.engine_scheduler import JobKind
from horde_worker.inference.messages import GenerateRequest

BATCHABLE_BASELINES = ("stable_diffusion_1", "stable_diffusion_2", "stable_diffusion_xl", "flux_1")


def kind_of(request: GenerateRequest) -> JobKind:
    """EXCLUSIVE when the job changes the model's modules while it runs; otherwise it can run beside others
    (whether batched is decided once its model is loaded: `batchable`)."""
    if request.loras or request.tis or request.tiling:
        return JobKind.EXCLUSIVE
    return JobKind.SHARED


def batchable(request: GenerateRequest, model) -> bool:
    """Whether the job is a plain txt2img the engine can step itself: no source image, ControlNet or hires
    pass, a sampler of `ksamplers` with a fixed number of steps, a model whose denoiser takes no mask."""
    from horde_worker.inference import hires
    from horde_worker.inference.samplers import SAMPLERS, sampler_refusal

    if kind_of(request) is not JobKind.SHARED or model.baseline not in BATCHABLE_BASELINES:
        return False
    if request.source_image is not None or request.control_type or request.extra_images:
        return False
    if request.hires_fix and hires.applies(model.baseline, request.width, request.height):
        return False
    if sampler_refusal(request.sampler_name, model.baseline) is not None:
        return False
    if model.baseline == "flux_1":
        # True classifier-free guidance (a negative prompt with cfg > 1) runs as the pipeline runs it.
        from horde_worker.inference.flux import uses_true_cfg

        return not uses_true_cfg(request)
    spec = SAMPLERS[request.sampler_name]
    unet = getattr(model.pipeline, "unet", None)
    return (spec.algorithm is not None and spec.algorithm != "dpm_adaptive" and unet is not None
            and unet.config.in_channels == 4)


def out_of_memory(error: BaseException) -> bool:
    """A device (or host) allocation failure, whatever layer reported it."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower() \
        or "can't allocate memory" in str(error).lower()


def release_device_memory() -> None:
    """Give the caching allocator's free blocks back, so that what runs next can use them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SoloJob:
    """A job's whole pipeline call on its own thread, run one step at a time: `step()` lets it go on to
    its next step boundary (or its end) and waits there, so the engine's thread and this one never run
    on the device at once.

    `work(pause)` is the job; it calls `pause()` at each step boundary."""

    def __init__(self, name: str, work: Callable[[Callable[[], None]], Any]) -> None:
        self._work = work
        self._go = threading.Semaphore(0)
        self._at_boundary = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=f"job-{name}", daemon=True)
        self._started = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        self._go.acquire()
        try:
            self.result = self._work(self._pause)
        except BaseException as exc:  # handed to the engine, which reports it as the job's failure
            self.error = exc
        finally:
            self.done = True
            self._at_boundary.release()

    def _pause(self) -> None:
        self._at_boundary.release()
        self._go.acquire()

    def step(self) -> bool:
        """Run the job to its next step boundary; True once it has ended (see `result` / `error`)."""
        if self.done:
            return True
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._at_boundary.acquire()
        return self.done
