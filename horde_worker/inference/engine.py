"""The engine: one busy loop per device that owns every job the inference process holds.

Each iteration:

    take new requests and cancellations
    start the jobs the scheduler admits (`engine_scheduler.jobs_to_start`): load the model, encode the
        prompts; a plain txt2img joins its model's step batch, anything else becomes a solo job
    run one step of one unit (`engine_scheduler.unit_to_step`): a batch group's shared forward, or the
        next step of one solo job's pipeline
    finish what ended: decode (finished latents of one model and shape in one VAE call), post-process,
        answer GenerateResult / GenerateFailed

A job's life in the engine is `EngineState`: WAITING -> BATCHED | SOLO -> ended (answered, forgotten).
Only this thread touches the device (a solo job's thread runs only while this one waits for it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from loguru import logger

from horde_worker.inference import decode, engine_jobs, engine_scheduler, vram
from horde_worker.inference.cancellation import JobCancelled
from horde_worker.inference.engine_scheduler import JobKind, Running, Waiting
from horde_worker.inference.messages import GenerateFailed, GenerateRequest, GenerateResult, Progress, Shutdown


class EngineState(Enum):
    WAITING = "waiting"  # held, not started
    BATCHED = "batched"  # its sampler is in its model's step batch
    SOLO = "solo"  # its pipeline runs on its own thread, a step at a time


@dataclass
class EngineJob:
    """One job as the engine holds it."""

    request: GenerateRequest
    kind: JobKind
    arrived_at: float
    state: EngineState = EngineState.WAITING
    last_step: int = -1
    group: tuple | None = None
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    pass_: Any = None
    batched: Any = None
    solo: engine_jobs.SoloJob | None = None
    load_seconds: float = 0.0
    load_source: str = "resident"
    started_at: float = 0.0
    shared_with: set[str] = field(default_factory=set)
    split: bool = False  # its group ran out of device memory together: it steps on its own from then on
    retried_alone: bool = False  # it ran out of memory beside other jobs and was started again, alone

    @property
    def job_id(self) -> str:
        return self.request.job_id


class Engine:
    """Runs the jobs of one inference process; `submit` may be called from any thread."""

    def __init__(self, runner, send: Callable[[object], None], stopped: Callable[[str], str | None],
                 forget: Callable[[str], None] = lambda job_id: None, max_jobs: int = 1) -> None:
        self.runner = runner
        self.send = send
        self.stopped = stopped  # the supervisor's reason for stopping a job, or None
        self.forget = forget
        self.max_jobs = max(1, max_jobs)
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[str, EngineJob] = {}
        self.batches: dict[str, Any] = {}
        self.iteration = 0
        self.busy_seconds = 0.0
        self.shutting_down = False
        # The job ids of each recent shared forward (reports, tests).
        self.forwards: collections.deque[list[str]] = collections.deque(maxlen=10_000)

    def submit(self, message: GenerateRequest | Shutdown) -> None:
        self.inbox.put(message)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Iterate until a Shutdown has come and every job in hand has been answered."""
        while not (self.shutting_down and not self.jobs):
            self.iterate(block=not self.jobs)

    def iterate(self, block: bool = False) -> None:
        """One engine iteration (waiting for a message first when `block`)."""
        self._take_messages(block)
        started, working = time.perf_counter(), bool(self.jobs)
        try:
            self._iterate()
        finally:
            if working:
                self.busy_seconds += time.perf_counter() - started

    def figures(self) -> dict[str, float]:
        """The engine's figures so far (sent with each result: benchmarks and the status read them)."""
        compiled = [b.denoiser for b in self.batches.values() if hasattr(b.denoiser, "compile_seconds")]
        figures = {"busy_seconds": self.busy_seconds,
                   "compiled_shapes": float(sum(len(d.ready) for d in compiled)),
                   "compile_seconds": sum(sum(d.compile_seconds.values()) for d in compiled)}
        device = getattr(self.runner, "device", None)
        if device is not None and device.type == "cuda":
            figures["peak_device_bytes"] = float(torch.cuda.max_memory_allocated(device))
        return figures

    def _iterate(self) -> None:
        self._apply_cancels()
        now = time.time()
        waiting = [Waiting(j.job_id, j.request.model_name, j.kind, j.arrived_at, j.request.deadline)
                   for j in self.jobs.values() if j.state is EngineState.WAITING]
        for job_id in engine_scheduler.jobs_to_start(waiting, self._running(), self.max_jobs, now):
            self._start(self.jobs[job_id])
        unit = engine_scheduler.unit_to_step(self._running())
        if unit:
            self._step(unit)
        self.iteration += 1

    def _running(self) -> list[Running]:
        return [Running(j.job_id, j.request.model_name, JobKind.BATCHED if j.state is EngineState.BATCHED else j.kind,
                        (*j.group, j.job_id) if j.split and j.group else j.group, j.last_step)
                for j in self.jobs.values() if j.state is not EngineState.WAITING]

    def _take_messages(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(message, Shutdown):
                self.shutting_down = True
            elif isinstance(message, GenerateRequest):
                self.jobs[message.job_id] = EngineJob(message, engine_jobs.kind_of(message), time.time())
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply_cancels(self) -> None:
        for job in list(self.jobs.values()):
            reason = self.stopped(job.job_id)
            # A solo job stops itself at its next step (its step callback asks), and answers then.
            if reason is not None and job.state is not EngineState.SOLO:
                if job.state is EngineState.BATCHED:
                    self.batches[job.request.model_name].remove(job.job_id)
                logger.info("job {} stopped: {}", job.job_id, reason)
                self._fail(job, f"stopped: {reason}")

    # --- starting ------------------------------------------------------------------------------

    def _start(self, job: EngineJob) -> None:
        request = job.request
        job.started_at = time.perf_counter()
        try:
            if job.kind is not JobKind.EXCLUSIVE:
                # Pinned for the job's whole run, so that nothing evicts it between two of its steps.
                loaded, job.load_source, job.load_seconds = job.held.enter_context(self.runner.residency.using(
                    request.model_name, request.model_path, request.v_prediction, vram.request_need(request),
                    vram.request_phases(request)))
                if engine_jobs.batchable(request, loaded):
                    with torch.inference_mode():
                        self._join_batch(job, loaded)
                    return
            job.solo = engine_jobs.SoloJob(job.job_id, lambda pause, r=request: self.runner.generate(
                r, self.send, lambda j=r.job_id: self.stopped(j), pause=pause, overlap=self._others_running))
            job.state = EngineState.SOLO
        except Exception as exc:
            logger.exception("job {} could not start", job.job_id)
            self._fail(job, f"{type(exc).__name__}: {exc}")

    def _join_batch(self, job: EngineJob, loaded) -> None:
        from horde_worker.inference import adapters, flux_batch
        from horde_worker.inference.generate import Pass
        from horde_worker.inference.stepbatch import BatchedJob, StepBatch, unet_denoiser

        request = job.request
        with adapters.applied(loaded, request, []) as (prompts, negatives):
            job.pass_ = Pass(loaded, request, prompts, negatives, None)
        if loaded.baseline == "flux_1":
            job.batched = flux_batch.txt2img(job.pass_, request.steps, request.width, request.height)
            make_denoiser = flux_batch.transformer_denoiser
        else:
            job.batched = BatchedJob.txt2img(job.pass_, request.steps, request.width, request.height)

            def make_denoiser(pipe):
                return unet_denoiser(pipe.unet)
        batch = self.batches.get(request.model_name)
        if batch is None or batch.model is not loaded:
            denoiser = make_denoiser(loaded.pipeline)
            mode = self.runner.compile_mode
            if mode is not None and not loaded.fit.plan.blocks_visit:  # visiting blocks' hooks run eagerly
                from horde_worker.inference.compiled import CompiledDenoiser

                rowed = flux_batch.ROW_INPUTS if loaded.baseline == "flux_1" else ()
                # CUDA graphs cannot be captured while another thread runs work on the device.
                denoiser = CompiledDenoiser(denoiser, mode=None if mode == "default" else mode,
                                            background=mode == "default", row_names=rowed)
            batch = self.batches[request.model_name] = StepBatch(denoiser, loaded)
        batch.add(job.job_id, job.batched)
        job.group = (loaded.baseline, job.batched.group_key())
        job.state = EngineState.BATCHED

    # --- stepping ------------------------------------------------------------------------------

    def _step(self, unit: list[str]) -> None:
        first = self.jobs[unit[0]]
        if first.state is EngineState.SOLO:
            self._step_solo(first)
        else:
            self._step_batch([self.jobs[job_id] for job_id in unit])

    def _step_solo(self, job: EngineJob) -> None:
        job.last_step = self.iteration
        if not job.solo.step():
            return
        if isinstance(job.solo.error, JobCancelled):
            logger.info("job {} stopped: {}", job.job_id, job.solo.error.reason)
            self._fail(job, f"stopped: {job.solo.error.reason}")
        elif job.solo.error is not None:
            error = job.solo.error
            if engine_jobs.out_of_memory(error):
                self._out_of_memory(job, error)
                return
            logger.opt(exception=error).error("job {} failed", job.job_id)
            self._fail(job, f"{type(error).__name__}: {error}")
        else:
            if job.solo.result is not None:
                self.send(dataclasses.replace(job.solo.result, engine=self.figures()))
            self._end(job)

    def _step_batch(self, jobs: list[EngineJob]) -> None:
        batch = self.batches[jobs[0].request.model_name]
        ids = [job.job_id for job in jobs]
        try:
            with torch.inference_mode():
                finished = batch.step(only=ids)
        except Exception as exc:  # the shared forward failed: every job in it fails, the others go on
            if engine_jobs.out_of_memory(exc):
                engine_jobs.release_device_memory()
                if len(jobs) > 1:
                    logger.warning("jobs {} ran out of device memory together; each steps on its own now", ids)
                    for job in jobs:
                        job.split = True
                else:
                    batch.remove(jobs[0].job_id)
                    self._out_of_memory(jobs[0], exc)
                return
            logger.exception("a batched step of {} failed", ids)
            for job in jobs:
                batch.remove(job.job_id)
                self._fail(job, f"{type(exc).__name__}: {exc}")
            return
        self.forwards.append(ids)
        for job in jobs:
            job.last_step = self.iteration
            job.shared_with.update(ids)
            bj = job.batched
            self.send(Progress(job.job_id, bj.steps_done(bj.evaluations), bj.steps))
        if finished:
            self._finish_batched(batch, {job_id: self.jobs[job_id] for job_id in finished}, finished)

    def _finish_batched(self, batch, jobs: dict[str, EngineJob], latents: dict[str, torch.Tensor]) -> None:
        """Decode the finished jobs (one VAE call per latent shape), then answer each."""

        by_shape: dict[tuple, list[str]] = {}
        for job_id, latent in latents.items():
            by_shape.setdefault((tuple(latent.shape[1:]), jobs[job_id].request.width,
                                 jobs[job_id].request.height), []).append(job_id)
        pipe = batch.model.pipeline
        for (_shape, width, height), job_ids in by_shape.items():
            images = None
            try:
                stacked = torch.cat([latents[j] for j in job_ids])
                with torch.inference_mode():
                    if batch.model.baseline == "flux_1":
                        images = decode.flux_images(pipe, stacked, width, height)
                    else:
                        images = decode.sd_images(pipe, stacked)
            except Exception as exc:
                if engine_jobs.out_of_memory(exc):
                    engine_jobs.release_device_memory()
                    images = decode.one_by_one_in_tiles(batch.model, stacked, width, height)
                if images is None:
                    logger.exception("decoding {} failed", job_ids)
                    for job_id in job_ids:
                        self._fail(jobs[job_id], f"decoding: {type(exc).__name__}: {exc}")
                    continue
            start = 0
            for job_id in job_ids:
                job = jobs[job_id]
                count = len(job.request.seeds)
                self._answer_batched(job, images[start:start + count])
                start += count

    def _out_of_memory(self, job: EngineJob, error: BaseException) -> None:
        """A job that ran out of device memory: started again alone once if it had company, else faulted."""
        engine_jobs.release_device_memory()
        request = job.request
        if not job.retried_alone and len(self.jobs) > 1:
            logger.warning("job {} ran out of device memory beside {} other job(s); it starts again alone",
                           job.job_id, len(self.jobs) - 1)
            job.held.close()
            job.held = contextlib.ExitStack()
            job.state, job.kind, job.retried_alone, job.split = EngineState.WAITING, JobKind.EXCLUSIVE, True, False
            job.batched = job.solo = job.pass_ = None
            job.group, job.last_step, job.shared_with = None, -1, set()
            return
        logger.error("job {} ran out of device memory: {}", job.job_id, error)
        self._fail(job, f"out of device memory for {request.width}x{request.height} with {len(request.seeds)} "
                        f"image(s) on this GPU, even alone ({type(error).__name__})")

    def _answer_batched(self, job: EngineJob, images: list) -> None:
        runner = self.runner
        result = GenerateResult(job_id=job.job_id, images=images, load_seconds=job.load_seconds,
                                sample_seconds=time.perf_counter() - job.started_at,
                                resident_models=runner.residency.names(), load_source=job.load_source,
                                resident_bytes=runner.residency.ram_bytes(),
                                shared_with=len(job.shared_with - {job.job_id}), engine=self.figures(),
                                fit="" if job.pass_.model.fit.plan.full else job.pass_.model.fit.plan.describe())
        job.held.close()
        try:
            delivered = runner.deliver(job.request, result, self.send, lambda j=job.job_id: self.stopped(j),
                                       True if self._others_running() else None)
        except JobCancelled as stop:
            self._fail(job, f"stopped: {stop.reason}")
            return
        except Exception as exc:
            logger.exception("job {} failed after sampling", job.job_id)
            self._fail(job, f"{type(exc).__name__}: {exc}")
            return
        if delivered is not None:
            self.send(delivered)
        self._end(job)

    def _others_running(self) -> bool:
        """More than one job in hand: a finished one is post-processed on the side thread, so that the others
        keep stepping meanwhile."""
        return len(self.jobs) > 1

    # --- ending --------------------------------------------------------------------------------

    def _fail(self, job: EngineJob, reason: str) -> None:
        self.send(GenerateFailed(job.job_id, reason, self.runner.residency.names()))
        self._end(job)

    def _end(self, job: EngineJob) -> None:
        job.held.close()
        self.jobs.pop(job.job_id, None)
        self.forget(job.job_id)
