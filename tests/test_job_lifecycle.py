"""The job state machine, the scheduler, the journal and the pop-to-submit mapping, without a GPU."""

from __future__ import annotations

import time

import pytest

from horde_worker.horde.wire import GenMetadata, PopResponse
from horde_worker.supervisor import jobspec
from horde_worker.supervisor.job import IllegalTransition, Job, JobState
from horde_worker.supervisor.journal import Journal
from horde_worker.supervisor.scheduler import Scheduler


def make_job(model: str = "m1", ids: int = 1, seed: str = "100", popped_at: float | None = None,
             ttl: int = 150) -> Job:
    pop = PopResponse.model_validate({
        "id": f"{model}-{time.monotonic_ns()}", "ids": [f"{model}-{time.monotonic_ns()}-{i}" for i in range(ids)],
        "model": model, "ttl": ttl, "payload": {"prompt": "a ### b", "seed": seed, "n_iter": ids},
        "r2_uploads": [f"http://127.0.0.1/r2/{i}" for i in range(ids)],
    })
    return Job(pop=pop, popped_at=time.time() if popped_at is None else popped_at)


def test_happy_path_and_illegal_moves():
    job = make_job()
    for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING, JobState.GENERATED, JobState.CHECKED,
                  JobState.ENCODED,
                  JobState.UPLOADED, JobState.SUBMITTED):
        job.advance(state)
    assert [s for _, s in job.history][-1] is JobState.SUBMITTED
    with pytest.raises(IllegalTransition):
        job.advance(JobState.FAULTED)
    fresh = make_job()
    with pytest.raises(IllegalTransition, match="popped -> running"):
        fresh.advance(JobState.RUNNING)


def test_fault_from_any_unfinished_state_and_rerun_after_slot_death():
    job = make_job()
    job.advance(JobState.INPUTS_READY)
    job.advance(JobState.QUEUED)
    job.advance(JobState.RUNNING)
    job.advance(JobState.QUEUED)  # the slot died: runs again
    job.advance(JobState.RUNNING)
    job.advance(JobState.FAULTED, "boom")
    assert job.fault_reason == "boom"
    job.advance(JobState.SUBMITTED)


def test_post_processing_overlap_state_and_status_line():
    from horde_worker.supervisor.stats import SessionStats, status_line

    sampling, post = make_job("m1"), make_job("m2")
    for job in (sampling, post):
        for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING):
            job.advance(state)
    sampling.progress = (3, 20)
    post.advance(JobState.POSTPROCESSING)  # sampling ended, the slot took the next job
    stats = SessionStats(jobs_done=4)
    stats.postprocessed(2.0)
    stats.postprocessed(1.0)
    line = status_line([sampling, post], stats)
    assert "running m1 3/20" in line and "post-processing 1" in line and "2 post-processed (1.5s avg)" in line
    # Before its first step a job is loading its model, for so many seconds so far: never "0/0".
    loading = make_job("m3")
    for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING):
        loading.advance(state)
    line = status_line([loading], stats)
    assert "loading m3 (0s)" in line and "0/0" not in line
    # The horde's kudos multiplier of the running job's baseline is shown beside it.
    assert "running m1 (kudos x12) 3/20" in status_line([sampling], stats, baselines={"m1": "qwen_image"})
    assert "running m1 3/20" in status_line([sampling], stats, baselines={"m1": "stable_diffusion_1"})
    from horde_worker.models.reference import kudos_multiplier

    assert [kudos_multiplier(b) for b in ("stable_diffusion_xl", "stable_cascade", "flux_1", "z_image_turbo")] == [
        2, 4, 8, 8]
    assert kudos_multiplier("stable_cascade", hires_fix=True) == 7
    post.advance(JobState.GENERATED)
    with pytest.raises(IllegalTransition):
        post.advance(JobState.POSTPROCESSING)
    crashed = make_job()
    for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING, JobState.POSTPROCESSING):
        crashed.advance(state)
    crashed.advance(JobState.QUEUED)  # its process died while post-processing: it runs again


def queued(scheduler: Scheduler, job: Job) -> Job:
    job.advance(JobState.INPUTS_READY)
    scheduler.add(job)
    return job


def test_scheduler_prefers_resident_models_but_never_starves():
    scheduler = Scheduler(max_skips=2)
    old = queued(scheduler, make_job("cold"))
    hot = [queued(scheduler, make_job("hot")) for _ in range(4)]
    assert scheduler.pick(["hot"]) is hot[0]
    assert scheduler.pick(["hot"]) is hot[1]
    assert scheduler.pick(["hot"]) is old  # passed over twice: its turn now
    assert scheduler.pick(["hot"]) is hot[2]


def test_scheduler_runs_a_job_whose_ttl_is_half_gone_first():
    scheduler = Scheduler(max_skips=10)
    old = queued(scheduler, make_job("cold", popped_at=time.time() - 100, ttl=150))
    queued(scheduler, make_job("hot"))
    assert scheduler.pick(["hot"]) is old


def test_seeds_are_consecutive_from_the_pops_string_seed():
    job = make_job(ids=3, seed="4294967295")
    assert jobspec.seeds_for(job.pop.payload, 3) == [4294967295, 0, 1]
    words = make_job(seed="my lucky words").pop.payload
    assert jobspec.seeds_for(words, 1) == jobspec.seeds_for(words, 1)


def test_submit_body_uses_r2_or_base64_and_integer_seed():
    job = make_job(ids=2, seed="7")
    job.seeds = [7, 8]
    job.webp = [b"RIFF0000WEBPdata0", b"RIFF0000WEBPdata1"]
    job.uploaded = [True, False]
    first, second = jobspec.submit_body(job, 0).to_wire(), jobspec.submit_body(job, 1).to_wire()
    assert first == {"id": job.ids[0], "generation": "R2", "seed": 7, "state": "ok"}
    assert second["generation"] != "R2" and second["seed"] == 8
    job.fault_reason = "no"
    job.gen_metadata = [GenMetadata(type="source_image", value="download_failed")]
    faulted = jobspec.submit_body(job, 0).to_wire()
    assert faulted["state"] == "faulted"
    # The notes, then the reason, so the horde's records say why (the requester never sees it).
    assert faulted["gen_metadata"] == [{"type": "source_image", "value": "download_failed"},
                                       {"type": "information", "value": "see_ref", "ref": "faulted: no"}]


def test_journal_keeps_finished_images_until_forgotten(tmp_path):
    journal = Journal(tmp_path)
    job = make_job(ids=2)
    job.seeds = [100, 101]
    job.webp = [b"one", b"two"]
    job.uploaded = [True, False]
    job.submitted_ids = {job.ids[0]}
    for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING, JobState.GENERATED, JobState.CHECKED,
                  JobState.ENCODED):
        job.advance(state)
    journal.record(job)
    (restored,) = Journal(tmp_path).pending()
    assert restored.ids == job.ids and restored.webp == [b"one", b"two"] and restored.state is JobState.ENCODED
    assert restored.submitted_ids == {job.ids[0]} and restored.uploaded == [True, False]
    journal.forget(job)
    assert Journal(tmp_path).pending() == []


def test_unsupported_requests_are_named():
    from pathlib import Path

    from horde_worker.models.catalog import ModelCatalog, ServedModel

    catalog = ModelCatalog([ServedModel("m1", Path("x"), "stable_diffusion_1")])
    job = make_job()
    assert jobspec.unsupported_reason(job, catalog) is None
    job.pop.payload.sampler_name = "k_made_up"
    assert "k_made_up" in jobspec.unsupported_reason(job, catalog)
    other = make_job(model="m2")
    assert "not served" in jobspec.unsupported_reason(other, catalog)


def test_scheduler_puts_a_rerun_job_first_and_guards_every_waiting_job_not_only_the_head():
    scheduler = Scheduler(max_skips=2)
    head, middle, rerun = make_job("m1"), make_job("m2"), make_job("m3")
    for job in (head, middle):
        job.advance(JobState.INPUTS_READY)
        scheduler.add(job)
    for state in (JobState.INPUTS_READY, JobState.QUEUED, JobState.RUNNING):
        rerun.advance(state)
    scheduler.add(rerun, front=True)  # its process died: it does not go behind the others
    assert scheduler.waiting[0] is rerun
    assert scheduler.pick(["m2"]) is middle  # a resident model is preferred...
    starved = make_job("m4", popped_at=time.time() - 100, ttl=150)  # ...but not over a job with half its TTL gone
    starved.advance(JobState.INPUTS_READY)
    scheduler.add(starved)
    assert scheduler.waiting[-1] is starved
    assert scheduler.pick(["m1"]) is starved


def test_journal_never_leaves_half_written_entries_and_ids_cannot_leave_its_folder(tmp_path, monkeypatch):
    from horde_worker.supervisor.journal import JournalUnavailable

    journal = Journal(tmp_path / "journal")
    job = make_job()
    job.webp = [b"RIFF....WEBP"]
    original_write = Journal._write

    def full_disk(self, job, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "0.tmp").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Journal, "_write", full_disk)
    with pytest.raises(JournalUnavailable, match="No space left"):
        journal.record(job)
    assert list((tmp_path / "journal").iterdir()) == []
    monkeypatch.setattr(Journal, "_write", original_write)
    journal.record(job)
    monkeypatch.setattr(Journal, "_write", full_disk)
    with pytest.raises(JournalUnavailable):  # an update fails: the earlier complete entry stays usable
        journal.record(job)
    assert [j.id for j in journal.pending()] == [job.id]
    evil = make_job()
    evil.pop.ids[0] = "../../escape"
    monkeypatch.setattr(Journal, "_write", original_write)
    journal.record(evil)
    assert not (tmp_path / "escape").exists()
    assert all(p.parent == tmp_path / "journal" for p in (tmp_path / "journal").iterdir())
    assert {j.id for j in journal.pending()} == {job.id, "../../escape"}


def test_bounds_name_what_is_out_of_range():
    from horde_worker.supervisor.bounds import bounds_reason

    def reason(**payload):
        pop = PopResponse.model_validate({"id": "a", "ids": ["a"], "model": "m", "payload": payload})
        return bounds_reason(pop, max_pixels=512 * 512, max_batch=1, requirements={"max_steps": 8})

    assert "steps 30 is outside 1..8" in reason()  # the default 30 steps is over this model's 8
    assert reason(ddim_steps=8) is None
    assert "steps 9 is outside 1..8" in reason(ddim_steps=9)
    assert "width 100" in reason(ddim_steps=4, width=100)
    assert "max_pixels" in reason(ddim_steps=4, width=1024, height=1024)
    assert "cfg_scale inf" in reason(ddim_steps=4, cfg_scale=float("inf"))
    assert "denoising_strength 2" in reason(ddim_steps=4, denoising_strength=2)
    assert "7500" in reason(ddim_steps=4, prompt="p" * 7501)
