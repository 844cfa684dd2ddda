"""What the dashboard shows, as one JSON-ready dict read from the supervisor: per slot what runs now, the queue,
resident models, totals and rates over time, recent jobs with their outcome, the horde's messages, the settings.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from horde_worker import BRIDGE_AGENT
from horde_worker.supervisor.job import JobState

WAITING = (JobState.POPPED, JobState.INPUTS_READY, JobState.QUEUED)
SECRET_NAME = re.compile(r"key|token|secret|passw", re.IGNORECASE)


def _eta(job, now: float) -> float | None:
    """Seconds left for a running job, from the pace of its steps so far."""
    step, total = job.progress
    if not job.first_step or step <= job.first_step[1] or total <= 0:
        return None
    when, first = job.first_step
    per_step = (now - when) / (step - first)
    return round(per_step * (total - step), 1)


def _job(job, now: float) -> dict[str, Any]:
    payload = job.pop.payload
    step, total = job.progress
    return {"id": job.id, "model": job.model, "state": job.state.value, "step": step, "steps": total,
            "eta_s": _eta(job, now) if job.state is JobState.RUNNING else None, "width": payload.width,
            "height": payload.height, "images": len(job.ids), "slot": job.slot,
            "waited_s": round(now - job.popped_at, 1)}


def memory() -> dict[str, int]:
    """RAM of the worker and its slot processes."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        processes = [process, *process.children(recursive=True)]
        rss = 0
        for each in processes:
            try:
                rss += each.memory_info().rss
            except psutil.Error:
                continue
        return {"worker_rss_bytes": rss, "system_available_bytes": psutil.virtual_memory().available}
    except ImportError:
        return {}


def _without_credentials(value: Any) -> Any:
    """A URL without a user:password part."""
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.username or parts.password:
            return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return value


def settings_in_effect(settings) -> dict[str, Any]:
    """The declared settings (keys the file has but the worker does not know are left out), secrets hidden:
    any key named like one (key, token, secret, password) and credentials written into URLs."""
    values = settings.model_dump(mode="json")
    shown = {}
    for key in type(settings).model_fields:
        value = values.get(key)
        shown[key] = ("(set)" if value else "") if SECRET_NAME.search(key) else _without_credentials(value)
    return shown


def snapshot(sup) -> dict[str, Any]:
    """The dashboard's picture of the worker now."""
    now = time.time()
    stats = sup.stats
    jobs = list(sup.jobs.values())
    slots = []
    for slot in list(sup.pool.slots) if getattr(sup, "pool", None) is not None else []:
        number = slot.spec.slot
        engine = stats.engines.get(number, {})
        slots.append({
            "slot": number, "device": slot.spec.device, "device_name": slot.device_name, "ready": slot.ready,
            "unusable": slot.unusable, "restarts": slot.restarts, "resident": list(slot.resident),
            "loading": sorted(slot.preloading), "peak_device_bytes": engine.get("peak_device_bytes"),
            "busy_seconds": engine.get("busy_seconds"), "fit": stats.fits.get(number) or "",
            "jobs": [_job(j, now) for j in jobs if j.slot == number and j.state in (
                JobState.RUNNING, JobState.POSTPROCESSING)]})
    steps = list(stats.step_seconds)
    return {
        "worker": {"name": sup.settings.dreamer_name, "bridge_agent": BRIDGE_AGENT,
                   "uptime_s": round(now - stats.started_at), "stopping": sup.stopping, "fatal": sup.fatal,
                   "time": now},
        "totals": {"jobs_done": stats.jobs_done, "jobs_faulted": stats.jobs_faulted,
                   "jobs_abandoned": stats.jobs_abandoned, "censored": stats.censored, "images": stats.images,
                   "kudos": round(stats.kudos, 2), "kudos_per_hour": round(stats.kudos_per_hour, 1),
                   "images_per_hour": round(stats.images_per_hour, 1),
                   "megapixelsteps_per_second": round(stats.megapixelsteps_per_second, 3),
                   "model_switches": stats.model_switches,
                   "mean_step_seconds": round(sum(steps) / len(steps), 4) if steps else None},
        "slots": slots,
        "queue": [_job(j, now) for j in jobs if j.state in WAITING],
        "delivering": [_job(j, now) for j in jobs if j.state not in (*WAITING, JobState.RUNNING,
                                                                     JobState.POSTPROCESSING)],
        "models": sup.catalog.names(),
        "memory": memory(),
        "recent": list(stats.recent),
        "history": [{"t": t, "images_per_hour": i, "mps": m, "kudos_per_hour": k} for t, i, m, k in stats.history],
        "messages": list(stats.messages),
        "settings": settings_in_effect(sup.settings),
    }
