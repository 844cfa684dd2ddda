"""Small random LoRAs and textual inversions in the layouts CivitAI files use.

LoRAs are written in kohya's layout (`lora_unet_<module>` / `lora_te_text_model_<module>` with
`lora_down`, `lora_up` and `alpha`), which is what most CivitAI LoRAs are; Flux LoRAs in the
peft layout (`transformer.<module>.lora_A/B`). TIs as SD1 `emb_params` or SDXL `clip_l`/`clip_g`.
They fit the tiny models of `tiny.py` and load through the same code as real files.
"""

from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linears(module, targets: tuple[str, ...]):
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear) and name.endswith(targets):
            yield name, child


def _kohya_pair(prefix: str, layer, rank: int, scale: float, generator) -> dict:
    import torch

    down = torch.randn(rank, layer.in_features, generator=generator) * scale
    up = torch.randn(layer.out_features, rank, generator=generator) * scale
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
            f"{prefix}.alpha": torch.tensor(float(rank))}


def write_tiny_lora(path: Path, unet, text_encoders=(), rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """A kohya-layout LoRA for `unet` (and text encoders: te, then te2 for SDXL's second)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in _linears(unet, UNET_TARGETS):
        tensors.update(_kohya_pair("lora_unet_" + name.replace(".", "_"), layer, rank, scale, generator))
    for index, encoder in enumerate(text_encoders):
        prefix = "lora_te" if len(text_encoders) == 1 else f"lora_te{index + 1}"
        for name, layer in _linears(encoder, TEXT_TARGETS):
            module = name if name.startswith("text_model.") else "text_model." + name
            tensors.update(_kohya_pair(f"{prefix}_" + module.replace(".", "_"), layer, rank, scale, generator))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_tiny_flux_lora(path: Path, transformer, rank: int = 4, seed: int = 0, scale: float = 0.5) -> Path:
    """A peft-layout Flux LoRA (`transformer.<module>.lora_A/B.weight`)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in _linears(transformer, ("to_q", "to_k", "to_v")):
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * scale
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * scale
    save_file(tensors, str(path))
    return Path(path)


def write_tiny_ti(path: Path, widths: dict[str, int] | int, vectors: int = 2, seed: int = 0) -> Path:
    """A textual inversion: `widths` an int (SD1/SD2 `emb_params`) or {"clip_l": 64, "clip_g": 64} (SDXL)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    if isinstance(widths, int):
        tensors = {"emb_params": torch.randn(vectors, widths, generator=generator)}
    else:
        tensors = {key: torch.randn(vectors, width, generator=generator) for key, width in widths.items()}
    save_file(tensors, str(path))
    return Path(path)


# Local mode's CivitAI entries: model id -> (name, CivitAI type, CivitAI baseModel, file name, trained words).
LOCAL_ADAPTERS = {
    1: ("horde-worker-tiny-lora-sd15", "LORA", "SD 1.5", "tiny-lora-sd15.safetensors", ["tinytrigger"]),
    2: ("horde-worker-tiny-lora-sdxl", "LORA", "SDXL 1.0", "tiny-lora-sdxl.safetensors", []),
    3: ("horde-worker-tiny-lora-flux", "LORA", "Flux.1 S", "tiny-lora-flux.safetensors", []),
    4: ("horde-worker-tiny-ti-sd15", "TextualInversion", "SD 1.5", "tiny-ti-sd15.safetensors", []),
    5: ("horde-worker-tiny-ti-sdxl", "TextualInversion", "SDXL 1.0", "tiny-ti-sdxl.safetensors", []),
}


def write_local_adapters(folder: Path) -> None:
    """The files of `LOCAL_ADAPTERS`, fitting the tiny models of local mode."""
    from horde_worker.inference.tiny import tiny_flux_components, tiny_sd15_components, tiny_sdxl_components

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet, _vae, text_encoder = tiny_sd15_components()
    write_tiny_lora(folder / LOCAL_ADAPTERS[1][3], unet, [text_encoder], seed=1)
    xl_unet, _xl_vae, xl_te, xl_te2 = tiny_sdxl_components()
    write_tiny_lora(folder / LOCAL_ADAPTERS[2][3], xl_unet, [xl_te, xl_te2], seed=2)
    write_tiny_flux_lora(folder / LOCAL_ADAPTERS[3][3], tiny_flux_components()[0], seed=3)
    write_tiny_ti(folder / LOCAL_ADAPTERS[4][3], 64, seed=4)
    write_tiny_ti(folder / LOCAL_ADAPTERS[5][3], {"clip_l": 64, "clip_g": 64}, seed=5)
