"""The supervisor: pops jobs, feeds the inference slots, uploads and submits the results.

One asyncio loop in the main process. Blocking HTTP runs in threads, inference in the slot
processes, so the GPU never waits on the network: the next job is popped and queued, and the
last job is encoded, uploaded and submitted, while the current one samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from horde_worker import BRIDGE_AGENT
from horde_worker.config.bridge_data import BridgeData
from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable, RetryPolicy
from horde_worker.horde.wire import PopRequest, PopResponse
from horde_worker.inference.messages import (
    GenerateFailed,
    GenerateResult,
    Preload,
    Preloaded,
    Progress,
    SamplingDone,
    SlotReady,
    SlotSpec,
)
from horde_worker.models.catalog import ModelCatalog
from horde_worker.supervisor import jobspec
from horde_worker.supervisor.delivery import Delivery
from horde_worker.supervisor.inputs import AdapterCaches, fetch_adapters, fetch_inputs
from horde_worker.supervisor.job import Job, JobState
from horde_worker.supervisor.journal import Journal
from horde_worker.supervisor.safety_client import SafetyClient
from horde_worker.supervisor.scheduler import Scheduler
from horde_worker.supervisor.slots import Slot, SlotPool
from horde_worker.supervisor.stats import SessionStats, status_line

# Pop errors that no retry can fix: the owner must change something.
FATAL_POP_ERRORS = {
    "InvalidAPIKey": "the API key is not valid: check api_key in bridgeData.yaml",
    "AnonForbiddenWorker": "workers need a registered API key: set api_key in bridgeData.yaml",
    "WrongCredentials": "this dreamer_name belongs to another user: choose another dreamer_name",
    "ProfaneWorkerName": "the horde refused this dreamer_name: choose another one",
    "TooManyWorkers": "this account runs as many workers as it may",
    "WorkerInviteOnly": "this horde only accepts invited workers",
}


class Supervisor:
    """Runs the worker until asked to stop, then drains: running jobs finish and are submitted."""

    def __init__(self, settings: BridgeData, client: HordeClient, catalog: ModelCatalog, slot_specs: list[SlotSpec],
                 journal_dir: Path, *, pop_interval: float = 1.0, maintenance_interval: float = 60.0,
                 submit_patience: float = 1800.0, stop_condition: Callable[[], bool] | None = None,
                 on_tick: Callable[[float], None] | None = None, config_poll: Callable[[], None] | None = None,
                 safety: SafetyClient | None = None) -> None:
        self.settings = settings
        self.client = client
        self.catalog = catalog
        self.slot_specs = slot_specs
        self.journal = Journal(journal_dir)
        self.pop_interval = pop_interval
        self.maintenance_interval = maintenance_interval
        self.submit_patience = submit_patience
        self.stop_condition = stop_condition
        self.on_tick = on_tick
        self.config_poll = config_poll
        self.scheduler = Scheduler()
        self.stats = SessionStats()
        self.jobs: dict[str, Job] = {}
        self.stopping = False
        self.fatal: str | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._seen_messages: set[str] = set()
        self.pool: SlotPool | None = None
        self.safety = safety
        self.delivery = Delivery(self)
        self.adapter_caches = AdapterCaches.from_settings(settings.cache_home, settings.max_lora_cache_size,
                                                          settings.civitai_api_url, settings.civitai_api_token)

    # --- life cycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop popping; running and waiting jobs are finished and submitted."""
        if not self.stopping:
            logger.warning("stopping: no new jobs; finishing {} job(s) in hand (Ctrl+C again to quit now)",
                           len(self.jobs))
        self.stopping = True
        self._poke()

    def replace_catalog_threadsafe(self, catalog: ModelCatalog) -> None:
        """Serve a new set of models from the next pop on (called from another thread)."""
        def swap() -> None:
            added = set(catalog.names()) - set(self.catalog.names())
            removed = set(self.catalog.names()) - set(catalog.names())
            self.catalog = catalog
            logger.info("now serving {} model(s){}{}", len(catalog),
                        f"; added {', '.join(sorted(added))}" if added else "",
                        f"; removed {', '.join(sorted(removed))}" if removed else "")
            self._poke()

        if self._loop is not None:
            self._loop.call_soon_threadsafe(swap)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("internal task failed")

    def _threadsafe(self, callback):
        def call(*args) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(callback, *args)
        return call

    async def run(self) -> int:
        """The supervisor's main loop; returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.pool = SlotPool(self.slot_specs, self._threadsafe(self._on_message), self._threadsafe(self._on_death))
        self.pool.start()
        await self._prepare_worker()
        for job in self.journal.pending():
            logger.info("resuming the submit of job {} left from an earlier run", job.id)
            self.jobs[job.id] = job
            self._spawn(self._finish(job))
        self._spawn(self._pop_loop())
        last = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            now = time.monotonic()
            if self.on_tick is not None:
                self.on_tick(now - last)
            last = now
            if self.config_poll is not None:
                self.config_poll()
            if not self.stopping and self.stop_condition is not None and not self.jobs and self.stop_condition():
                self.stopping = True
            self._dispatch()
            if self.stopping and not self.jobs:
                break
        await asyncio.to_thread(self.pool.stop)
        for task in list(self._tasks):
            task.cancel()
        return 1 if self.fatal else 0

    async def _prepare_worker(self) -> None:
        if not self.settings.remove_maintenance_on_init:
            return
        try:
            worker = await asyncio.to_thread(self.client.get_worker_by_name, self.settings.dreamer_name)
            if worker.get("maintenance_mode"):
                await asyncio.to_thread(self.client.set_maintenance, worker["id"], False)
                logger.info("maintenance mode of {} cleared (remove_maintenance_on_init)", self.settings.dreamer_name)
        except (HordeError, HordeUnreachable) as exc:
            logger.info("maintenance not cleared: {}", exc)

    # --- popping ---------------------------------------------------------------------------

    def pop_request(self) -> PopRequest:
        """What this worker asks the horde for; it claims only what it can do faithfully."""
        s = self.settings
        return PopRequest(
            name=s.dreamer_name, models=self.catalog.names(), bridge_agent=BRIDGE_AGENT,
            threads=len(self.slot_specs), amount=s.max_batch, max_pixels=s.max_pixels, nsfw=s.nsfw,
            blacklist=s.blacklist, priority_usernames=s.priority_usernames,
            allow_img2img=s.allow_img2img, allow_painting=s.allow_painting, allow_unsafe_ipaddr=s.allow_unsafe_ip,
            allow_post_processing=s.allow_post_processing and self.catalog.postprocess.offered,
            allow_controlnet=s.allow_controlnet and self.catalog.control.available,
            allow_sdxl_controlnet=False, allow_lora=s.allow_lora,
            extra_slow_worker=s.extra_slow_worker, limit_max_steps=s.limit_max_steps,
            require_upfront_kudos=s.require_upfront_kudos,
        )

    def _room_to_pop(self) -> bool:
        waiting = sum(1 for j in self.jobs.values()
                      if j.state in (JobState.POPPED, JobState.INPUTS_READY, JobState.QUEUED))
        free_slots = sum(1 for slot in self.pool.slots if slot.job_id is None)
        return waiting < self.settings.queue_size + free_slots

    async def _pop_loop(self) -> None:
        failures = 0
        while not self.stopping:
            if not self._room_to_pop():
                await asyncio.sleep(0.05)
                continue
            try:
                pop = await asyncio.to_thread(self.client.pop, self.pop_request(),
                                              RetryPolicy(attempts=3, base_delay=0.5, max_delay=10))
                failures = 0
            except HordeError as exc:
                if exc.rc in FATAL_POP_ERRORS:
                    self.fatal = f"{FATAL_POP_ERRORS[exc.rc]} ({exc.message})"
                    logger.error("the horde refused this worker: {}", self.fatal)
                    self.request_stop()
                    return
                if exc.rc in ("WorkerMaintenance", "WorkerFlaggedMaintenance"):
                    logger.warning(
                        "the horde has put this worker in maintenance ({}). Jobs failed too often: look at "
                        "logs/trace.log, fix the cause, then clear it on the horde's worker page or with "
                        "remove_maintenance_on_init: true and a restart. Asking again in {:.0f}s.",
                        exc.message, self.maintenance_interval)
                    await self._sleep_unless_stopping(self.maintenance_interval)
                    continue
                failures += 1
                logger.warning("pop refused: {}", exc)
                await self._sleep_unless_stopping(min(60.0, 2**failures))
                continue
            except HordeUnreachable as exc:
                failures += 1
                logger.warning("horde unreachable: {}; trying again", exc)
                await self._sleep_unless_stopping(min(60.0, 2**failures * random.uniform(0.5, 1.0)))
                continue
            self._show_messages(pop)
            if not pop.has_job:
                await self._sleep_unless_stopping(self.pop_interval)
                continue
            job = Job(pop=pop)
            self.jobs[job.id] = job
            logger.info("popped job {} ({} x {}x{} {} steps, model {})", job.id, len(job.ids), pop.payload.width,
                        pop.payload.height, pop.payload.ddim_steps, job.model)
            self._spawn(self._prepare(job))

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.2, end - time.monotonic()))

    def _show_messages(self, pop: PopResponse) -> None:
        for message in pop.messages:
            key = message.id or message.message
            if key not in self._seen_messages:
                self._seen_messages.add(key)
                logger.warning("message from the horde's moderators: {}", message.message)

    # --- preparing and running ---------------------------------------------------------------

    async def _prepare(self, job: Job) -> None:
        job.seeds = jobspec.seeds_for(job.pop.payload, len(job.ids))
        reason = jobspec.unsupported_reason(job, self.catalog)
        if reason is None:
            job.inputs = await asyncio.to_thread(fetch_inputs, self.client, job.pop)
            job.gen_metadata.extend(job.inputs.notes)
            if job.pop.payload.loras or job.pop.payload.tis:
                job.loras, job.tis = await asyncio.to_thread(
                    fetch_adapters, self.adapter_caches, job.pop, self.catalog.get(job.model).baseline,
                    job.gen_metadata)
        if reason is not None:
            logger.error("job {} cannot be done: {}", job.id, reason)
            job.advance(JobState.FAULTED, reason)
            await self._finish(job)
            return
        job.advance(JobState.INPUTS_READY)
        self.scheduler.add(job)
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.pool.slots:
            if not slot.idle or not len(self.scheduler):
                continue
            job = self.scheduler.pick(slot.resident)
            if job is None:
                continue
            if not self.catalog.has(job.model):
                job.advance(JobState.FAULTED, f"model {job.model!r} is no longer served")
                self._spawn(self._finish(job))
                continue
            if time.time() > job.deadline:
                job.advance(JobState.ABANDONED)
                logger.warning("job {} waited past its TTL; the horde has given it to someone else", job.id)
                self._forget(job)
                continue
            job.attempts += 1
            job.slot = slot.spec.slot
            slot.job_id = job.id
            job.advance(JobState.RUNNING)
            self.stats.job_started()
            self.pool.send(slot, jobspec.generate_request(job, self.catalog))
            self._preload_next(slot)

    def _preload_next(self, slot: Slot) -> None:
        """While this slot samples, have it read the next waiting job's model from disk."""
        upcoming = next((j for j in self.scheduler.waiting if self.catalog.has(j.model)), None)
        if upcoming is None or upcoming.model in slot.resident or upcoming.model in slot.preloading:
            return
        model = self.catalog.get(upcoming.model)
        slot.preloading.add(model.name)
        self.pool.send(slot, Preload(model.name, str(model.path), model.v_prediction))

    def _on_message(self, slot: Slot, message: object) -> None:
        if isinstance(message, SlotReady):
            slot.ready = True
            logger.info("inference slot {} ready on {}", slot.spec.slot, message.device_name)
        elif isinstance(message, Preloaded):
            slot.preloading.discard(message.model_name)
            slot.resident = list(message.resident_models)
            if message.error:
                logger.warning("preloading {} failed: {}", message.model_name, message.error)
            elif message.seconds > 0:
                logger.info("model {} preloaded in {:.2f}s while the slot worked", message.model_name,
                            message.seconds)
        elif isinstance(message, Progress):
            job = self.jobs.get(message.job_id)
            if job is not None:
                job.progress = (message.step, message.total)
        elif isinstance(message, SamplingDone):
            if slot.job_id == message.job_id:
                slot.job_id = None
            slot.resident = list(message.resident_models)
            job = self.jobs.get(message.job_id)
            if job is not None and job.state is JobState.RUNNING:
                job.advance(JobState.POSTPROCESSING)
                logger.info("job {} sampled in {:.2f}s; post-processing it while the slot takes the next job",
                            job.id, message.sample_seconds)
        elif isinstance(message, GenerateResult | GenerateFailed):
            self._on_job_done(slot, message)
        self._poke()

    def _on_job_done(self, slot: Slot, message: GenerateResult | GenerateFailed) -> None:
        if slot.job_id == message.job_id:
            slot.job_id = None
        slot.resident = list(message.resident_models)
        job = self.jobs.get(message.job_id)
        if job is None or job.state not in (JobState.RUNNING, JobState.POSTPROCESSING):
            return
        if isinstance(message, GenerateFailed):
            logger.error("job {} failed: {}", job.id, message.reason)
            job.advance(JobState.FAULTED, message.reason)
            self._spawn(self._finish(job))
            return
        job.images = list(message.images)
        job.gen_metadata.extend(jobspec.notes_metadata(message.notes))
        for kind, value, ref in message.notes:
            logger.info("job {}: {} {}{}", job.id, kind, value, f" ({ref})" if ref else "")
        job.advance(JobState.GENERATED)
        self.stats.job_generated(job.megapixelsteps, message.load_seconds + message.sample_seconds)
        if message.postprocess_seconds:
            self.stats.postprocessed(message.postprocess_seconds)
        if message.load_source != "resident":
            logger.info("model switch to {}: from {} in {:.2f}s", job.model, message.load_source,
                        message.load_seconds)
        extra = f" + {message.postprocess_seconds:.2f}s post-processing" if message.postprocess_seconds else ""
        logger.info("job {} generated in {:.2f}s{}", job.id, message.sample_seconds, extra)
        self._spawn(self._finish(job))

    def _on_death(self, slot: Slot, exit_code: int | None) -> None:
        # The job it was sampling and any it was post-processing beside it.
        lost = [job for job in self.jobs.values()
                if job.slot == slot.spec.slot and job.state in (JobState.RUNNING, JobState.POSTPROCESSING)]
        logger.error("inference slot {} died (exit code {}); starting a new one", slot.spec.slot, exit_code)
        slot.ready, slot.job_id = False, None
        if not self.stopping or lost:
            self.pool.restart(slot)
        for job in lost:
            spent = time.time() - (job.started_at or job.popped_at)
            if job.attempts < 2 and time.time() + spent * 1.5 + 10 < job.deadline:
                logger.warning("job {} runs again on the new process", job.id)
                self.scheduler.add(job)
            else:
                job.advance(JobState.FAULTED, f"inference process died (exit code {exit_code})")
                self._spawn(self._finish(job))
        self._poke()

    # --- results -----------------------------------------------------------------------------

    async def _finish(self, job: Job) -> None:
        await self.delivery.finish(job)

    def _forget(self, job: Job, keep_journal: bool = False) -> None:
        if not keep_journal:
            self.journal.forget(job)
        self.scheduler.remove(job)
        self.jobs.pop(job.id, None)
        self._poke()

    # --- status ------------------------------------------------------------------------------

    def status_text(self) -> str:
        """The live status line."""
        return status_line(list(self.jobs.values()), self.stats)
