"""fp8 matrix multiplies for Flux's transformer blocks, on GPUs that have them (compute capability 8.9+:
Ada, Hopper and later).

The horde's Flux checkpoints store the transformer in float8 e4m3 already; kept that way, each layer is
normally widened to bf16 to compute. Here the blocks' linear layers multiply in fp8 instead: the weight as
stored (scale 1), the activation scaled per tensor into e4m3's range (its absolute maximum to 448) and cast,
`torch._scaled_mm` accumulating in higher precision and adding the bias in the output precision.

This changes the arithmetic (activations lose bits), so it is a setting (`flux_fp8_matmuls`), and
`output_error` measures what it costs against the widened layers on the same weights.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
# Embedders, final norm and projection stay widened: they are few, and carry the most precision-sensitive
# values (timestep and guidance embeddings, the output itself).
KEEP_WIDE = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def supported(device: torch.device) -> bool:
    """Whether this device multiplies fp8 natively (and this torch can ask it to)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weight stays fp8 and whose product is computed in fp8."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        # Per-tensor scale from the activation's own range, kept on the device (no host sync).
        scale = (rows.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        quantized = (rows.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.compute_dtype)
        return out.reshape(*shape[:-1], self.out_features)


def _eligible(name: str, module: torch.nn.Module) -> bool:
    if not isinstance(module, torch.nn.Linear) or any(name.startswith(prefix) for prefix in KEEP_WIDE):
        return False
    # fp8 GEMMs want both dimensions in multiples of 16.
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def use_fp8_matmuls(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace the transformer blocks' linear layers by `Fp8Linear`; returns how many were replaced."""
    from diffusers.hooks import HookRegistry

    replaced = 0
    for name, module in list(transformer.named_modules()):
        if not _eligible(name, module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        if getattr(module, "_diffusers_hook", None) is not None:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook("layerwise_casting", recurse=False)
        setattr(parent, child, Fp8Linear(module, compute_dtype).to(module.weight.device))
        replaced += 1
    return replaced


def output_error(reference: torch.Tensor, fp8: torch.Tensor) -> float:
    """Relative error (Frobenius norm) of an fp8 output against the widened one."""
    return float((fp8.double() - reference.double()).norm() / reference.double().norm())
