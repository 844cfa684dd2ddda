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


def move(model: LoadedModel, device: torch.device | str, pack: bool | None = None) -> float:
    """Move the pipeline's modules (all but those visiting the device on their own, see inference/fit.py);
    returns the seconds it took. To and from a GPU each component travels as one layout
    (`transfer.PackedWeights`, pinned host chunks kept for the way back, so leaving the GPU copies nothing);
    otherwise module by module (the pipeline-level move warns about fp16 on a CPU, which is only where the
    weights wait, never where they run). `pack` forces the layout on or off (default: for a GPU)."""
    from horde_worker.inference.transfer import PackedWeights, pinning_available

    start = time.perf_counter()
    device = torch.device(device)
    model.controlnets.clear()  # built again from the UNet where it is needed next
    visiting = model.fit.visiting()
    visiting_ids = {id(m) for m in visiting}
    for name, module in model.pipeline.components.items():
        if not isinstance(module, torch.nn.Module) or id(module) in visiting_ids:
            continue
        packed = model.weights.get(name)
        if device.type == "cuda" if pack is None else pack:
            if packed is None or not packed.has_host_copy:
                _to_except(module, "cpu", visiting_ids)
                packed = model.weights[name] = PackedWeights([module], pin=pinning_available(), exclude=visiting)
            packed.to_device(device)
        elif packed is not None and packed.device_buffer is not None and packed.has_host_copy:
            packed.to_host()
        else:
            model.weights.pop(name, None)
            _to_except(module, device, visiting_ids)
    return time.perf_counter() - start


def _to_except(module: torch.nn.Module, device: torch.device | str, skip: set[int]) -> None:
    """`module.to(device)`, leaving the submodules in `skip` where they are."""
    if id(module) in skip:
        return
    if not any(id(m) in skip for m in module.modules()):
        module.to(device)
        return
    for tensor_owner in (module._parameters, module._buffers):
        for key, tensor in tensor_owner.items():
            if tensor is not None:
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.to(device)
                else:
                    tensor_owner[key] = tensor.to(device)
    for child in module.children():
        _to_except(child, device, skip)


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
        # Usable device bytes where they cannot be measured (tests of the fitting on a CPU); None: measured.
        self.capacity_override: int | None = None
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
            copies = 0 if self.on_cpu else sum(packed.nbytes for m in self.on_device.values()
                                                 for packed in m.weights.values() if packed.has_host_copy)
            return sum(self.sizes.get(n, 0) for n in held) + copies

    # --- fitting a card smaller than the model and its job -----------------------------------------

    def capacity(self, name: str) -> int | None:
        """Device bytes the model `name` and its job can have: what this process can use, less the models
        other jobs are using right now (anything else can be evicted)."""
        from horde_worker.inference.vram import device_capacity

        usable = self.capacity_override if self.capacity_override is not None else device_capacity(self.device)
        if usable is None:
            return None
        busy = sum(self.sizes.get(n, 0) for n in self.on_device if n != name and n in self._pinned)
        return max(0, usable - busy)

    def _plan(self, name: str, model: LoadedModel, phases: tuple[int, int] | None):
        from horde_worker.inference import fit

        capacity = self.capacity(name) if phases else None
        if capacity is None:
            return fit.FitPlan()  # nothing to fit against: the parts need not be counted
        return fit.plan(fit.model_parts(model.pipeline), phases[0], phases[1], capacity)

    def _refit(self, name: str, model: LoadedModel, phases: tuple[int, int]) -> None:
        """A resident model whose next job needs a heavier plan: through RAM to apply it (weights come back in
        one copy per component)."""
        from horde_worker.inference import fit

        wanted = fit.heavier(model.fit.plan, self._plan(name, model, phases))
        if wanted != model.fit.plan:
            move(model, "cpu")
            release_memory(self.device)
            model.fit.apply(model, wanted, self.device)
            move(model, self.device)

    def _device_size(self, model: LoadedModel) -> int:
        """The model's bytes on the device: its visiting modules wait in RAM."""
        from horde_worker.inference.vram import tensors_bytes

        visiting = model.fit.visiting()
        return pipeline_bytes(model) - (tensors_bytes(visiting) if visiting else 0)

    def _place_on_device(self, name: str, model: LoadedModel, phases: tuple[int, int] | None = None) -> None:
        """Move a model from RAM to the device under the plan its job needs, log what the switch cost, and keep
        its host copy (for a free way back) only where RAM is kept for models and the budget allows it."""
        model.fit.apply(model, self._plan(name, model, phases), self.device)
        if not model.fit.plan.full:
            self.sizes[name] = self._device_size(model)  # room was made for the whole model: this is less
        seconds = move(model, self.device)
        size = self.sizes.get(name, 0)
        logger.info("{} moved to {} in {:.2f} s ({:.1f} GB/s)", name, self.device, seconds,
                    size / max(seconds, 1e-6) / 1e9)
        self.on_device[name] = model
        over = self.ram_budget is not None and self.ram_bytes() > self.ram_budget
        if (not self.keep_in_ram or over) and sum(p.release_host_copy() for p in model.weights.values()):
            release_memory(self.device)

    # --- loading -----------------------------------------------------------------------------

    def _read(self, name: str, path: str, v_prediction: bool) -> LoadedModel:
        target = self.device if self.on_cpu else torch.device("cpu")
        model = load_pipeline(Path(path), target, self.dtype, name=name, v_prediction=v_prediction)
        if not self.on_cpu and getattr(model.pipeline, "vae", None) is not None:
            from horde_worker.inference.pipelines import run_vae_in, vae_dtype

            # Read into RAM for a GPU: the VAE takes the precision it will run in there.
            run_vae_in(model.pipeline.vae, vae_dtype(self.device, model.pipeline.vae.dtype))
        if self.fp8_matmuls and model.baseline == "flux_1" and "transformer" in getattr(model.pipeline, "fp8_parts", ()):
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

    def acquire(self, name: str, path: str, v_prediction: bool = False, need: int = 0,
                phases: tuple[int, int] | None = None) -> tuple[LoadedModel, str, float]:
        """The model on the device, ready to run: (model, where it came from, seconds spent), with `need` more
        bytes (the job's activations) made free beside it where the budget allows. `phases` (the job's denoise
        and decode peaks) choose how it fits a card smaller than it and the job (inference/fit.py). It is pinned
        while this runs; `using` keeps it pinned for as long as the job needs it."""
        start = time.perf_counter()
        source = None
        with self._lock:
            self._pinned[name] += 1
        try:
            while True:
                with self._lock:
                    if name in self.on_device:
                        self.on_device.move_to_end(name)
                        if phases and not self.on_cpu:
                            self._refit(name, self.on_device[name], phases)
                        self.sizes[name] = self._device_size(self.on_device[name])  # ControlNets may have joined
                        if need and not self.on_cpu:
                            self.make_room(need, keep={name})
                        return self.on_device[name], source or "resident", time.perf_counter() - start
                    if name in self.in_ram:
                        model = self.in_ram.pop(name)
                        self._fit_device(self.sizes[name] + (0 if self.on_cpu else need), keep={name})
                        if self.on_cpu:
                            self.on_device[name] = model
                        else:
                            self._place_on_device(name, model, phases)
                        return model, source or "ram", time.perf_counter() - start
                # Pinned from here on: once loaded, nothing can evict it before the next pass takes it.
                if self._load(name, path, v_prediction):
                    source = "disk"
        finally:
            self._unpin(name)

    @contextlib.contextmanager
    def using(self, name: str, path: str, v_prediction: bool = False, need: int = 0,
              phases: tuple[int, int] | None = None) -> Iterator[tuple[LoadedModel, str, float]]:
        """`acquire` for the duration of the block: the model cannot be evicted (by a preload, say) while it runs."""
        with self._lock:
            self._pinned[name] += 1
        try:
            yield self.acquire(name, path, v_prediction, need, phases)
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
            if sum(packed.release_host_copy() for packed in model.weights.values()):
                release_memory(self.device)
        if self.on_cpu:
            # The models in use live in RAM too: keep at most what fits beside the incoming one.
            self._fit_device(incoming, keep=keep)

    def _drop(self, name: str, model: LoadedModel) -> None:
        logger.debug("{} dropped from memory", name)
        self.sizes.pop(name, None)
        del model
        release_memory(self.device)
