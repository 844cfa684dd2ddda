"""The engine's decisions without any model: which jobs start, which unit steps next."""

from __future__ import annotations

from horde_worker.inference.engine_scheduler import (
    DEADLINE_MARGIN,
    PATIENCE,
    JobKind,
    Running,
    Waiting,
    jobs_to_start,
    unit_to_step,
    units,
)

NOW = 1000.0
B, S, X = JobKind.BATCHED, JobKind.SHARED, JobKind.EXCLUSIVE


def waiting(job_id: str, model: str = "m", kind: JobKind = S, age: float = 1.0, deadline: float | None = None):
    return Waiting(job_id, model, kind, NOW - age, deadline)


def test_jobs_start_in_arrival_order_up_to_the_engines_room():
    queue = [waiting("a", age=5), waiting("b", age=4), waiting("c", age=3)]
    assert jobs_to_start(queue, [], max_jobs=2, now=NOW) == ["a", "b"]
    assert jobs_to_start(queue, [Running("r", "m", B, ("k",))], max_jobs=2, now=NOW) == ["a"]
    assert jobs_to_start(queue, [Running("r", "m", B), Running("s", "m", S)], max_jobs=2, now=NOW) == []


def test_filling_a_batch_beats_switching_models():
    queue = [waiting("other", model="n", age=5), waiting("same", model="m", age=4)]
    # Something of model m runs: the job of m starts, n waits (not yet urgent) for the engine to empty.
    assert jobs_to_start(queue, [Running("r", "m", B)], max_jobs=4, now=NOW) == ["same"]
    # Nothing runs: the oldest starts, and then jobs of its model.
    assert jobs_to_start(queue, [], max_jobs=4, now=NOW) == ["other"]


def test_an_urgent_job_of_another_model_is_not_overtaken():
    stale = waiting("stale", model="n", age=PATIENCE + 1)
    fresh = waiting("fresh", model="m", age=1)
    running = [Running("r", "m", B)]
    assert jobs_to_start([stale, fresh], running, max_jobs=4, now=NOW) == []  # m drains
    assert jobs_to_start([stale, fresh], [], max_jobs=4, now=NOW) == ["stale"]  # then n starts first
    near = waiting("near", model="n", age=1, deadline=NOW + DEADLINE_MARGIN - 1)
    assert jobs_to_start([near, fresh], running, max_jobs=4, now=NOW) == []
    far = waiting("far", model="n", age=1, deadline=NOW + DEADLINE_MARGIN + 60)
    assert jobs_to_start([far, fresh], running, max_jobs=4, now=NOW) == ["fresh"]


def test_urgent_jobs_start_longest_waiting_first():
    queue = [waiting("young", age=PATIENCE + 2), waiting("old", age=PATIENCE + 50), waiting("new", age=1)]
    assert jobs_to_start(queue, [], max_jobs=1, now=NOW) == ["old"]
    assert jobs_to_start(queue, [], max_jobs=3, now=NOW) == ["old", "young", "new"]


def test_an_exclusive_job_runs_alone():
    lora = waiting("lora", kind=X, age=5)
    plain = waiting("plain", age=4)
    assert jobs_to_start([lora, plain], [], max_jobs=4, now=NOW) == ["lora"]
    assert jobs_to_start([plain], [Running("lora", "m", X)], max_jobs=4, now=NOW) == []
    # It waits for the running jobs of its own model to end, and later jobs do not start before it once urgent.
    assert jobs_to_start([lora, plain], [Running("r", "m", B)], max_jobs=4, now=NOW) == ["plain"]
    urgent_lora = waiting("lora", kind=X, age=PATIENCE + 1)
    assert jobs_to_start([urgent_lora, plain], [Running("r", "m", B)], max_jobs=4, now=NOW) == []


def test_batched_jobs_of_one_group_step_together_and_units_take_turns():
    running = [Running("a", "m", B, ("64x64",), last_step=3), Running("b", "m", B, ("64x64",), last_step=3),
               Running("c", "m", B, ("64x96",), last_step=2), Running("s", "m", S, None, last_step=4)]
    assert sorted(len(u) for u in units(running)) == [1, 1, 2]
    assert unit_to_step(running) == ["c"]  # stepped longest ago
    after_c = [r if r.job_id != "c" else Running("c", "m", B, ("64x96",), last_step=5) for r in running]
    assert unit_to_step(after_c) == ["a", "b"]
    # On a tie the larger unit goes first; a just-started job (never stepped) goes before all.
    tie = [Running("a", "m", B, ("g",), 1), Running("b", "m", B, ("g",), 1), Running("s", "m", S, None, 1)]
    assert unit_to_step(tie) == ["a", "b"]
    assert unit_to_step([*tie, Running("new", "m", S)]) == ["new"]
    assert unit_to_step([]) == []


def test_the_same_group_key_of_two_models_is_two_units():
    running = [Running("a", "m", B, ("g",), 0), Running("b", "n", B, ("g",), 0)]
    assert len(units(running)) == 2
