"""Compiled denoisers per shape bucket.

A step batch's forward has as many rows as its jobs have images (twice, with their guidance pairs). Rows
are padded up to a bucket (1, 2, 4, 8, ...), so that a handful of shapes covers every mix of jobs and a
compiled graph is made once per (bucket, latent shape, conditioning shapes), not per batch.

A shape seen for the first time runs eagerly while its graph compiles on a side thread; from the step
after the compile ends it runs compiled. A compile that fails leaves that shape eager for good, with
the reason logged. Inductor's caches live under `cache_home/compile`, so a restarted worker finds the
graphs it made before and is ready in seconds.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from loguru import logger

from horde_worker.inference.stepbatch import Denoiser

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(rows: int) -> int:
    """The smallest bucket that holds `rows` (a multiple of the largest beyond it)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return -(-rows // BUCKETS[-1]) * BUCKETS[-1]


def use_cache_dir(cache_home: str | Path) -> Path:
    """Point inductor's on-disk caches at `cache_home/compile` (before anything compiles)."""
    folder = Path(cache_home) / "compile"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return folder


def _allow_many_graphs() -> None:
    """Every denoiser shares one Python function, and each (bucket, shape, model) is a graph of its own: dynamo's
    default of 8 graphs per function would silently send the rest back to eager."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 256)
    if hasattr(dynamo_config, "accumulated_cache_size_limit"):
        dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 2048)


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows (real values: no NaN from an all-zero row)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


class CompiledDenoiser:
    """A `Denoiser` that runs each shape bucket through its own compiled graph once that graph is ready."""

    def __init__(self, denoiser: Denoiser, mode: str | None = None, background: bool = True,
                 row_names: tuple[str, ...] = ()) -> None:
        self.eager = denoiser
        _allow_many_graphs()
        self.compiled = torch.compile(denoiser, dynamic=False, mode=mode)
        self.background = background
        # Conditioning entries with one row per model-input row (the rest are shared by every row); empty: all.
        self.row_names = row_names
        self.ready: set[tuple] = set()
        self.failed: dict[tuple, str] = {}
        self.compiling: dict[tuple, Future] = {}
        self.compile_seconds: dict[tuple, float] = {}
        self.compiled_calls = 0  # forwards that ran compiled (reports, tests)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile") if background else None
        self._lock = threading.Lock()

    def key(self, model_input: torch.Tensor, conditioning: dict[str, torch.Tensor], rowed: set[str]) -> tuple:
        rows = bucket(model_input.shape[0])
        return (rows, tuple(model_input.shape[1:]), str(model_input.dtype),
                tuple((name, tuple(t.shape[1:]) if name in rowed else tuple(t.shape))
                      for name, t in sorted(conditioning.items())))

    def _rowed(self, conditioning: dict[str, torch.Tensor]) -> set[str]:
        if self.row_names:
            return {name for name in conditioning if name in self.row_names}
        return set(conditioning)

    def __call__(self, model_input: torch.Tensor, timesteps: torch.Tensor,
                 conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        rowed = self._rowed(conditioning)
        key = self.key(model_input, conditioning, rowed)
        rows = model_input.shape[0]
        padded_rows = key[0]
        padded = (_pad(model_input, padded_rows), _pad(timesteps, padded_rows),
                  {name: _pad(t, padded_rows) if name in rowed else t for name, t in conditioning.items()})
        with self._lock:
            ready = key in self.ready
        if not ready and key not in self.failed:
            self._start_compile(key, padded)
            with self._lock:
                ready = key in self.ready  # compiled in this thread (no background)
        if ready:
            self.compiled_calls += 1
            return self.compiled(*padded)[:rows]
        return self.eager(*padded)[:rows]

    def _start_compile(self, key: tuple, example: tuple) -> None:
        if key in self.compiling:
            return
        # Its own copies: the caller goes on with its tensors while the compile runs.
        inputs = (example[0].clone(), example[1].clone(), {n: t.clone() for n, t in example[2].items()})
        grad_mode = torch.is_inference_mode_enabled()

        def compile_now() -> None:
            start = time.perf_counter()
            try:
                with torch.inference_mode(grad_mode):
                    self.compiled(*inputs)
            except Exception as exc:  # that shape stays eager; the job is not affected
                logger.warning("compiling the denoiser for {} failed ({}: {}); it runs eagerly",
                               key[:2], type(exc).__name__, exc)
                with self._lock:
                    self.failed[key] = f"{type(exc).__name__}: {exc}"
                return
            seconds = time.perf_counter() - start
            with self._lock:
                self.ready.add(key)
                self.compile_seconds[key] = seconds
            logger.info("denoiser compiled for {} rows of {} in {:.1f}s", key[0], key[1], seconds)

        if self._executor is None:
            compile_now()
        else:
            self.compiling[key] = self._executor.submit(compile_now)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the compiles under way (tests, benchmarks, shutdown)."""
        for future in list(self.compiling.values()):
            future.result(timeout)
