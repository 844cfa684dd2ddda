"""What the fault proxy saw, per job id, and the summaries the soak asserts on.

The log is filled from the proxy's handler threads and read from the test's thread; every access
goes through one lock. Times are `time.time()` on this machine (the proxy and the local horde share
its clock).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.malformed_jobs import MUTATIONS, satisfied

# Upstream answers to a forwarded submit that settle an id for good.
SETTLING_RCS = ("AbortedGen", "DuplicateGen")


@dataclass
class SubmitSeen:
    """One submit for one id as the proxy saw it."""

    at: float
    state: str | None
    gen_metadata: list[dict[str, Any]]
    generation: str  # "R2" or "base64"
    fault: str | None  # injected on this call, if any
    forwarded: bool
    upstream_status: int | None = None
    upstream_rc: str | None = None

    @property
    def accepted(self) -> bool:
        return self.forwarded and self.upstream_status == 200

    @property
    def settled(self) -> bool:
        """Upstream took it or refused it for good (AbortedGen / DuplicateGen)."""
        return self.accepted or (self.forwarded and self.upstream_rc in SETTLING_RCS)


@dataclass
class IdRecord:
    """One job id handed out by the horde through the proxy."""

    id: str
    job: str  # the first id of its pop
    popped_at: float  # when the proxy received the pop: the horde's TTL starts a moment later
    ttl: float
    epoch: int  # which run of the worker popped it (the test bumps it on a restart)
    delivered: bool = True  # False: a fault kept the pop's answer from the worker
    withheld_by: str | None = None
    malformed: str | None = None
    submits: list[SubmitSeen] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)

    @property
    def accepted(self) -> int:
        return sum(1 for s in self.submits if s.accepted)

    @property
    def answer(self) -> SubmitSeen | None:
        """The first forwarded submit upstream settled the id with."""
        return next((s for s in self.submits if s.settled), None)


class ProxyLog:
    """Thread-safe record of everything the fault proxy did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ids: dict[str, IdRecord] = {}
        self.faults: Counter = Counter()  # "endpoint:kind" -> count
        self.calls: Counter = Counter()  # endpoint -> calls received
        self.non_loopback: list[tuple[float, str, str]] = []  # (time, method, target)
        self.submits_unknown: list[tuple[float, str]] = []  # submits for ids never popped here
        self.pops: list[tuple[float, int, int]] = []  # (time, epoch, ids handed out)
        self.epoch = 0
        self.epoch_started: dict[int, float] = {0: time.time()}

    # --- filled by the proxy ---------------------------------------------------------------

    def call(self, endpoint: str) -> None:
        with self._lock:
            self.calls[endpoint] += 1

    def fault(self, endpoint: str, kind: str, job_id: str | None = None) -> None:
        with self._lock:
            self.faults[f"{endpoint}:{kind}"] += 1
            if job_id in self.ids:
                self.ids[job_id].faults[f"{endpoint}:{kind}"] += 1

    def popped(self, received_at: float, answer: dict[str, Any], *, delivered: bool, withheld_by: str | None,
               malformed: str | None) -> None:
        ids = [i for i in answer.get("ids") or [] if isinstance(i, str)]
        with self._lock:
            self.pops.append((received_at, self.epoch, len(ids)))
            for job_id in ids:
                self.ids[job_id] = IdRecord(id=job_id, job=ids[0], popped_at=received_at,
                                            ttl=float(answer.get("ttl") or 0), epoch=self.epoch,
                                            delivered=delivered, withheld_by=withheld_by, malformed=malformed)

    def submitted(self, body: Any, seen: SubmitSeen) -> SubmitSeen:
        job_id = body.get("id") if isinstance(body, dict) else None
        with self._lock:
            record = self.ids.get(job_id) if isinstance(job_id, str) else None
            if record is None:
                self.submits_unknown.append((seen.at, str(job_id)))
            else:
                record.submits.append(seen)
        return seen

    def refused_target(self, method: str, target: str) -> None:
        with self._lock:
            self.non_loopback.append((time.time(), method, target))

    def new_epoch(self) -> int:
        """Mark that another run of the worker starts popping from now on."""
        with self._lock:
            self.epoch += 1
            self.epoch_started[self.epoch] = time.time()
            return self.epoch

    # --- read by the test ------------------------------------------------------------------

    def snapshot(self) -> list[IdRecord]:
        with self._lock:
            return [IdRecord(**{**vars(r), "submits": list(r.submits), "faults": Counter(r.faults)})
                    for r in self.ids.values()]

    def delivered(self) -> list[IdRecord]:
        """Ids whose pop answer reached the worker intact (malformed on purpose or not)."""
        return [r for r in self.snapshot() if r.delivered]

    def unanswered(self) -> list[IdRecord]:
        """Delivered ids that no forwarded submit settled."""
        return [r for r in self.delivered() if r.answer is None]

    def accepted_twice(self) -> list[IdRecord]:
        return [r for r in self.snapshot() if r.accepted > 1]

    def answered_late(self, slack: float = 0.0) -> list[tuple[IdRecord, float]]:
        """(record, seconds past its TTL) for ids whose first submit reached the proxy after the TTL."""
        late = []
        for record in self.delivered():
            if record.submits and record.ttl:
                past = min(s.at for s in record.submits) - (record.popped_at + record.ttl)
                if past > slack:
                    late.append((record, past))
        return late

    def faulted_without_reason(self) -> list[tuple[IdRecord, SubmitSeen]]:
        return [(r, s) for r in self.snapshot() for s in r.submits if s.state == "faulted" and not s.gen_metadata]

    def malformed_mishandled(self) -> list[tuple[IdRecord, str]]:
        """Spoiled ids whose settling answer is not what their mutation calls for (see malformed_jobs)."""
        wrong = []
        for record in self.delivered():
            answer = record.answer
            if record.malformed is None or answer is None:
                continue
            expected = MUTATIONS[record.malformed][1]
            if not satisfied(expected, answer.state, answer.gen_metadata):
                wrong.append((record, f"expected {expected}, got state {answer.state} "
                                      f"gen_metadata {answer.gen_metadata}"))
        return wrong

    def answers_lost_after_forwarding(self) -> int:
        """Submits that took effect upstream while the worker never read the answer: each may honestly
        be sent again and be refused as DuplicateGen."""
        lost_kinds = ("reset_after", "truncate_long", "truncate_short")
        return sum(1 for r in self.snapshot() for s in r.submits if s.forwarded and s.fault in lost_kinds)

    def submit_times(self) -> list[float]:
        return sorted(s.at for r in self.snapshot() for s in r.submits)

    def outcomes(self) -> Counter:
        """How each delivered id ended: ok, censored, faulted, aborted, duplicate, unanswered; plus withheld."""
        out: Counter = Counter()
        for record in self.snapshot():
            if not record.delivered:
                out["withheld"] += 1
                continue
            answer = record.answer
            if answer is None:
                out["unanswered"] += 1
            elif answer.accepted:
                out[answer.state or "ok"] += 1
            else:
                out["aborted" if answer.upstream_rc == "AbortedGen" else "duplicate"] += 1
        return out

    def most_in_hand(self) -> tuple[int, float]:
        """The most delivered jobs held by the worker at once (popped, not yet settled), and when."""
        changes = []
        for record in self.delivered():
            if record.id != record.job:
                continue
            # A job its killed process never answered is held until the next run starts.
            end = record.answer.at if record.answer is not None else self.epoch_started.get(record.epoch + 1)
            changes.append((record.popped_at, 1))
            if end is not None:
                changes.append((end, -1))
        held, most, when = 0, 0, 0.0
        for at, step in sorted(changes):
            held += step
            if held > most:
                most, when = held, at
        return most, when

    def malformed_counts(self) -> Counter:
        return Counter(r.malformed for r in self.snapshot() if r.malformed and r.id == r.job)

    def summary(self) -> dict[str, Any]:
        """Figures of a run, for the test's report and docs/reliability.md."""
        records = self.snapshot()
        with self._lock:
            faults, calls = dict(sorted(self.faults.items())), dict(sorted(self.calls.items()))
            non_loopback = list(self.non_loopback)
        return {
            "ids": len(records), "jobs": len({r.job for r in records}),
            "delivered_ids": sum(1 for r in records if r.delivered),
            "outcomes": dict(sorted(self.outcomes().items())),
            "faults": faults, "calls": calls,
            "malformed_jobs": dict(sorted(self.malformed_counts().items())),
            "non_loopback": non_loopback,
        }

    def dump(self, path: Path) -> None:
        """Every id's record as JSON, for a look after a failed run."""
        records = [{**asdict(r), "faults": dict(r.faults)} for r in self.snapshot()]
        with self._lock:
            extra = {"pops": list(self.pops), "submits_unknown": list(self.submits_unknown),
                     "non_loopback": list(self.non_loopback)}
        Path(path).write_text(json.dumps({"ids": records, **extra}, indent=1, default=str))
