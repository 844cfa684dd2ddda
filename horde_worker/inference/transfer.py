"""A model's weights moved between RAM and the GPU in one copy each way.

Module-by-module `.to(device)` copies thousands of small tensors from pageable memory: SDXL took 3.9 s to
reach an H100 that way. Here every weight of a model is laid out once in a few large host chunks (pinned
when the device is a GPU), the device holds one flat buffer, and a move is one copy per chunk with each
parameter re-pointed at its slice. Weights do not change while a model runs, so while the host copy is
kept, leaving the device costs nothing: the parameters point back at the host slices and the device buffer
is freed.

Tensors that appear after the layout (a LoRA's layers, a textual inversion's resized embeddings, a VAE
cast to another precision) are moved one by one, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; every slice starts aligned for any dtype's view
CHUNK = 256 * 2**20  # host chunks are allocated as the tensors move in, so a load never holds two copies


@dataclass
class _Slot:
    chunk: int
    offset: int  # in its chunk
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _modules(root: torch.nn.Module, exclude: frozenset[int]) -> Iterator[torch.nn.Module]:
    if id(root) in exclude:
        return
    yield root
    for child in root.children():
        yield from _modules(child, exclude)


def _tensors(modules: Iterable[torch.nn.Module], exclude: frozenset[int] = frozenset()
             ) -> Iterator[tuple[torch.nn.Module, str, bool, torch.Tensor]]:
    """(owner module, name, is parameter, tensor) for every parameter and buffer, shared ones repeated; the
    subtrees of the modules whose id() is in `exclude` left out."""
    seen: set[int] = set()
    for root in modules:
        for module in _modules(root, exclude):
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, param in module._parameters.items():
                if param is not None:
                    yield module, name, True, param
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    yield module, name, False, buffer


def _key(tensor: torch.Tensor) -> tuple[int, torch.dtype, torch.Size]:
    # Parameters hand out a new `.data` object on every access, so a tensor is known by where it points.
    return tensor.data_ptr(), tensor.dtype, tensor.shape


def _point(module: torch.nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
    if is_param:
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


def _view(storage: torch.Tensor, offset: int, slot: _Slot) -> torch.Tensor:
    return storage[offset:offset + slot.nbytes].view(slot.dtype).view(slot.shape)


class PackedWeights:
    """The layout of one model's weights, and its moves (on the device while `device_buffer` is set)."""

    def __init__(self, modules: list[torch.nn.Module], pin: bool,
                 exclude: list[torch.nn.Module] = ()) -> None:
        self.modules = modules
        # Submodules laid out elsewhere (blocks visiting the device on their own, see inference/fit.py).
        self.exclude = frozenset(id(m) for m in exclude)
        self.pin = pin
        self.chunks: list[torch.Tensor] = []
        self.chunk_starts: list[int] = []  # each chunk's offset in the device buffer
        self.slots: dict[tuple, _Slot] = {}  # by `_key` of the tensor the modules hold now
        self.device_buffer: torch.Tensor | None = None
        self._host_released = False
        self._pack()

    @property
    def nbytes(self) -> int:
        return sum(chunk.numel() for chunk in self.chunks)

    def _pack(self) -> None:
        """Copy every weight (on the CPU) into the host chunks and point the modules at the copies. The chunks
        are planned first (each exactly as large as its tensors), then allocated one at a time as they fill, so
        a tensor's old storage is freed before the next chunk is taken."""
        entries = list(_tensors(self.modules, self.exclude))
        if any(tensor.device.type != "cpu" for *_, tensor in entries):
            raise ValueError("weights are laid out from RAM: move the model to the CPU first")
        plan: dict[tuple, _Slot] = {}
        sizes: list[int] = []
        # Known before any re-pointing: a shared Parameter already points at its copy when met again.
        keys = [_key(tensor) for *_, tensor in entries]
        for (*_, tensor), key in zip(entries, keys, strict=True):
            if key in plan:
                continue  # shared by several modules: laid out once
            size = _aligned(max(tensor.numel() * tensor.element_size(), 1))
            if not sizes or sizes[-1] + size > max(CHUNK, size):
                sizes.append(0)
            plan[key] = _Slot(len(sizes) - 1, sizes[-1], tensor.numel() * tensor.element_size(), tensor.dtype,
                              tensor.shape)
            sizes[-1] += size
        self.chunk_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._flat_size = sum(sizes)
        copies: dict[tuple, torch.Tensor] = {}
        for index, entry in enumerate(entries):
            entries[index] = None  # the old storage goes as soon as its last module points at the copy
            module, name, is_param, tensor = entry
            key = keys[index]
            copy = copies.get(key)
            if copy is None:
                slot = plan[key]
                if slot.chunk == len(self.chunks):
                    self.chunks.append(torch.empty(sizes[slot.chunk], dtype=torch.uint8, pin_memory=self.pin))
                copy = copies[key] = _view(self.chunks[slot.chunk], slot.offset, slot)
                copy.copy_(tensor)
                self.slots[_key(copy)] = slot
            _point(module, name, is_param, copy)
            del entry, tensor

    def _repoint(self, place) -> None:
        """Point every laid-out tensor at `place(slot)`."""
        moved: dict[tuple, torch.Tensor] = {}
        slots: dict[tuple, _Slot] = {}
        for module, name, is_param, tensor in list(_tensors(self.modules, self.exclude)):
            key = _key(tensor)
            slot = self.slots.get(key)
            if slot is None:
                continue
            target = moved.get(key)
            if target is None:
                target = moved[key] = place(slot)
                slots[_key(target)] = slot
            _point(module, name, is_param, target)
        self.slots = slots

    def _strays(self) -> list[tuple[torch.nn.Module, str, bool, torch.Tensor]]:
        """Tensors not in the layout (added or replaced since)."""
        return [entry for entry in _tensors(self.modules, self.exclude) if _key(entry[3]) not in self.slots]

    def to_device(self, device: torch.device) -> float:
        """Copy the weights to `device` (one copy per host chunk) and point the modules there; the host chunks
        stay for the way back. Returns the seconds it took."""
        start = time.perf_counter()
        buffer = torch.empty(self._flat_size, dtype=torch.uint8, device=device)
        for chunk, begin in zip(self.chunks, self.chunk_starts, strict=True):
            buffer[begin:begin + chunk.numel()].copy_(chunk, non_blocking=self.pin)
        self._repoint(lambda slot: _view(buffer, self.chunk_starts[slot.chunk] + slot.offset, slot))
        for module, name, is_param, tensor in self._strays():
            _point(module, name, is_param, tensor.to(device))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        self.device_buffer = buffer
        return time.perf_counter() - start

    @property
    def has_host_copy(self) -> bool:
        return not self._host_released

    def release_host_copy(self) -> int:
        """Free the host chunks while the weights are on the device (RAM is short, or models leaving the GPU are
        read from disk again); the layout is then of no further use. Returns the bytes freed."""
        if self.device_buffer is None:
            return 0
        freed = self.nbytes
        self.chunks, self.slots, self._host_released = [], {}, True
        return freed

    def to_host(self) -> float:
        """Point the modules back at the host copies (weights do not change on the device, so nothing is copied
        but the tensors added since) and free the device buffer. Returns the seconds it took."""
        start = time.perf_counter()
        self._repoint(lambda slot: _view(self.chunks[slot.chunk], slot.offset, slot))
        for module, name, is_param, tensor in self._strays():
            _point(module, name, is_param, tensor.to("cpu"))
        self.device_buffer = None
        return time.perf_counter() - start


def pinning_available() -> bool:
    """Page-locked host memory needs a CUDA device."""
    return torch.cuda.is_available()
