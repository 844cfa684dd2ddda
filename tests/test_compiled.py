"""Compiled denoisers per batch bucket: the same images as eager, no recompile for a second job of a bucket,
and a restarted process that finds its graphs in the on-disk cache."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from horde_worker.inference.compiled import BUCKETS, _pad, bucket
from tests.conftest import REPO


def test_rows_pad_up_to_their_bucket():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9, 64, 65, 130)] == [1, 2, 4, 4, 8, 16, 64, 128, 192]
    assert all(bucket(size) == size for size in BUCKETS)
    rows = torch.arange(6.0).reshape(3, 2)
    padded = _pad(rows, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], rows) and torch.equal(padded[3], rows[2])


def probe(cache_home, name: str) -> dict:
    out = cache_home / f"{name}.json"
    subprocess.run([sys.executable, "-m", "tests.compile_probe", str(cache_home), str(out)], cwd=REPO, check=True,
                   timeout=600, capture_output=True)
    return json.loads(out.read_text())


def test_compiled_jobs_match_eager_compile_once_per_bucket_and_reuse_the_disk_cache(tmp_path):
    cold = probe(tmp_path, "cold")
    assert cold["failed"] == [] and cold["buckets_ready"] == 1
    assert cold["fxgraph_cache_miss"] >= 1 and cold["fxgraph_cache_hit"] == 0
    # The second job of the bucket ran compiled, every step, and compiled nothing new.
    assert cold["compiled_calls_of_second_job"] == 3 and cold["graphs_compiled_for_second_job"] == 0
    assert max(cold["max_pixel_difference_from_eager"].values()) <= 1
    warm = probe(tmp_path, "warm")  # a restart with the same cache_home
    assert warm["fxgraph_cache_hit"] >= 1 and warm["fxgraph_cache_miss"] == 0
    assert warm["compiled_calls_of_second_job"] == 3 and max(warm["max_pixel_difference_from_eager"].values()) <= 1
    print(f"compile of one bucket on this CPU: cold {cold['compile_seconds']:.1f}s, "
          f"warm {warm['compile_seconds']:.1f}s")
