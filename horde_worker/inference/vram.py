"""What the inference process puts on its device, counted: model weights (pipelines and the ControlNets built
for them), the post-processing models, and the activations a job of a given size will need.

Weights are counted from the tensors themselves (each storage once, however many modules share it).
Activations are estimated per baseline from the peaks measured on an H100 with full-size weights
(docs/benchmarks.md): SD1.5 peaked 1.1 GiB above its fp16 weights on 512²–640² jobs of up to 2 images,
SDXL 4.6 GiB above them at 1024² (most of it the float32 VAE decode). The figures scale with the latent
pixels and the denoiser's rows; they are deliberately on the high side, since a job that does not fit
costs a retry.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Bytes per latent pixel per denoiser row (a CFG pair is two rows), at half precision.
DENOISE_BYTES_PER_LATENT_PIXEL = {"stable_diffusion_1": 40_000, "stable_diffusion_2": 40_000,
                                  "stable_diffusion_xl": 60_000, "flux_1": 90_000, "z_image_turbo": 90_000,
                                  "qwen_image": 110_000, "stable_cascade": 60_000}
# Bytes per image pixel for the VAE decode of one image (SDXL's decodes in float32).
DECODE_BYTES_PER_PIXEL = {"stable_diffusion_1": 1_500, "stable_diffusion_2": 1_500,
                          "stable_diffusion_xl": 3_200, "flux_1": 3_200, "z_image_turbo": 3_200,
                          "qwen_image": 4_000, "stable_cascade": 2_000}


def tensors_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of every parameter and buffer of `modules`, each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key in seen or tensor.device.type == "meta":
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def modules_of(model) -> list[torch.nn.Module]:
    """A loaded model's pipeline modules."""
    return [c for c in model.pipeline.components.values() if isinstance(c, torch.nn.Module)]


def model_bytes(model) -> int:
    """A loaded model's weights: its pipeline's modules and the ControlNets built for it."""
    return tensors_bytes([*modules_of(model), *model.controlnets.values()])


def job_phases(baseline: str, width: int, height: int, images: int, guidance_pairs: bool = True) -> tuple[int, int]:
    """Estimated peak bytes of a job's activations in its two phases, which never overlap: the denoiser forward
    over its rows, and the VAE decode of one image."""
    latent_pixels = (width // 8) * (height // 8)
    rows = images * (2 if guidance_pairs else 1)
    denoise = DENOISE_BYTES_PER_LATENT_PIXEL.get(baseline, 60_000) * latent_pixels * rows
    decode = DECODE_BYTES_PER_PIXEL.get(baseline, 3_200) * width * height
    return denoise, decode


def job_need(baseline: str, width: int, height: int, images: int, guidance_pairs: bool = True) -> int:
    """Bytes to make free for a job beside its model: both phases' peaks (on the high side on purpose)."""
    return sum(job_phases(baseline, width, height, images, guidance_pairs))


def request_phases(request) -> tuple[int, int]:
    """`job_phases` of a GenerateRequest."""
    return job_phases(request.baseline, request.width, request.height, len(request.seeds))


def request_need(request) -> int:
    """`job_need` of a GenerateRequest."""
    return sum(request_phases(request))


def device_capacity(device: torch.device) -> int | None:
    """Bytes this process can use on a CUDA device: its total less what other processes hold (another worker on
    the same card, the desktop) and a reserve for the CUDA context's growth and fragmentation. None elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    others = max(0, total - free - torch.cuda.memory_reserved(device))
    return max(0, total - others - max(512 * 2**20, total // 25))
