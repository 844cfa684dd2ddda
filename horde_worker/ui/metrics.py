"""Prometheus metrics of one worker (`/metrics` on the dashboard's server), read from the supervisor at each scrape.

Counters are the session's totals (they start at 0 with the process, as Prometheus expects of a counter), the
step-time histogram's counts too.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from horde_worker.supervisor.job import JobState
from horde_worker.supervisor.stats import STEP_BUCKETS

PREFIX = "horde_worker"


class WorkerCollector(Collector):
    """The supervisor's figures as Prometheus metric families."""

    def __init__(self, sup) -> None:
        self.sup = sup

    def collect(self):
        sup, stats = self.sup, self.sup.stats
        worker = sup.settings.dreamer_name
        jobs = CounterMetricFamily(f"{PREFIX}_jobs", "Jobs that left the worker, by outcome", labels=["worker", "outcome"])
        for outcome, value in (("done", stats.jobs_done), ("faulted", stats.jobs_faulted),
                               ("abandoned", stats.jobs_abandoned)):
            jobs.add_metric([worker, outcome], value)
        yield jobs
        for name, help_text, value in (
                ("images", "Images submitted and accepted", stats.images),
                ("megapixelsteps", "Megapixelsteps generated", stats.megapixelsteps),
                ("kudos", "Kudos the horde credited", stats.kudos),
                ("model_switches", "Jobs that had to load their model", stats.model_switches),
                ("upload_failures", "Image uploads that failed (the image went in the submit)", stats.upload_failures),
                ("submit_retries", "Submits retried after the horde could not be reached", stats.submit_retries)):
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=["worker"])
            family.add_metric([worker], value)
            yield family
        verdicts = CounterMetricFamily(f"{PREFIX}_safety_verdicts", "Images checked by the safety check, by verdict",
                                       labels=["worker", "verdict"])
        for verdict, count in sorted(stats.safety_verdicts.items()):
            verdicts.add_metric([worker, verdict], count)
        yield verdicts
        buckets = [(str(bound), count) for bound, count in zip(STEP_BUCKETS, stats.step_buckets, strict=True)]
        histogram = HistogramMetricFamily(f"{PREFIX}_step_seconds", "Seconds per sampling step of each job",
                                          labels=["worker"])
        histogram.add_metric([worker], buckets + [("+Inf", stats.step_count)], sum_value=stats.step_sum)
        yield histogram
        queue = GaugeMetricFamily(f"{PREFIX}_queue_jobs", "Jobs in hand, by state", labels=["worker", "state"])
        for state in JobState:
            queue.add_metric([worker, state.value], sum(1 for j in sup.jobs.values() if j.state is state))
        yield queue
        rate = GaugeMetricFamily(f"{PREFIX}_kudos_per_hour", "Kudos per hour this session", labels=["worker"])
        rate.add_metric([worker], stats.kudos_per_hour)
        yield rate
        device = GaugeMetricFamily(f"{PREFIX}_device_peak_bytes", "Peak device memory of each slot's engine",
                                   labels=["worker", "slot", "device"])
        resident = GaugeMetricFamily(f"{PREFIX}_resident_models", "Models held by each slot",
                                     labels=["worker", "slot", "device"])
        for slot in list(sup.pool.slots) if getattr(sup, "pool", None) is not None else []:
            labels = [worker, str(slot.spec.slot), slot.spec.device]
            peak = stats.engines.get(slot.spec.slot, {}).get("peak_device_bytes")
            if peak is not None:
                device.add_metric(labels, peak)
            resident.add_metric(labels, len(slot.resident))
        yield device
        yield resident
        from horde_worker.ui.snapshot import memory

        ram = GaugeMetricFamily(f"{PREFIX}_ram_bytes", "RAM of the worker and its slot processes", labels=["worker"])
        ram.add_metric([worker], memory().get("worker_rss_bytes", 0))
        yield ram


def registry_for(sup) -> CollectorRegistry:
    """A registry holding only this worker's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WorkerCollector(sup))
    return registry
