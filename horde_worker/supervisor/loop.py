"""The supervisor: pops jobs, feeds the inference slots, uploads and submits the results.

One asyncio loop in the main process. Blocking HTTP runs in threads, inference in the slot
processes, so the GPU never waits on the network: the next job is popped and queued, and the
last job is encoded, uploaded and submitted, while the current one samples.

Every job ends: whatever a job's own work raises, in any stage, `fault` moves it to FAULTED with
the reason and submits it (a job whose images are already encoded is delivered again instead),
and the worker goes on. The time keeper faults or stops what would outlive its TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loguru import logger

from horde_worker import BRIDGE_AGENT
from horde_worker.config.bridge_data import BridgeData
from horde_worker.horde.client import HordeClient, HordeError, HordeUnreachable
from horde_worker.horde.wire import PopRequest, PopResponse
from horde_worker.inference.messages import (
    Preload,
    SlotSpec,
)
from horde_worker.models.catalog import ModelCatalog
from horde_worker.supervisor import jobspec
from horde_worker.supervisor.bounds import bounds_reason
from horde_worker.supervisor.delivery import Delivery
from horde_worker.supervisor.inputs import AdapterCaches, fetch_adapters, fetch_inputs
from horde_worker.supervisor.job import Job, JobState
from horde_worker.supervisor.journal import Journal
from horde_worker.supervisor.popping import Popper, fingerprint
from horde_worker.supervisor.safety_client import SafetyClient
from horde_worker.supervisor.scheduler import Scheduler
from horde_worker.supervisor.slot_events import SlotEvents
from horde_worker.supervisor.slots import Slot, SlotPool
from horde_worker.supervisor.stats import SessionStats, status_line
from horde_worker.supervisor.timelimits import TimeKeeper

# How often delivery may be tried again for one job before it is given up (its journal entry stays).
MAX_FINISH_TRIES = 3


HISTORY_INTERVAL = 10.0  # seconds between two points of the dashboard's charts


class Supervisor:
    """Runs the worker until asked to stop, then drains: jobs that can still finish are finished and submitted."""

    def __init__(self, settings: BridgeData, client: HordeClient, catalog: ModelCatalog, slot_specs: list[SlotSpec],
                 journal_dir: Path, *, pop_interval: float = 1.0, maintenance_interval: float = 60.0,
                 submit_patience: float = 1800.0, stop_condition: Callable[[], bool] | None = None,
                 on_tick: Callable[[float], None] | None = None, config_poll: Callable[[], None] | None = None,
                 safety: SafetyClient | None = None, slot_target: Callable | None = None) -> None:
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
        self._delivering: set[str] = set()
        self._seen_messages: set[str] = set()
        self._slot_target = slot_target
        self.restart_backoff = 2.0  # seconds before the second restart in a row, doubling after
        self.pool: SlotPool | None = None
        self.dashboard = None  # the local web dashboard and /metrics (ui/dashboard.py), once started
        self.safety = safety
        # The safety check waits on its own thread, so a slow or restarting checker never holds up pops and submits.
        self.safety_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safety-check")
        self.delivery = Delivery(self)
        self.popper = Popper(self)
        self.timekeeper = TimeKeeper(self)
        self.events = SlotEvents(self)
        self.adapter_caches = AdapterCaches.from_settings(settings.cache_home, settings.max_lora_cache_size,
                                                          settings.civitai_api_url, settings.civitai_api_token)

    # --- life cycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop popping; jobs in hand that can still finish are finished and submitted."""
        if not self.stopping:
            logger.warning("stopping: no new jobs; finishing {} job(s) in hand (Ctrl+C again to quit now)",
                           len(self.jobs))
        self.stopping = True
        self.poke()

    def replace_catalog_threadsafe(self, catalog: ModelCatalog) -> None:
        """Serve a new set of models from the next pop on (called from another thread)."""
        def swap() -> None:
            added = set(catalog.names()) - set(self.catalog.names())
            removed = set(self.catalog.names()) - set(catalog.names())
            self.catalog = catalog
            logger.info("now serving {} model(s){}{}", len(catalog),
                        f"; added {', '.join(sorted(added))}" if added else "",
                        f"; removed {', '.join(sorted(removed))}" if removed else "")
            self.poke()

        if self._loop is not None:
            self._loop.call_soon_threadsafe(swap)

    def poke(self) -> None:
        """Wake the main loop (something changed)."""
        if self._wake is not None:
            self._wake.set()

    def _spawn(self, coro: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("internal task failed")

    def spawn_for(self, job: Job, coro: Coroutine) -> None:
        """Run one stage of a job's work as a task whose every failure ends in `fault`."""
        self._spawn(self._owned(job, coro))

    async def _owned(self, job: Job, coro: Coroutine) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error("job {}: {} while {}: {}", job.id, type(exc).__name__, job.state.value, exc)
            self.fault(job, f"{type(exc).__name__}: {exc}")

    def fault(self, job: Job, reason: str) -> None:
        """The one way a job's trouble ends: FAULTED with `reason` and submitted (or, when its images are
        already encoded, delivered again). Safe to call for a job that already ended."""
        if job.state.is_final or self.jobs.get(job.id) is not job:
            return
        if job.state is JobState.FAULTED or job.state in (JobState.ENCODED, JobState.UPLOADED):
            job.finish_failures += 1
            if job.finish_failures > MAX_FINISH_TRIES:
                logger.error("job {} could not be delivered after {} tries ({}); left {}", job.id, job.finish_failures,
                             reason, "in the journal for the next start" if job.journaled else "unanswered")
                self.stats.jobs_abandoned += 1
                job.advance(JobState.ABANDONED)
                self.forget(job, keep_journal=job.journaled)
                return
        else:
            logger.error("job {} faulted: {}", job.id, reason)
            self.scheduler.remove(job)
            job.images = []
            job.advance(JobState.FAULTED, reason)
        self.finish(job)

    def finish(self, job: Job) -> None:
        """Start the delivery of a job that is generated or faulted, unless one is under way."""
        if job.id in self._delivering:
            return
        self._delivering.add(job.id)

        async def deliver() -> None:
            try:
                await self.delivery.finish(job)
            finally:
                self._delivering.discard(job.id)

        self.spawn_for(job, deliver())

    def _threadsafe(self, callback):
        def call(*args) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(callback, *args)
        return call

    async def run(self) -> int:
        """The supervisor's main loop; returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.pool = SlotPool(self.slot_specs, self._threadsafe(self.events.on_message),
                             self._threadsafe(self.events.on_death),
                             target=self._slot_target, backoff=self.restart_backoff)
        self.pool.start()
        if self.settings.dashboard:
            from horde_worker.ui.dashboard import Dashboard

            self.dashboard = Dashboard(self, self.settings.dashboard_host, self.settings.dashboard_port)
            await self.dashboard.start()
        await self._prepare_worker()
        for job in self.journal.pending():
            logger.info("resuming the submit of job {} left from an earlier run", job.id)
            self.jobs[job.id] = job
            self.finish(job)
        self._spawn(self.popper.run())
        last = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            now = time.monotonic()
            try:
                self._tick(now - last)
            except Exception as exc:  # the loop itself must outlive any bug in one tick
                logger.opt(exception=exc).error("supervisor tick failed: {}", exc)
            last = now
            if self.stopping and not self.jobs and not self.popper.in_flight:
                break
        await asyncio.to_thread(self.pool.stop)
        if self.dashboard is not None:
            await self.dashboard.stop()
        for task in list(self._tasks):
            task.cancel()
        self.safety_executor.shutdown(wait=False, cancel_futures=True)
        return 1 if self.fatal else 0

    def _tick(self, elapsed: float) -> None:
        if self.on_tick is not None:
            self.on_tick(elapsed)
        if self.config_poll is not None:
            try:
                self.config_poll()
            except Exception as exc:
                logger.error("settings file check failed ({}: {}); keeping the previous settings",
                             type(exc).__name__, exc)
        if not self.stopping and self.stop_condition is not None and not self.jobs and self.stop_condition():
            self.stopping = True
        needs_slot = any(j.state is JobState.QUEUED for j in self.jobs.values())
        if not self.stopping or needs_slot:
            for slot in self.pool.restart_due():
                logger.info("inference slot {} restarted (attempt {} in a row)", slot.spec.slot, slot.failures_in_row)
        self.timekeeper.sweep()
        if not self.stats.history or time.time() - self.stats.history[-1][0] >= HISTORY_INTERVAL:
            self.stats.sample_rates()
        self._warn_slow_preloads()
        self._dispatch()

    def _warn_slow_preloads(self) -> None:
        """A model read that has taken longer than preload_timeout: once per read, say which and how long, since a
        slow or failing disk holds up every job of that model."""
        limit = self.settings.preload_timeout
        now = time.monotonic()
        for slot in self.pool.slots:
            for name, since in list(slot.preloading.items()):
                if since >= 0 and now - since > limit:
                    logger.warning("slot {}: reading {} from disk has taken {:.0f}s (preload_timeout {}s): a slow or "
                                   "failing disk holds up its jobs; see logs/trace.log", slot.spec.slot, name,
                                   now - since, limit)
                    slot.preloading[name] = -1.0  # warned once
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
        specs = [slot.spec for slot in self.pool.working()] if self.pool is not None else self.slot_specs
        return PopRequest(
            name=s.dreamer_name, models=self.catalog.names(), bridge_agent=BRIDGE_AGENT,
            threads=max(1, sum(spec.max_jobs for spec in specs)), amount=s.max_batch, max_pixels=s.max_pixels, nsfw=s.nsfw,
            blacklist=s.blacklist, priority_usernames=s.priority_usernames,
            allow_img2img=s.allow_img2img, allow_painting=s.allow_painting, allow_unsafe_ipaddr=s.allow_unsafe_ip,
            allow_post_processing=s.allow_post_processing and self.catalog.postprocess.offered,
            allow_controlnet=s.allow_controlnet and self.catalog.control.available,
            allow_sdxl_controlnet=False, allow_lora=s.allow_lora,
            extra_slow_worker=s.extra_slow_worker, limit_max_steps=s.limit_max_steps,
            require_upfront_kudos=s.require_upfront_kudos,
        )

    def room_to_pop(self) -> bool:
        """Whether another job fits: the jobs not yet sampled, and the sampled ones still waiting for their
        safety check (a slow or restarting checker must not let finished images pile up, unjournaled), are
        fewer than queue_size plus the free working slots."""
        working = self.pool.working()
        if not working:
            return False
        waiting = sum(1 for j in self.jobs.values()
                      if j.state in (JobState.POPPED, JobState.INPUTS_READY, JobState.QUEUED, JobState.GENERATED))
        free_room = sum(slot.free_room for slot in working)
        extra = self.settings.extra_queue(sum(slot.spec.max_jobs for slot in working))
        return waiting < self.settings.queue_size + extra + free_room

    async def sleep_unless_stopping(self, seconds: float) -> None:
        """Sleep, waking early when the worker starts stopping."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def show_messages(self, pop: PopResponse) -> None:
        """Log each moderator message once."""
        for message in pop.messages:
            key = message.id or message.message
            if key not in self._seen_messages:
                self._seen_messages.add(key)
                logger.warning("message from the horde's moderators: {}", message.message)
                self.stats.message("moderator", message.message, "read it on the horde's site; it stays until they "
                                   "clear it")

    def stop_stale_copies(self, key: tuple) -> None:
        """A newly popped request that matches a job in hand whose TTL is (nearly) over: the horde has aborted
        the old copy and handed the request out again, so the old copy is stopped."""
        now = time.time()
        for job in list(self.jobs.values()):
            if job.state in (JobState.QUEUED, JobState.RUNNING, JobState.POSTPROCESSING) \
                    and job.deadline < now + max(0.0, self.timekeeper.margin) and fingerprint(job.pop) == key:
                logger.warning("job {} was handed out again by the horde; stopping the old copy", job.id)
                if job.state is JobState.RUNNING:
                    self.timekeeper.stop_running(job, "the horde handed the same request out again")
                else:
                    self.fault(job, "the horde handed the same request out again")

    # --- preparing and running ---------------------------------------------------------------

    async def prepare(self, job: Job) -> None:
        """Check the job against the worker's limits, fetch its inputs, and queue it."""
        catalog, s = self.catalog, self.settings
        job.seeds = jobspec.seeds_for(job.pop.payload, len(job.ids))
        model = catalog.get(job.model) if catalog.has(job.model) else None
        reason = bounds_reason(job.pop, max_pixels=s.max_pixels, max_batch=s.max_batch,
                               requirements=model.requirements if model is not None else None)
        reason = reason or jobspec.unsupported_reason(job, catalog)
        if reason is not None:
            self.fault(job, reason)
            return
        inputs = await asyncio.to_thread(fetch_inputs, self.client, job.pop, allow_unsafe_ip=s.allow_unsafe_ip)
        if job.state is not JobState.POPPED:  # ended meanwhile (time limit)
            return
        job.inputs = inputs
        job.gen_metadata.extend(inputs.notes)
        if job.pop.payload.loras or job.pop.payload.tis:
            job.loras, job.tis = await asyncio.to_thread(
                fetch_adapters, self.adapter_caches, job.pop, model.baseline, job.gen_metadata, allow_lora=s.allow_lora)
            if job.state is not JobState.POPPED:
                return
        job.advance(JobState.INPUTS_READY)
        self.scheduler.add(job)
        self._dispatch()

    def _dispatch(self) -> None:
        # One job per slot in turn, so that the jobs in hand spread over the devices.
        while len(self.scheduler):
            ready = [slot for slot in self.pool.slots if slot.has_room]
            if not ready:
                return
            for slot in ready:
                if len(self.scheduler) and slot.has_room:
                    self._dispatch_one(slot)

    def _dispatch_one(self, slot: Slot) -> None:
        """Send the job that suits this slot best (see `Scheduler.pick`)."""
        job = self.scheduler.pick(slot.resident)
        if job is None:
            return
        if not self.catalog.has(job.model):
            self.fault(job, f"model {job.model!r} is no longer served")
            return
        try:
            request = jobspec.generate_request(job, self.catalog)
        except Exception as exc:
            self.fault(job, f"{type(exc).__name__}: {exc}")
            return
        job.attempts += 1
        job.slot = slot.spec.slot
        slot.job_ids.add(job.id)
        job.advance(JobState.RUNNING)
        if not self.pool.send(slot, request):
            slot.release(job.id)
            job.attempts -= 1
            self.scheduler.add(job, front=True)
            return
        self.stats.job_started()
        self._preload_next(slot)

    def _preload_next(self, slot: Slot) -> None:
        """While this slot samples, have it read the next waiting job's model from disk."""
        upcoming = next((j for j in self.scheduler.waiting if self.catalog.has(j.model)), None)
        if upcoming is None or upcoming.model in slot.resident or upcoming.model in slot.preloading:
            return
        model = self.catalog.get(upcoming.model)
        if self.pool.send(slot, Preload(model.name, str(model.path), model.v_prediction)):
            slot.preloading[model.name] = time.monotonic()

    def slot_of(self, job: Job) -> Slot | None:
        """The slot sampling `job`, if any."""
        return next((slot for slot in self.pool.slots if job.id in slot.job_ids), None)

    # --- results -----------------------------------------------------------------------------

    def forget(self, job: Job, keep_journal: bool = False) -> None:
        """Drop a job that has ended (its journal entry too, unless it must be submitted at the next start)."""
        if job.id in self.jobs:
            self.stats.finished(job)
        if not keep_journal:
            with contextlib.suppress(OSError):
                self.journal.forget(job)
        self.adapter_caches.release([*job.loras, *job.tis])
        self.scheduler.remove(job)
        self.jobs.pop(job.id, None)
        self.poke()

    # --- status ------------------------------------------------------------------------------

    def busy(self) -> bool:
        """Whether a job is sampling or being post-processed now."""
        return any(j.state in (JobState.RUNNING, JobState.POSTPROCESSING) for j in self.jobs.values())

    def status_text(self) -> str:
        """The live status line."""
        slots: list[Any] = list(self.pool.slots) if self.pool is not None else []
        baselines = {name.lower(): self.catalog.get(name).baseline for name in self.catalog.names()}
        return status_line(list(self.jobs.values()), self.stats, unusable=[s.spec.slot for s in slots if not s.usable],
                           baselines=baselines)
