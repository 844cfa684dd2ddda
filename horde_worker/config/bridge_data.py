"""The worker's settings: `bridgeData.yaml`, the keys of the reGen worker's template.

Every key of that template is accepted. Keys this worker does not act on yet are listed in
`NOT_YET_HONOURED` and reported at start when a user sets them, so nothing is silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from horde_worker.models.civitai import DEFAULT_CIVITAI_URL
from horde_worker.models.reference import DEFAULT_REFERENCE_URL

ANONYMOUS_KEY = "0000000000"
DEFAULT_HORDE_URL = "https://aihorde.net/api"

# Keys that take effect when bridgeData.yaml changes while the worker runs.
LIVE_KEYS = frozenset({
    "nsfw", "blacklist", "censorlist", "censor_nsfw", "priority_usernames", "max_power", "max_batch", "queue_size",
    "allow_img2img", "allow_painting", "allow_unsafe_ip", "allow_post_processing", "allow_controlnet",
    "allow_sdxl_controlnet", "allow_lora", "extra_slow_worker", "limit_max_steps", "require_upfront_kudos",
    "stats_output_frequency", "limited_console_messages", "high_performance_mode", "moderate_performance_mode",
    "models_to_load", "models_to_skip", "custom_models", "load_large_models",
})
# Live keys that change which models are served: new ones are downloaded, then advertised.
MODEL_KEYS = frozenset({"models_to_load", "models_to_skip", "custom_models", "load_large_models", "allow_controlnet",
                        "allow_post_processing"})

# Accepted for compatibility, not acted on yet: each says so at start when set.
NOT_YET_HONOURED: dict[str, str] = {
    "allow_sdxl_controlnet": "the horde's reference has no SDXL ControlNet for the nine control types; the horde "
                             "is told this worker does no SDXL ControlNet",
    "purge_loras_on_download": "the LoRA cache is trimmed by max_lora_cache_size (least recently used first)",
}

_PERCENT_OR_MB = re.compile(r"^\s*(\d+(\.\d+)?)\s*(%|MB|GB)?\s*$", re.IGNORECASE)


def parse_amount(text: str, total: int) -> int:
    """'80%' of `total`, or a size in MB (or with a GB suffix), in bytes."""
    match = _PERCENT_OR_MB.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is neither a percentage nor a size in MB")
    value, unit = float(match.group(1)), (match.group(3) or "MB").upper()
    if unit == "%":
        return int(total * value / 100)
    return int(value * (1 << 30 if unit == "GB" else 1 << 20))


class CustomModel(BaseModel):
    """An entry of `custom_models`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    baseline: str
    filepath: str


class BridgeData(BaseModel):
    """All settings of the worker, with the reGen template's names and defaults."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    api_key: str = ANONYMOUS_KEY
    dreamer_name: str = Field("An Awesome Dreamer", min_length=1, max_length=100)
    horde_url: str = DEFAULT_HORDE_URL
    models_to_load: list[str] = Field(default_factory=lambda: ["TOP 2"])
    models_to_skip: list[str] = Field(default_factory=list)
    custom_models: list[CustomModel] = Field(default_factory=list)
    load_large_models: bool = False
    cache_home: str = "./models"
    # Where the horde's image model reference is fetched from at start ("" to use the saved copy).
    model_reference_url: str = DEFAULT_REFERENCE_URL
    # A mirror every file the worker fetches at start comes from instead (models, tokenizers, post-processors,
    # ControlNets, the safety CLIP and the model reference): <download_mirror>/<host>/<path>. "" uses the origins.
    download_mirror: str = ""

    max_threads: int = Field(1, ge=1, le=50)
    queue_size: int = Field(1, ge=0, le=10)
    max_batch: int = Field(1, ge=1, le=20)
    max_power: int = Field(8, ge=2, le=288)
    extra_slow_worker: bool = False
    limit_max_steps: bool = False

    nsfw: bool = True
    censor_nsfw: bool = False
    censorlist: list[str] = Field(default_factory=list)
    blacklist: list[str] = Field(default_factory=list)
    safety_on_gpu: bool = False
    # CLIP weights for the safety check; empty: the horde's ViT-L/14, downloaded into cache_home/clip.
    safety_model: str = ""

    allow_img2img: bool = True
    allow_painting: bool = True
    allow_unsafe_ip: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    allow_lora: bool = False
    require_upfront_kudos: bool = False
    priority_usernames: list[str] = Field(default_factory=list)

    civitai_api_token: str = ""
    # Where LoRAs and textual inversions are looked up (CivitAI's public API).
    civitai_api_url: str = DEFAULT_CIVITAI_URL
    max_lora_cache_size: int = Field(10, ge=1)
    purge_loras_on_download: bool = False

    ram_to_leave_free: str = "80%"
    vram_to_leave_free: str = "80%"
    high_memory_mode: bool = False
    high_performance_mode: bool = False
    moderate_performance_mode: bool = False
    unload_models_from_vram_often: bool = True
    very_fast_disk_mode: bool = False
    # Seconds a model may take to read from disk before the worker warns that the disk is holding jobs up.
    preload_timeout: int = Field(80, ge=1)
    post_process_job_overlap: bool = False
    # Compiled denoisers per batch-size bucket: "auto" (on for CUDA GPUs), "on", "off", or "cudagraphs"
    # (also captures CUDA graphs; compiled in the engine's own thread).
    compile_denoisers: Literal["auto", "on", "off", "cudagraphs"] = "auto"
    # Flux's fp8-stored transformer blocks multiply in fp8 on GPUs that can (Ada, Hopper): faster, but the
    # images are no longer exactly the reference's (see docs/benchmarks.md for the measured error).
    flux_fp8_matmuls: bool = False

    remove_maintenance_on_init: bool = False
    exit_on_unhandled_faults: bool = False
    stats_output_frequency: int = Field(30, ge=1)
    limited_console_messages: bool = False
    # The local dashboard and Prometheus metrics (ui/dashboard.py): off with `dashboard: false`; loopback only
    # unless dashboard_host says otherwise; dashboard_port 0 takes any free port (the log says which).
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8186, ge=0, le=65535)

    def extra_queue(self, engine_places: int) -> int:
        """Jobs popped ahead beyond queue_size: high_performance_mode keeps a whole engine's worth more (at
        least two), moderate_performance_mode one more. More jobs in hand means less idle time between jobs,
        and a larger share of them at risk of their TTL when the worker cannot keep up."""
        if self.high_performance_mode:
            return max(2, engine_places)
        return 1 if self.moderate_performance_mode else 0

    def memory_tier(self) -> tuple[bool, bool]:
        """(keep_on_device, keep_in_ram) for the inference processes, from the memory settings:
        - unload_models_from_vram_often: only the models jobs are using stay on the GPU (the others wait in RAM);
        - very_fast_disk_mode: a model leaving the GPU is dropped and read from disk when next needed (less RAM);
        - high_memory_mode: keep everything the budgets allow, on the GPU and in RAM (overrides both)."""
        if self.high_memory_mode:
            return True, True
        return not self.unload_models_from_vram_often, not self.very_fast_disk_mode

    @field_validator("models_to_load", "models_to_skip", "censorlist", "blacklist", "priority_usernames",
                     mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("priority_usernames")
    @classmethod
    def _alias_with_id(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r".+#\d+", name):
                raise ValueError(f"{name!r} must be written as alias#id, e.g. db0#1")
        return value

    @field_validator("ram_to_leave_free", "vram_to_leave_free", mode="before")
    @classmethod
    def _percent_or_size(cls, value: Any) -> str:
        text = str(value)
        match = _PERCENT_OR_MB.match(text)
        if not match or (match.group(3) == "%" and not 0 <= float(match.group(1)) <= 100):
            raise ValueError(f"{text!r} must be a percentage such as '80%' or a size in MB such as 4096")
        return text.strip()

    @field_validator("horde_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an http(s) URL such as {DEFAULT_HORDE_URL}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _empty_models_mean_top_two(self) -> BridgeData:
        if not self.models_to_load:
            object.__setattr__(self, "models_to_load", ["TOP 2"])
        return self

    @property
    def max_pixels(self) -> int:
        """The pop's max_pixels: 8 x 64 x 64 pixels per unit of max_power (8 is 512x512)."""
        return 64 * 64 * 8 * self.max_power

    @property
    def is_anonymous(self) -> bool:
        return self.api_key in ("", ANONYMOUS_KEY)

    def unknown_keys(self) -> list[str]:
        """Keys in the file that no version of the worker template knows."""
        return sorted((self.model_extra or {}).keys())
