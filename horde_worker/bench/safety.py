"""`python -m horde_worker.bench.safety`: safety-check latency per image, as the worker runs it.

The check runs in its own process (SafetyClient), as in service; the figure is from handing the
images over to having the verdicts back. `--weights` is the CLIP to load (the horde's ViT-L-14.pt
for real figures); without it a tiny CLIP is written, which checks the harness, not the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="CLIP weights (default: a tiny CLIP, harness check only)")
    parser.add_argument("--full-size", action="store_true",
                        help="write a ViT-L/14 (the horde's safety CLIP architecture) with random weights and use it")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:0 as with safety_on_gpu")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--count", type=int, default=10, help="checks per size, after one warm-up")
    args = parser.parse_args(argv)

    import numpy as np

    from horde_worker.supervisor.safety_client import SafetyClient

    work = Path(tempfile.mkdtemp(prefix="horde-safety-bench-"))
    weights = args.weights
    if weights is None and args.full_size:
        weights = write_full_size_clip(work / "ViT-L-14-random.safetensors")
    if weights is None:
        from horde_worker.safety.tiny import write_tiny_clip

        weights = write_tiny_clip(work / "tiny-clip.safetensors", ["landscape"])
    client = SafetyClient(weights, args.device, str(work / "logs"))
    started = time.perf_counter()
    client.start()
    report = {"device": args.device, "weights": weights.name, "start_seconds": round(time.perf_counter() - started, 2),
              "seconds_per_image": {}}
    generator = np.random.default_rng(0)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            image = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
            client.check("warm-up", [image], "a picture")
            times = []
            for index in range(args.count):
                begin = time.perf_counter()
                client.check(f"bench-{index}", [image], "a portrait ### blurry")
                times.append(time.perf_counter() - begin)
            report["seconds_per_image"][f"{size}x{size}"] = round(statistics.median(times), 4)
    finally:
        client.stop()
    print(json.dumps(report, indent=2))
    return 0


def write_full_size_clip(path: Path) -> Path:
    """ViT-L/14 of open_clip with random weights, and its config beside it as the loader expects."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config("ViT-L-14")
    path.with_suffix(".json").write_text(json.dumps(config))
    model = open_clip.create_model("ViT-L-14", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
