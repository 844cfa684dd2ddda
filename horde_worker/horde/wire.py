"""Wire models of the worker's side of the horde API v2 (see docs/horde-contract.md).

Two traps are encoded here: a pop without a job still carries a full `payload`, so "no job"
is read from `ids` alone; and the pop's seed is a string while submit wants an integer.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Loose(BaseModel):
    """Server answers may grow fields: keep unknown ones instead of failing."""

    model_config = ConfigDict(extra="allow")


class PopRequest(BaseModel):
    """Body of POST /v2/generate/pop."""

    name: str
    models: list[str]
    bridge_agent: str
    threads: int = 1
    amount: int = 1
    max_pixels: int = 262144
    nsfw: bool = True
    blacklist: list[str] = Field(default_factory=list)
    priority_usernames: list[str] = Field(default_factory=list)
    allow_img2img: bool = True
    allow_painting: bool = True
    allow_unsafe_ipaddr: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    allow_lora: bool = False
    extra_slow_worker: bool = False
    limit_max_steps: bool = False
    require_upfront_kudos: bool = False


class LoraSpec(_Loose):
    """One LoRA a job asks for."""

    name: str
    model: float = 1.0
    clip: float = 1.0
    inject_trigger: str | None = None
    is_version: bool = False


class TextualInversionSpec(_Loose):
    """One textual inversion a job asks for."""

    name: str
    inject_ti: str | None = None
    strength: float = 1.0


class JobPayload(_Loose):
    """The generation parameters of a popped job."""

    prompt: str = ""
    ddim_steps: int = 30
    n_iter: int = 1
    seed: str | None = None
    sampler_name: str = "k_euler_a"
    karras: bool = True
    cfg_scale: float = 5.0
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    tiling: bool = False
    hires_fix: bool = False
    hires_fix_denoising_strength: float | None = None
    denoising_strength: float | None = None
    post_processing: list[str] = Field(default_factory=list)
    facefixer_strength: float | None = None
    loras: list[LoraSpec] = Field(default_factory=list)
    tis: list[TextualInversionSpec] = Field(default_factory=list)
    control_type: str | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    transparent: bool = False
    use_nsfw_censor: bool = False
    workflow: str | None = None
    special: dict[str, Any] | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_as_text(cls, value: Any) -> str | None:
        return None if value is None else str(value)

    @field_validator("post_processing", "loras", "tis", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value


class ModeratorMessage(_Loose):
    """A message a moderator left for this worker."""

    id: str | None = None
    message: str = ""
    origin: str | None = None
    expiry: str | None = None


class ExtraSourceImage(_Loose):
    """An additional source image of a job."""

    image: str
    strength: float = 1.0


class PopResponse(_Loose):
    """Answer of POST /v2/generate/pop."""

    id: str | None = None
    ids: list[str] = Field(default_factory=list)
    payload: JobPayload = Field(default_factory=JobPayload)
    model: str | None = None
    ttl: int | None = None
    skipped: dict[str, float] = Field(default_factory=dict)
    source_image: str | None = None
    source_mask: str | None = None
    source_processing: str | None = None
    extra_source_images: list[ExtraSourceImage] | None = None
    r2_upload: str | None = None
    r2_uploads: list[str] | None = None
    messages: list[ModeratorMessage] = Field(default_factory=list)

    @property
    def has_job(self) -> bool:
        """True when the pop handed out work; the payload is present either way."""
        return bool(self.ids)


class GenMetadataType(str, Enum):
    """`gen_metadata[].type` values the server accepts."""

    LORA = "lora"
    TI = "ti"
    CENSORSHIP = "censorship"
    SOURCE_IMAGE = "source_image"
    SOURCE_MASK = "source_mask"
    EXTRA_SOURCE_IMAGES = "extra_source_images"
    BATCH_INDEX = "batch_index"
    INFORMATION = "information"
    AESTHETIC_SCORE = "aesthetic_score"


class GenMetadataValue(str, Enum):
    """`gen_metadata[].value` values the server accepts."""

    DOWNLOAD_FAILED = "download_failed"
    PARSE_FAILED = "parse_failed"
    BASELINE_MISMATCH = "baseline_mismatch"
    CSAM = "csam"
    NSFW = "nsfw"
    SEE_REF = "see_ref"


class GenMetadata(BaseModel):
    """One entry of a submit's gen_metadata."""

    type: GenMetadataType
    value: GenMetadataValue
    ref: str | None = Field(default=None, max_length=255)

    def to_wire(self) -> dict[str, str]:
        """The JSON form, without a null ref."""
        data = {"type": self.type.value, "value": self.value.value}
        if self.ref is not None:
            data["ref"] = self.ref
        return data


class SubmitState(str, Enum):
    """`state` of a submitted generation."""

    OK = "ok"
    CENSORED = "censored"
    FAULTED = "faulted"
    CSAM = "csam"


class SubmitRequest(BaseModel):
    """Body of POST /v2/generate/submit; the seed is an integer here, unlike the pop's."""

    id: str
    generation: str
    seed: int
    state: SubmitState = SubmitState.OK
    gen_metadata: list[GenMetadata] = Field(default_factory=list, max_length=50)

    def to_wire(self) -> dict[str, Any]:
        """The JSON body."""
        body: dict[str, Any] = {
            "id": self.id,
            "generation": self.generation,
            "seed": int(self.seed),
            "state": self.state.value,
        }
        if self.gen_metadata:
            body["gen_metadata"] = [m.to_wire() for m in self.gen_metadata]
        return body
