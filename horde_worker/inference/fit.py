"""Running a model on a card smaller than the model and its job need together.

A plan is chosen from the model's parts and the job's two peaks (the denoiser's activations while sampling,
the VAE's while decoding: they never overlap) against the device's usable memory, cheapest step first:

1. the text encoders wait in RAM and visit the device for each encode (a copy of their weights per visit,
   images unchanged);
2. the VAE decodes (and encodes) in tiles when its full-image peak does not fit (tile seams are blended);
3. the denoiser's large blocks wait in RAM and visit the device one at a time (slow: every step copies the
   whole denoiser; images unchanged). Only when 1 is not enough for sampling.

Visiting modules keep a pinned host copy of their weights (`transfer.PackedWeights`), so each visit is one
copy in and nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loguru import logger

from horde_worker.inference.transfer import PackedWeights

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
DENOISERS = ("unet", "transformer", "prior", "decoder")  # Stable Cascade's stages C and B are the last two


@dataclass(frozen=True)
class FitPlan:
    """Which of the memory-saving steps a model runs with on this device."""

    encoders_visit: bool = False
    tiled_vae: bool = False
    blocks_visit: bool = False

    @property
    def full(self) -> bool:
        return not (self.encoders_visit or self.tiled_vae or self.blocks_visit)

    def describe(self) -> str:
        """For logs and the status line: what the volunteer's card is short of."""
        steps = [text for on, text in ((self.encoders_visit, "text encoders in RAM"),
                                       (self.tiled_vae, "tiled VAE"),
                                       (self.blocks_visit, "denoiser streamed from RAM (slow)")) if on]
        return ", ".join(steps) or "all on the device"


def plan(parts: dict[str, int], denoise_need: int, decode_need: int, capacity: int | None) -> FitPlan:
    """The cheapest plan under which the model's resident parts and the larger of the job's two peaks fit in
    `capacity` bytes (None: no limit known, everything stays)."""
    total = sum(parts.values())
    if capacity is None or total + max(denoise_need, decode_need) <= capacity:
        return FitPlan()
    encoders = sum(size for name, size in parts.items() if name in ENCODERS)
    denoiser = sum(size for name, size in parts.items() if name in DENOISERS)
    resident = total - encoders
    blocks = resident + denoise_need > capacity
    during_decode = resident - (denoiser if blocks else 0)
    return FitPlan(encoders_visit=encoders > 0, tiled_vae=during_decode + decode_need > capacity,
                   blocks_visit=blocks)


def model_parts(pipeline) -> dict[str, int]:
    """Bytes of each module of a pipeline."""
    from horde_worker.inference.vram import tensors_bytes

    return {name: tensors_bytes([module]) for name, module in pipeline.components.items()
            if isinstance(module, torch.nn.Module)}


def large_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's blocks that visit one at a time: a UNet's down/mid/up blocks, a transformer's blocks (a
    level that is only a list of blocks, as in Stable Cascade's UNets, gives its blocks: a list has no forward)."""
    blocks: list[torch.nn.Module] = []
    for name in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks",
                 "noise_refiner", "context_refiner", "layers"):
        for block in getattr(denoiser, name, None) or []:
            blocks += list(block) if isinstance(block, torch.nn.ModuleList) else [block]
    mid = getattr(denoiser, "mid_block", None)
    if mid is not None:
        blocks.insert(len(getattr(denoiser, "down_blocks", None) or []), mid)
    return blocks


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class Visitor:
    """One module that waits in RAM (pinned, where there is a GPU) and comes to the device for each forward.
    Made while the module is in RAM."""

    def __init__(self, module: torch.nn.Module, device: torch.device, pin: bool) -> None:
        self.module, self.device = module, device
        self.weights = PackedWeights([module], pin=pin)
        self.visits = 0

        def arrive(_module, args, kwargs):
            self.weights.to_device(self.device)
            self.visits += 1
            return _to(args, self.device), _to(kwargs, self.device)

        def leave(_module, _args, _kwargs, output):
            self.weights.to_host()
            return output

        self._hooks = [module.register_forward_pre_hook(arrive, with_kwargs=True),
                       module.register_forward_hook(leave, with_kwargs=True, always_call=True)]

    def stop(self) -> None:
        """The module moves with its model again."""
        for hook in self._hooks:
            hook.remove()


class FittedModel:
    """A model's plan on its device and the visitors that carry it out. Plans change only while the model is in
    RAM (`residency.move` leaves the visiting modules there and moves the rest)."""

    def __init__(self) -> None:
        self.plan = FitPlan()
        self.visitors: dict[str, list[Visitor]] = {}

    def visiting(self) -> list[torch.nn.Module]:
        return [v.module for visitors in self.visitors.values() for v in visitors]

    def visits(self) -> int:
        return sum(v.visits for visitors in self.visitors.values() for v in visitors)

    def apply(self, model, new: FitPlan, device: torch.device) -> bool:
        """Switch the model (in RAM) to `new`. True when the plan changed."""
        if new == self.plan:
            return False
        pipe = model.pipeline
        wanted = {name: [getattr(pipe, name)] for name in ENCODERS
                  if new.encoders_visit and isinstance(getattr(pipe, name, None), torch.nn.Module)}
        if new.blocks_visit:
            for name in DENOISERS:
                if isinstance(getattr(pipe, name, None), torch.nn.Module):
                    wanted[name] = large_blocks(getattr(pipe, name))
        for name in list(self.visitors):
            if name not in wanted:
                for visitor in self.visitors.pop(name):
                    visitor.stop()
        for name, modules in wanted.items():
            if name not in self.visitors:
                model.weights.pop(name, None)  # its layout no longer matches: laid out again without the visitors
                self.visitors[name] = [Visitor(module, device, device.type == "cuda") for module in modules]
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_tiling"):
            if new.tiled_vae:
                vae.enable_tiling()
            else:
                vae.disable_tiling()
        if new.full:
            logger.info("{} on {}: all on the device again", model.name, device)
        else:
            logger.warning("{} on {}: {} (the card is smaller than the model and its job)", model.name, device,
                           new.describe())
        self.plan = new
        return True


def heavier(old: FitPlan, new: FitPlan) -> FitPlan:
    """While a model stays on the device its plan only grows, so jobs of alternating sizes do not move it
    back and forth; it starts afresh when the model next arrives."""
    return FitPlan(old.encoders_visit or new.encoders_visit, old.tiled_vae or new.tiled_vae,
                   old.blocks_visit or new.blocks_visit)
