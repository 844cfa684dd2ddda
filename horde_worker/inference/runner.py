"""The inference process: owns one device and the pipelines resident on it.

Started by the supervisor with the `spawn` method, one per device slot. It answers each
`GenerateRequest` with a `GenerateResult` or a `GenerateFailed` and never touches the network.
Torch is imported here, inside the process, never in the supervisor.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from horde_worker.inference.cancellation import Cancellations, JobCancelled
from horde_worker.inference.messages import (
    CancelJob,
    GenerateFailed,
    GenerateRequest,
    GenerateResult,
    Preload,
    Preloaded,
    Progress,
    SamplingDone,
    Shutdown,
    SlotReady,
    SlotSpec,
)
from horde_worker.inference.process_guard import exit_soon, ignore_sigint, install_orphan_watchdog, parent_pid

POST_THREAD = "postprocess"
# Seconds between the supervisor's pipe closing and this process ending: its last log lines get out.
EOF_GRACE = 0.2


def resolve_device(name: str):
    """Turn a slot's device string into a torch device (DirectML through torch-directml)."""
    import torch

    if name.startswith("directml"):
        import torch_directml  # type: ignore[import-not-found]

        index = int(name.split(":")[1]) if ":" in name else 0
        return torch_directml.device(index)
    return torch.device(name)


def compile_mode(setting: str, device_type: str) -> str | None:
    """The torch.compile mode of a `compile_denoisers` setting on this device ("default", "reduce-overhead"),
    or None for eager."""
    if setting == "cudagraphs" and device_type == "cuda":
        return "reduce-overhead"
    if setting == "on" or (setting in ("auto", "cudagraphs") and device_type == "cuda"):
        return "default"
    return None


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
            device_budget = max(0, total - parse_amount(spec.vram_to_leave_free, total))
        self.residency = Residency(self.device, self.dtype, spec.ram_budget, device_budget,
                                   fp8_matmuls=spec.flux_fp8_matmuls, keep_on_device=spec.keep_on_device,
                                   keep_in_ram=spec.keep_in_ram)
        self.compile_mode = compile_mode(spec.compile_denoisers, self.device.type)
        if self.compile_mode is not None and spec.cache_home:
            from horde_worker.inference.compiled import use_cache_dir

            use_cache_dir(spec.cache_home)
        self.postprocessors = None
        self.overlap = spec.post_process_overlap
        self._post_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=POST_THREAD)
        self._post_free = threading.Semaphore(1)

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

    def generate(self, request: GenerateRequest, send, stopped: Callable[[], str | None] = lambda: None,
                 pause: Callable[[], None] | None = None,
                 overlap: Callable[[], bool] | None = None) -> GenerateResult | None:
        """Run one job and return its images; with overlap and post-processing to do, send SamplingDone,
        hand the rest to the post-processing thread (which sends the result) and return None.

        `stopped()` gives the reason once the job was cancelled: JobCancelled is then raised before
        sampling starts, at the next step boundary, or before post-processing. `pause()`, when given, is
        called after each step (the engine lets other jobs step there); `overlap()`, when given, says at the
        end of sampling whether to post-process on the side thread (else the setting decides)."""
        import torch

        from horde_worker.inference.generate import run_job

        def stop_if_cancelled() -> None:
            reason = stopped()
            if reason is not None:
                raise JobCancelled(request.job_id, reason)

        def on_step(step: int, total: int) -> None:
            stop_if_cancelled()
            send(Progress(request.job_id, step, total))
            if pause is not None:
                pause()

        from horde_worker.inference.vram import request_need, request_phases

        with self.residency.using(request.model_name, request.model_path, request.v_prediction,
                                  request_need(request), request_phases(request)) as held:
            loaded, source, load_seconds = held
            stop_if_cancelled()
            start = time.perf_counter()
            with torch.inference_mode():
                output = run_job(loaded, request, on_step=on_step)
        result = GenerateResult(
            job_id=request.job_id,
            images=output.images,
            notes=output.notes,
            load_seconds=load_seconds,
            sample_seconds=time.perf_counter() - start,
            resident_models=self.residency.names(),
            load_source=source,
            resident_bytes=self.residency.ram_bytes(),
            fit="" if loaded.fit.plan.full else loaded.fit.plan.describe(),
        )
        return self.deliver(request, result, send, stopped, overlap() if overlap is not None else None)

    def deliver(self, request: GenerateRequest, result: GenerateResult, send,
                stopped: Callable[[], str | None] = lambda: None, overlap: bool | None = None) -> GenerateResult | None:
        """The sampled job's result, post-processed; with overlap (`overlap`, else the setting), SamplingDone is
        sent now, the post-processing thread sends the result, and None is returned."""
        if not request.post_processing:
            return result
        reason = stopped()
        if reason is not None:
            # Stopped during the last step or the decode: spare the post-processing too.
            raise JobCancelled(request.job_id, reason)
        if not (self.overlap if overlap is None else overlap):
            return self.post_process(request, result)
        # One job post-processes beside the sampling one at most: wait here (GPU slot still held) until
        # the previous one is done, so images do not pile up in memory when post-processing is slower.
        self._post_free.acquire()
        send(SamplingDone(request.job_id, result.sample_seconds, result.resident_models))

        def finish() -> None:
            try:
                send(self.post_process(request, result))
            except Exception as exc:
                from loguru import logger

                logger.exception("post-processing of job {} failed", request.job_id)
                send(GenerateFailed(request.job_id, f"post-processing: {type(exc).__name__}: {exc}",
                                    self.residency.names()))
            finally:
                self._post_free.release()

        self._post_thread.submit(finish)
        return None

    def close(self) -> None:
        """Let a job being post-processed get its result out before the process ends."""
        self._post_thread.shutdown(wait=True)

    def post_process(self, request: GenerateRequest, result: GenerateResult) -> GenerateResult:
        """The result with each image post-processed in the job's order."""
        import torch

        if self.postprocessors is None:
            from horde_worker.inference.postprocess import PostProcessors

            self.postprocessors = PostProcessors(self.device, self.dtype)
        start = time.perf_counter()
        # On a GPU the side thread uses its own stream, so its kernels can run beside the sampler's.
        on_side_thread = threading.current_thread().name.startswith(POST_THREAD)
        stream = torch.cuda.Stream(self.device) if on_side_thread and self.device.type == "cuda" else None
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            finished = [self.postprocessors.apply(img, request.post_processing, request.facefixer_strength,
                                                  request.extra.get("face_dir", "")) for img in result.images]
            if stream is not None:
                stream.synchronize()
        self.residency.account_extra("post-processors", self.postprocessors.device_bytes(),
                                     self.postprocessors.release)
        notes = [*result.notes, *dict.fromkeys(note for _, notes in finished for note in notes)]
        return replace(result, images=[image for image, _ in finished], notes=notes,
                       postprocess_seconds=time.perf_counter() - start, resident_models=self.residency.names())


def slot_main(conn, spec: SlotSpec) -> None:
    """Entry point of an inference process."""
    ignore_sigint()  # first: a Ctrl+C meant for the supervisor must not kill a job half-way
    install_orphan_watchdog(parent_pid())
    from loguru import logger

    logger.remove()
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
    logger.add(Path(spec.log_dir) / f"inference-{spec.slot}.log", rotation="20 MB", retention=3, level="DEBUG")
    from horde_worker.ui.logs import capture_third_party

    capture_third_party()  # other libraries' warnings into this file, not onto the volunteer's console
    if spec.device == "cpu":
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("HORDE_WORKER_CPU_THREADS", os.cpu_count() or 1))))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    runner = ModelRunner(spec)
    send_lock = threading.Lock()

    def send(message) -> None:
        try:
            with send_lock:
                conn.send(message)
        except OSError:  # a broken pipe: the supervisor is gone, as on EOF
            logger.warning("slot {}: the supervisor's pipe is broken; exiting", spec.slot)
            exit_soon(EOF_GRACE)

    cancels = Cancellations()
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preload")
    from horde_worker.inference.engine import Engine

    engine = Engine(runner, send, cancels.reason, cancels.forget, max_jobs=spec.max_jobs)

    def read() -> None:
        # Reading in its own thread lets a preload start, and a cancel arrive, while a job samples.
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                # The supervisor is gone: nobody will take this job's result, so do not finish it.
                logger.warning("slot {}: the supervisor's pipe closed; exiting", spec.slot)
                exit_soon(EOF_GRACE)
            if isinstance(message, Preload):
                loader.submit(lambda m=message: send(runner.preload(m)))
                continue
            if isinstance(message, CancelJob):
                if cancels.cancel(message.job_id, message.reason):
                    logger.info("job {} to be stopped: {}", message.job_id, message.reason)
                else:
                    logger.debug("cancel of job {} ignored: not held here", message.job_id)
                continue
            if isinstance(message, GenerateRequest):
                cancels.admit(message.job_id)
                engine.submit(message)
            elif isinstance(message, Shutdown):
                engine.submit(message)
                return
            else:
                logger.warning("unknown message {!r}", message)

    threading.Thread(target=read, name="slot-reader", daemon=True).start()
    send(SlotReady(spec.slot, os.getpid(), runner.device_name()))
    logger.info("slot {} ready on {}", spec.slot, runner.device_name())
    engine.run()  # until a Shutdown, with every job in hand answered
    loader.shutdown(wait=False, cancel_futures=True)
    runner.close()
    logger.info("slot {} exits", spec.slot)
