"""Finished images kept on disk until the horde has acknowledged their submit.

One folder per job: `job.json` (ids, seeds, state, metadata, which uploads succeeded) and the
WebP files. Written when the images are encoded or the job faults, removed once every id is
answered. At start, what is left is submitted again, so a crash or a network outage never
loses a finished image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from horde_worker.horde.wire import GenMetadata, PopResponse, SubmitState
from horde_worker.supervisor.job import Job, JobState

_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class JournalUnavailable(OSError):
    """The entry could not be written (disk full, read-only, ...); nothing half-written is left."""


class Journal:
    """Folder-per-job store under `root`. A journal that cannot be written never stops a delivery:
    `record` raises JournalUnavailable and the caller goes on without the safety net."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        with contextlib.suppress(OSError):  # record() says so for each job; the worker still delivers
            self.root.mkdir(parents=True, exist_ok=True)

    def _folder(self, job: Job) -> Path:
        # Ids come from the network: anything but a plain name gets a digest, so no id can point outside root.
        if _PLAIN_ID.fullmatch(job.id):
            return self.root / job.id
        return self.root / f"id-{hashlib.sha256(job.id.encode()).hexdigest()[:32]}"

    def record(self, job: Job) -> None:
        """Write (or update) the job's entry atomically, or raise JournalUnavailable leaving no partial entry
        (an earlier complete entry of the job stays as it was)."""
        folder = self._folder(job)
        had_entry = (folder / "job.json").exists()
        try:
            self._write(job, folder)
        except (OSError, ValueError, TypeError) as exc:
            for tmp in folder.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            if not had_entry:
                shutil.rmtree(folder, ignore_errors=True)
            raise JournalUnavailable(f"journal entry of job {job.id} not written: {type(exc).__name__}: {exc}") from exc

    def _write(self, job: Job, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for index, data in enumerate(job.webp):
            path = folder / f"{index}.webp"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
        entry = {
            "pop": job.pop.model_dump(mode="json"),
            "popped_at": job.popped_at,
            "state": job.state.value,
            "fault_reason": job.fault_reason,
            "seeds": job.seeds,
            "uploaded": job.uploaded,
            "submitted_ids": sorted(job.submitted_ids),
            "gen_metadata": [m.model_dump(mode="json") for m in job.gen_metadata],
            "image_states": [state.value for state in job.image_states],
            "image_metadata": [[m.model_dump(mode="json") for m in entries] for entries in job.image_metadata],
            "images": len(job.webp),
        }
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(entry))
        tmp.replace(folder / "job.json")
        job.journaled = True

    def forget(self, job: Job) -> None:
        """Drop the job's entry: every id has been answered."""
        shutil.rmtree(self._folder(job), ignore_errors=True)

    def pending(self) -> list[Job]:
        """Jobs left by an earlier run that still need their submit (folders without a complete entry are
        removed)."""
        jobs = []
        if not self.root.is_dir():
            return jobs
        for folder in self.root.iterdir():
            if folder.is_dir() and not (folder / "job.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
        for entry_path in sorted(self.root.glob("*/job.json")):
            try:
                entry: dict[str, Any] = json.loads(entry_path.read_text())
                pop = PopResponse.model_validate(entry["pop"])
                job = Job(pop=pop, popped_at=entry["popped_at"], state=JobState(entry["state"]))
                job.fault_reason = entry.get("fault_reason")
                job.seeds = list(entry["seeds"])
                job.uploaded = list(entry["uploaded"])
                job.submitted_ids = set(entry["submitted_ids"])
                job.gen_metadata = [GenMetadata.model_validate(m) for m in entry["gen_metadata"]]
                job.image_states = [SubmitState(state) for state in entry.get("image_states", [])]
                job.image_metadata = [[GenMetadata.model_validate(m) for m in entries]
                                      for entries in entry.get("image_metadata", [])]
                job.webp = [(entry_path.parent / f"{i}.webp").read_bytes() for i in range(entry["images"])]
                job.journaled = True
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(entry_path.parent, ignore_errors=True)
                continue
            jobs.append(job)
        return jobs
