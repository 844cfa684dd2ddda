"""Which models stay where: on the device, in RAM, or only on disk.

Models move disk -> RAM -> device and back by least-recent use. The device holds as many as
its budget allows (at least the one in use); models pushed off the device wait in RAM while the
RAM budget allows, and are dropped otherwise. Dropping frees the memory back to the system, so
a long run with many switches keeps a flat footprint.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
from loguru import logger

from horde_worker.inference.pipelines import LoadedModel, load_pipeline


def pipeline_bytes(model: LoadedModel) -> int:
    """Bytes of the model's weights and buffers: its pipeline's modules and the ControlNets built for it."""
    from horde_worker.inference.vram import model_bytes

    return model_bytes(model)


def modules_of(model: LoadedModel) -> list[torch.nn.Module]:
    return [c for c in model.pipeline.components.values() if isinstance(c, torch.nn.Module)]


def move(model: LoadedModel, device: torch.device | str) -> float:
    """Move every module of the pipeline; returns the seconds it took. To and from a GPU the weights travel as
    one layout (`transfer.PackedWeights`, pinned host chunks kept for the way back, so leaving the GPU copies
    nothing); otherwise module by module (the pipeline-level move warns about fp16 on a CPU, which is only
    where the weights wait, never where they run)."""
    from horde_worker.inference.transfer import PackedWeights

    start = time.perf_counter()
    device = torch.device(device)
    model.controlnets.clear()  # built again from the UNet where it is needed next
    packed = model.weights
    if device.type == "cuda":
        if packed is None or not packed.has_host_copy:
            for module in modules_of(model):
                module.to("cpu")
            packed = model.weights = PackedWeights(modules_of(model), pin=True)
        packed.to_device(device)
    elif packed is not None and packed.where.type == "cuda" and packed.has_host_copy:
        packed.to_host()
    else:
        model.weights = None
        for module in modules_of(model):
            module.to(device)
    return time.perf_counter() - start


def release_memory(device: torch.device) -> None:
    """Give freed memory back: Python objects, glibc's heap, and the CUDA cache."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # freed page-locked chunks go back to the system too


def device_victim(on_device: list[str], keep: set[str], over_budget: bool, keep_unused: bool) -> str | None:
    """The model to take off the device next (least recently used first; never one in use or kept), or None.
    With `keep_unused`, models leave only while the device is over its budget; without, every model not in use
    leaves."""
    if keep_unused and not over_budget:
        return None
    return next((name for name in on_device if name not in keep), None)


class Residency:
    """Model placement for one inference process.

    One lock guards every table (on_device, in_ram, sizes, pending loads, pins); disk reads run outside
    it. Each model has at most one read in flight, registered as a Future under the lock: whoever else
    wants that model (an acquire, a second preload) waits for it and uses its result. A model being
    acquired or in use (`using`) is pinned, and eviction never picks a pinned model.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, ram_budget: int | None, device_budget: int | None,
                 fp8_matmuls: bool = False, keep_on_device: bool = True, keep_in_ram: bool = True):
        self.device = device
        # The volunteer's memory settings (see `BridgeData.memory_tier`): models not in use stay on the device / in RAM.
        self.keep_on_device, self.keep_in_ram = keep_on_device, keep_in_ram
        self.fp8_matmuls = fp8_matmuls  # Flux's fp8 blocks multiply in fp8 where the device can (inference/fp8.py)
        self.dtype = dtype
        self.ram_budget = ram_budget
        self.device_budget = device_budget
        self.on_device: OrderedDict[str, LoadedModel] = OrderedDict()
        self.in_ram: OrderedDict[str, LoadedModel] = OrderedDict()
        self.sizes: dict[str, int] = {}
        # Other things on the device (post-processing models, ...): name -> (bytes, how to free them).
        self.extras: dict[str, tuple[int, Callable[[], bool]]] = {}
        self._lock = threading.RLock()
        self._loading: dict[str, Future] = {}
        self._pinned: Counter[str] = Counter()

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def names(self) -> list[str]:
        with self._lock:
            return list(self.on_device) + [n for n in self.in_ram if n not in self.on_device]

    def ram_bytes(self) -> int:
        """Bytes of models held in RAM (on a CPU device, that includes the ones in use)."""
        with self._lock:
            held = list(self.in_ram) + (list(self.on_device) if self.on_cpu else [])
            copies = 0 if self.on_cpu else sum(m.weights.nbytes for m in self.on_device.values()
                                                 if m.weights is not None and m.weights.has_host_copy)
            return sum(self.sizes.get(n, 0) for n in held) + copies

    def _place_on_device(self, name: str, model: LoadedModel) -> None:
        """Move a model from RAM to the device, log what the switch cost, and keep its host copy (for a free way
        back) only where RAM is kept for models and the budget allows it."""
        seconds = move(model, self.device)
        size = self.sizes.get(name, 0)
        logger.info("{} moved to {} in {:.2f} s ({:.1f} GB/s)", name, self.device, seconds,
                    size / max(seconds, 1e-6) / 1e9)
        self.on_device[name] = model
        packed = model.weights
        if packed is not None and packed.has_host_copy:
            over = self.ram_budget is not None and self.ram_bytes() > self.ram_budget
            if not self.keep_in_ram or over:
                packed.release_host_copy()
                release_memory(self.device)

    # --- loading -----------------------------------------------------------------------------

    def _read(self, name: str, path: str, v_prediction: bool) -> LoadedModel:
        target = self.device if self.on_cpu else torch.device("cpu")
        model = load_pipeline(Path(path), target, self.dtype, name=name, v_prediction=v_prediction)
        if not self.on_cpu:
            from horde_worker.inference.pipelines import run_vae_in, vae_dtype

            # Read into RAM for a GPU: the VAE takes the precision it will run in there.
            run_vae_in(model.pipeline.vae, vae_dtype(self.device, model.pipeline.vae.dtype))
        if self.fp8_matmuls and "transformer" in getattr(model.pipeline, "fp8_parts", ()):
            from horde_worker.inference import fp8

            if fp8.supported(self.device):
                # Flux computes in bf16 on a GPU (pipelines.load_pipeline).
                count = fp8.use_fp8_matmuls(model.pipeline.transformer, torch.bfloat16)
                logger.info("{}: {} transformer layers multiply in fp8", name, count)
        return model

    def _load(self, name: str, path: str, v_prediction: bool) -> bool:
        """Make sure the model is in RAM or on the device: read it, or wait for the read already under way.
        True when this call read it from disk."""
        with self._lock:
            if name in self.on_device or name in self.in_ram:
                return False
            future = self._loading.get(name)
            reader = future is None
            if reader:
                future = self._loading[name] = Future()
        if not reader:
            future.result()  # that read's error is this caller's too
            return False
        try:
            model = self._read(name, path, v_prediction)
            size = pipeline_bytes(model)
            with self._lock:
                self.sizes[name] = size
                self._fit_ram(size, keep={name})
                self.in_ram[name] = model
                # In the same locked step as the insert: the model is never "neither loading nor held".
                del self._loading[name]
        except BaseException as exc:
            with self._lock:
                self._loading.pop(name, None)
            future.set_exception(exc)
            raise
        future.set_result(None)
        return True

    def preload(self, name: str, path: str, v_prediction: bool = False) -> float:
        """Read a model into RAM (on a CPU device: where it runs), or wait for the read of it under way.
        Returns the seconds it took."""
        start = time.perf_counter()
        if not self._load(name, path, v_prediction):
            return 0.0
        return time.perf_counter() - start

    def acquire(self, name: str, path: str, v_prediction: bool = False,
                need: int = 0) -> tuple[LoadedModel, str, float]:
        """The model on the device, ready to run: (model, where it came from, seconds spent), with `need` more
        bytes (the job's activations) made free beside it where the budget allows. It is pinned while this runs;
        `using` keeps it pinned for as long as the job needs it."""
        start = time.perf_counter()
        source = None
        with self._lock:
            self._pinned[name] += 1
        try:
            while True:
                with self._lock:
                    if name in self.on_device:
                        self.on_device.move_to_end(name)
                        self.sizes[name] = pipeline_bytes(self.on_device[name])  # ControlNets may have joined it
                        if need and not self.on_cpu:
                            self.make_room(need, keep={name})
                        return self.on_device[name], source or "resident", time.perf_counter() - start
                    if name in self.in_ram:
                        model = self.in_ram.pop(name)
                        self._fit_device(self.sizes[name] + (0 if self.on_cpu else need), keep={name})
                        if self.on_cpu:
                            self.on_device[name] = model
                        else:
                            self._place_on_device(name, model)
                        return model, source or "ram", time.perf_counter() - start
                # Pinned from here on: once loaded, nothing can evict it before the next pass takes it.
                if self._load(name, path, v_prediction):
                    source = "disk"
        finally:
            self._unpin(name)

    @contextlib.contextmanager
    def using(self, name: str, path: str, v_prediction: bool = False,
              need: int = 0) -> Iterator[tuple[LoadedModel, str, float]]:
        """`acquire` for the duration of the block: the model cannot be evicted (by a preload, say) while it runs."""
        with self._lock:
            self._pinned[name] += 1
        try:
            yield self.acquire(name, path, v_prediction, need)
        finally:
            self._unpin(name)

    def _unpin(self, name: str) -> None:
        with self._lock:
            self._pinned[name] -= 1
            if self._pinned[name] <= 0:
                del self._pinned[name]

    # --- budgets -------------------------------------------------------------------------------

    def account_extra(self, name: str, size: int, release: Callable[[], bool]) -> None:
        """Count something else this process keeps on the device; `release()` frees it when room is needed
        (False: it is in use right now and stays)."""
        with self._lock:
            if size > 0:
                self.extras[name] = (size, release)
            else:
                self.extras.pop(name, None)

    def make_room(self, need: int, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Free `need` bytes on the device beside what is counted: extras first, then models not in use."""
        with self._lock:
            self._fit_device(need, keep=set(keep))

    def device_bytes(self) -> int:
        """What is counted on the device: resident models and the extras."""
        with self._lock:
            return sum(self.sizes.get(n, 0) for n in self.on_device) + sum(s for s, _ in self.extras.values())

    def _release_extras(self, short: int) -> int:
        """Free extras until `short` bytes are freed (or none is left that can go); returns the bytes freed."""
        freed = 0
        for name, (size, release) in list(self.extras.items()):
            if freed >= short:
                break
            if release():
                del self.extras[name]
                freed += size
                logger.debug("{} freed from the device ({} MB)", name, size // 2**20)
        return freed

    def _fit_device(self, incoming: int, keep: set[str]) -> None:
        """Make room on the device: least recently used models move to RAM (or are dropped)."""
        budget = self.device_budget
        limit_models = self.on_cpu  # on a CPU, "device" and RAM are the same memory
        if budget is not None and self.extras:
            # Post-processing models and other extras go first: they are small and quick to bring back.
            short = self.device_bytes() + incoming - budget
            if short > 0:
                self._release_extras(short)
        while self.on_device:
            used = self.device_bytes()
            if limit_models:
                over = self.ram_budget is not None and self.ram_bytes() + incoming > self.ram_budget
            else:
                over = budget is not None and used + incoming > budget
            victim = device_victim(list(self.on_device), keep | set(self._pinned), over,
                                   self.keep_on_device or limit_models)
            if victim is None:
                return
            model = self.on_device.pop(victim)
            if self.on_cpu:
                self._drop(victim, model)
                continue
            fits_ram = self.ram_budget is None or self.ram_bytes() + self.sizes[victim] <= self.ram_budget
            if self.keep_in_ram and fits_ram:
                seconds = move(model, "cpu")
                self.in_ram[victim] = model
                logger.debug("{} moved from the device to RAM in {:.2f} s", victim, seconds)
                release_memory(self.device)
            else:
                self._drop(victim, model)  # straight from the device: copying it to RAM first would be wasted

    def _fit_ram(self, incoming: int, keep: set[str]) -> None:
        """Make room in RAM for `incoming` bytes by dropping the least recently used cached models."""
        if self.ram_budget is None:
            return
        while self.in_ram and self.ram_bytes() + incoming > self.ram_budget:
            victim = next((n for n in self.in_ram if n not in keep and n not in self._pinned), None)
            if victim is None:
                return
            self._drop(victim, self.in_ram.pop(victim))
        for model in [] if self.on_cpu else list(self.on_device.values()):
            # Still short: the host copies kept beside the models on the device go (they leave it by disk then).
            if self.ram_bytes() + incoming <= self.ram_budget:
                break
            if model.weights is not None and model.weights.release_host_copy():
                release_memory(self.device)
        if self.on_cpu:
            # The models in use live in RAM too: keep at most what fits beside the incoming one.
            self._fit_device(incoming, keep=keep)

    def _drop(self, name: str, model: LoadedModel) -> None:
        logger.debug("{} dropped from memory", name)
        self.sizes.pop(name, None)
        del model
        release_memory(self.device)
