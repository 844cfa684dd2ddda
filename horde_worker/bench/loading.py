"""`python -m horde_worker.bench.loading [--full-size]`: peak RAM and seconds of reading a checkpoint into half
precision, the worker's way (built straight in fp16) against building in float32 and converting, each in a
fresh process (peak resident memory is a high-water mark).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load_once(path: Path, way: str) -> dict[str, float]:
    """In this process: read `path` one way; the peak resident memory it added and the seconds it took."""
    import torch

    from horde_worker.inference import pipelines

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if way == "direct":
        pipe = pipelines.load_pipeline(path, torch.device("cpu"), torch.float16).pipeline
    else:  # the float32 detour: every module built in float32, then converted
        pipe, _baseline, _fp8 = pipelines._load_single_file(path, False, torch.float32)
        pipe.to(dtype=torch.float16)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Weights the loader left unread (mapped from the file) count once they are read: read each once.
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.state_dict().values():
                    tensor.float().sum()
    read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_added_gib": (peak - before) / 2**30, "peak_added_after_reading_every_weight_gib":
            (read - before) / 2**30, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horde_worker.bench.loading", description=__doc__)
    parser.add_argument("--full-size", action="store_true", help="SD1.5's full architecture (a 2 GB fp16 file)")
    parser.add_argument("--cache", type=Path, help="where the checkpoint is kept (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    folder = args.cache or Path(tempfile.mkdtemp(prefix="horde-loading-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("sd15-full.safetensors" if args.full_size else "sd15-tiny.safetensors")
    if not path.exists():
        if args.full_size:
            from horde_worker.bench.fullsize import write_full_sd15_checkpoint

            write_full_sd15_checkpoint(path)
        else:
            from horde_worker.inference.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(path, "stable_diffusion_1")
    results: dict[str, object] = {"checkpoint_gib": path.stat().st_size / 2**30}
    for way in ("direct", "float32-detour"):
        # Imports first, so that only the load itself shows in the peak.
        code = ("import sys, json; import torch, diffusers, transformers; from horde_worker.bench.loading import "
                "load_once; from pathlib import Path; print(json.dumps(load_once(Path(sys.argv[1]), sys.argv[2])))")
        out = subprocess.run([sys.executable, "-c", code, str(path), way], capture_output=True, text=True,
                             check=True, timeout=1800)
        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    from horde_worker.bench.report import emit

    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
