"""Typed messages between the supervisor and an inference process.

Plain dataclasses (pickled over a multiprocessing pipe): neither side needs the other's
imports, and the supervisor never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SlotSpec:
    """What one inference process owns."""

    slot: int
    device: str  # "cuda:0", "cpu", "directml:0", ...
    log_dir: str
    # Bytes of RAM this process may keep models in (None: no limit), and how much of the GPU's
    # memory to leave free ("80%" or MB).
    ram_budget: int | None = None
    vram_to_leave_free: str = "20%"
    # How many jobs the process's engine runs at once (max_threads): batched together where they can be.
    max_jobs: int = 1
    # compile_denoisers ("auto" | "on" | "off" | "cudagraphs") and where compiled graphs are cached.
    compile_denoisers: str = "off"
    flux_fp8_matmuls: bool = False
    # Memory settings (`residency.memory_tier`): unused models stay on the device / in RAM.
    keep_on_device: bool = True
    keep_in_ram: bool = True
    cache_home: str = ""
    # post_process_job_overlap: post-process a job on a side thread while the next job samples.
    post_process_overlap: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """One horde job (a batch of `len(seeds)` images of one request) for an inference process."""

    job_id: str
    model_name: str
    model_path: str
    baseline: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler_name: str
    karras: bool
    seeds: list[int]
    clip_skip: int = 1
    v_prediction: bool = False
    tiling: bool = False
    hires_fix: bool = False
    hires_fix_denoising_strength: float | None = None
    # Source images as encoded bytes (checked by the supervisor); `source_processing` is the horde's
    # img2img | inpainting | outpainting | remix and only means something with a source image.
    source_image: bytes | None = None
    source_mask: bytes | None = None
    source_processing: str = "img2img"
    denoising_strength: float | None = None
    extra_images: list[tuple[bytes, float]] = field(default_factory=list)
    loras: list[AdapterFile] = field(default_factory=list)
    tis: list[AdapterFile] = field(default_factory=list)
    control_type: str | None = None
    control_model_path: str | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    # (name, weights path) of each post-processor, in the job's order.
    post_processing: list[tuple[str, str]] = field(default_factory=list)
    facefixer_strength: float | None = None
    # Paths of inpainting/annotator weights and other extras by name.
    extra: dict[str, Any] = field(default_factory=dict)
    # When the job's time runs out (epoch seconds), so that the engine starts it before that; None: unknown.
    deadline: float | None = None


@dataclass(frozen=True)
class AdapterFile:
    """A LoRA or textual inversion already on disk, with how the job wants it applied."""

    name: str  # what the job called it (the gen_metadata ref)
    path: str
    model_strength: float = 1.0
    clip_strength: float = 1.0
    # Text to add to the prompt (LoRA triggers) or where a TI goes ("prompt" / "negprompt" / None).
    inject: str | None = None
    token: str = ""
    # Other names a prompt may use for a TI, written `embedding:NAME`.
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preload:
    """Read this model from disk into RAM now, while the current job runs."""

    model_name: str
    model_path: str
    v_prediction: bool = False


@dataclass(frozen=True)
class Preloaded:
    """A preload finished (or failed, with `error`)."""

    model_name: str
    seconds: float
    resident_models: list[str]
    error: str | None = None


@dataclass(frozen=True)
class CancelJob:
    """Stop this job: skipped if still queued, otherwise stopped at its next sampling step. The process
    answers GenerateFailed(job_id, "stopped: <reason>") and takes its next job; a job it does not
    know (or has finished) is ignored."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Shutdown:
    """Finish the current message and exit."""


@dataclass(frozen=True)
class SlotReady:
    """The process started and owns its device."""

    slot: int
    pid: int
    device_name: str


@dataclass(frozen=True)
class Progress:
    """Sampling progress of the running job."""

    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class GenerateResult:
    """Finished images as HxWxC uint8 arrays, one per seed, and where the time went."""

    job_id: str
    images: list[Any]
    load_seconds: float
    sample_seconds: float
    resident_models: list[str]
    load_source: str = "resident"  # resident | ram | disk
    resident_bytes: int = 0
    # (type, value, ref) gen_metadata entries found while generating (e.g. a LoRA that does not fit).
    notes: list[tuple[str, str, str | None]] = field(default_factory=list)
    postprocess_seconds: float = 0.0
    # How many other jobs shared this job's denoiser forwards (step-level batching).
    shared_with: int = 0
    # The engine's figures so far: busy_seconds, peak_device_bytes, compiled_shapes, compile_seconds.
    engine: dict[str, float] = field(default_factory=dict)
    # How the model fits a card smaller than it and the job ("text encoders in RAM, tiled VAE"); "" when all of
    # it is on the device (inference/fit.py).
    fit: str = ""


@dataclass(frozen=True)
class SamplingDone:
    """With post-processing overlap: the job's diffusion is over and the slot takes its next job, while
    this one is post-processed; its GenerateResult (or GenerateFailed) follows."""

    job_id: str
    sample_seconds: float
    resident_models: list[str]


@dataclass(frozen=True)
class GenerateFailed:
    """The job could not be generated; `reason` is shown to the user and logged."""

    job_id: str
    reason: str
    resident_models: list[str]
