"""Linear layers stored as "scaled fp8", the form ComfyUI's text-encoder files use (e.g. Qwen-Image's
`qwen_2.5_vl_7b_fp8_scaled.safetensors`).

Such a file holds each large linear weight in float8 e4m3 beside a per-tensor `<layer>.scale_weight`: the
real weight is the fp8 value times the scale. The layers keep the fp8 weight as stored (half the memory of
bf16, and what moves between RAM and the GPU) and widen it, scaled, only while they compute.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = ".scale_weight"
# Keys of the file that are not weights: a marker saying the file is scaled, and input scales that only an fp8
# matrix multiply would use (these layers widen instead).
MARKERS = ("scaled_fp8",)
INPUT_SCALE_SUFFIX = ".scale_input"
E4M3_MAX = 448.0


class ScaledFp8Linear(torch.nn.Module):
    """A linear layer whose weight stays as the file's fp8 tensor, widened and scaled per forward."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, scale: float,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        # A Python float: moving or recasting the module never rounds it, and using it needs no device sync.
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.scale
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:.3g}"


def split_scales(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(weights without the scale entries, layer name -> its weight scale)."""
    scales = {key[: -len(SCALE_SUFFIX)]: float(value.float().reshape(-1)[0]) for key, value in tensors.items()
              if key.endswith(SCALE_SUFFIX)}
    weights = {key: value for key, value in tensors.items()
               if not key.endswith((SCALE_SUFFIX, INPUT_SCALE_SUFFIX)) and key not in MARKERS}
    return weights, scales


def install(model: torch.nn.Module, weights: dict[str, torch.Tensor], scales: dict[str, float],
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Put a `ScaledFp8Linear` in place of each linear layer of `model` that `scales` names, holding the file's
    fp8 weight (its bias in `dtype`); returns the remaining weights, which load as usual."""
    remaining = dict(weights)
    for name, scale in scales.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"{name} has a weight scale but is a {type(layer).__name__}, not a linear layer")
        weight = remaining.pop(f"{name}.weight")
        bias = remaining.pop(f"{name}.bias", None)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ScaledFp8Linear(layer.in_features, layer.out_features, weight, scale,
                                               None if bias is None else bias.to(dtype)))
    return remaining


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale) of a weight, the way a scaled file stores it: its absolute maximum at fp8's."""
    scale = (weight.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())
