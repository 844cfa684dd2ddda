"""`python -m horde_worker.bench.postprocess`: seconds per post-processor on a 512² and a 1024² image.

Every step runs through the worker's own `PostProcessors` (tiling, face detection, alignment,
parsing, paste-back, rembg). `--full-size` writes each network at its real size with random
weights (the same speed as trained ones): RRDB ESRGAN 64x23 (x4plus, Siax, AnimeSharp, Nomos8kSC,
LSDIRplus), x2plus and anime_6B, RealPLKSR (with and without DySample), DAT-2, SPAN x2, GFPGAN,
RestoreFormer, CodeFormer, the RetinaFace-ResNet50 detector and ParseNet. The detector's heads are
set so that exactly one face is found, so face-fixer figures are for one face. strip_background
runs the small stand-in network (rembg's own U^2-Net weights cannot be made here), so its figure
is rembg's pre/post-processing plus a trivial network, not U^2-Net. Without `--full-size` every
network is tiny: a harness check that runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def write_full_size(home: Path) -> dict[str, str]:
    """Full-size random-weight networks for every post-processor, under `home` as the worker keeps them."""
    import torch
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.PLKSR import RealPLKSR
    from spandrel.architectures.RestoreFormer import RestoreFormer
    from spandrel.architectures.SPAN import SPAN

    from horde_worker.inference.tiny_postprocess import (
        save_weights,
        write_background_remover,
        write_face_helpers,
        write_restorer,
    )

    def save(model: torch.nn.Module, path: Path) -> str:
        return str(save_weights(model, path))

    torch.manual_seed(0)
    esrgan = home / "esrgan"
    rrdb_x4 = save(ESRGAN(num_filters=64, num_blocks=23, scale=4), esrgan / "rrdb-x4.safetensors")
    files = {name: rrdb_x4 for name in ("RealESRGAN_x4plus", "NMKD_Siax", "4x_AnimeSharp", "4xNomos8kSC", "4xLSDIRplus")}
    files["RealESRGAN_x2plus"] = save(ESRGAN(num_filters=64, num_blocks=23, scale=2, shuffle_factor=2),
                                      esrgan / "rrdb-x2.safetensors")
    files["RealESRGAN_x4plus_anime_6B"] = save(ESRGAN(num_filters=64, num_blocks=6, scale=4), esrgan / "anime6b.safetensors")
    files["4xNomosWebPhoto_RealPLKSR"] = save(RealPLKSR(upscaling_factor=4), esrgan / "realplksr.safetensors")
    files["4xNomos2_realplksr_dysample"] = save(RealPLKSR(upscaling_factor=4, dysample=True),
                                                esrgan / "realplksr-dysample.safetensors")
    files["4xNomos2_hq_dat2"] = save(DAT(upscale=4, embed_dim=180, split_size=[8, 32], depth=[6] * 6,
                                         num_heads=[6] * 6, expansion_factor=2.0), esrgan / "dat2.safetensors")
    files["2xModernSpanimationV1"] = save(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=2),
                                          esrgan / "span-x2.safetensors")
    gfpgan = home / "gfpgan"
    write_face_helpers(gfpgan)
    files["GFPGAN"] = str(write_restorer(gfpgan / "GFPGANv1.4.safetensors", "GFPGAN"))
    files["RestoreFormer"] = save(RestoreFormer(), gfpgan / "RestoreFormer.safetensors")
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    files["CodeFormers"] = save(CodeFormer(dim_embd=512, n_head=8, n_layers=9, codebook_size=1024, latent_size=256,
                                           connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"]),
                                home / "codeformer" / "CodeFormers.safetensors")
    files["strip_background"] = str(write_background_remover(home / "rembg" / "u2net.onnx"))
    return files


def write_tiny(home: Path) -> dict[str, str]:
    from horde_worker.inference.tiny_postprocess import write_all
    from horde_worker.models.postprocessors import plan_postprocessors

    write_all(home)
    setup, _ = plan_postprocessors(home)
    return {name: str(path) for name, path in setup.files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="real network sizes (for a GPU)")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--count", type=int, default=3, help="timed runs per size, after one warm-up")
    parser.add_argument("--only", default="", help="comma-separated post-processor names (default: all)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from horde_worker.inference.postprocess import PostProcessors

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    home = Path(tempfile.mkdtemp(prefix="horde-postprocess-bench-"))
    files = write_full_size(home) if args.full_size else write_tiny(home)
    names = [n for n in args.only.split(",") if n] or list(files)
    processors = PostProcessors(device, dtype)
    generator = np.random.default_rng(0)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                    "full_size": args.full_size, "dtype": str(dtype), "seconds": {}}
    for name in names:
        report["seconds"][name] = {}
        for size in (int(s) for s in args.sizes.split(",")):
            image = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
            steps = [(name, files[name])]
            processors.apply(image, steps, 1.0, str(home / "gfpgan"))  # warm-up: load, first kernels
            times = []
            for _ in range(args.count):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                begin = time.perf_counter()
                processors.apply(image, steps, 1.0, str(home / "gfpgan"))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - begin)
            report["seconds"][name][f"{size}x{size}"] = round(statistics.median(times), 3)
        if device.type == "cuda":
            report.setdefault("peak_vram_gib", {})[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        print(json.dumps({name: report["seconds"][name]}), flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
