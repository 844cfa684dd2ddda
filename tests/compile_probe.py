"""One inference engine with compiled denoisers, in a process of its own (inductor's cache folder is read once
per process): `python -m tests.compile_probe CACHE_HOME OUT_JSON`.

Job A runs while its shape compiles beside it; job B of the same bucket then runs compiled; both are
compared with the same jobs run eagerly. Writes the compile figures and counters as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(cache_home: Path, out: Path) -> None:
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from horde_worker.inference.cancellation import Cancellations
    from horde_worker.inference.engine import Engine
    from horde_worker.inference.messages import GenerateResult, SlotSpec
    from horde_worker.inference.runner import ModelRunner
    from horde_worker.inference.tiny import write_tiny_checkpoint
    from tests.conftest import job_request

    torch.set_num_threads(2)
    checkpoint = cache_home / "m.safetensors"
    if not checkpoint.exists():
        write_tiny_checkpoint(checkpoint, "stable_diffusion_1")
    runner = ModelRunner(SlotSpec(slot=0, device="cpu", log_dir=str(cache_home / "logs"), compile_denoisers="on",
                                  cache_home=str(cache_home)))
    sent: list[object] = []
    cancels = Cancellations()
    engine = Engine(runner, sent.append, cancels.reason, cancels.forget, max_jobs=4)

    def request(job_id: str, seed: int, prompt: str):
        return job_request(job_id=job_id, model_name="m", model_path=str(checkpoint), width=64, height=64, steps=3,
                           sampler_name="k_euler", prompt=prompt, seeds=[seed])

    def run(job_id: str, seed: int, prompt: str) -> GenerateResult:
        cancels.admit(job_id)
        engine.submit(request(job_id, seed, prompt))
        while job_id not in {getattr(m, "job_id", None) for m in sent if isinstance(m, GenerateResult)}:
            engine.iterate()
        return next(m for m in sent if isinstance(m, GenerateResult) and m.job_id == job_id)

    start = time.perf_counter()
    first = run("a", 1, "a cat")
    first_job_seconds = time.perf_counter() - start
    denoiser = engine.batches["m"].denoiser
    denoiser.wait()
    compile_seconds = sum(denoiser.compile_seconds.values())
    graphs_before = counters["stats"]["unique_graphs"]
    calls_before = denoiser.compiled_calls
    start = time.perf_counter()
    second = run("b", 2, "a dog")
    second_job_seconds = time.perf_counter() - start
    eager = {name: runner.generate(request(name, seed, prompt), lambda _m: None).images[0]
             for name, seed, prompt in (("a", 1, "a cat"), ("b", 2, "a dog"))}
    difference = {name: int(np.abs(result.images[0].astype(int) - eager[name].astype(int)).max())
                  for name, result in (("a", first), ("b", second))}
    out.write_text(json.dumps({
        "compile_seconds": compile_seconds,
        "first_job_seconds": first_job_seconds,
        "second_job_seconds": second_job_seconds,
        "graphs_compiled_for_second_job": counters["stats"]["unique_graphs"] - graphs_before,
        "compiled_calls_of_second_job": denoiser.compiled_calls - calls_before,
        "buckets_ready": len(denoiser.ready),
        "failed": list(denoiser.failed.values()),
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "max_pixel_difference_from_eager": difference,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
