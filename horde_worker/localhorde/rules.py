"""The real server's rules as pure functions: TTL, reward, who may take a request, the pop payload."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from horde_worker.localhorde.records import ImageRequest

ANONYMOUS_KEY = "0000000000"
SECOND_ORDER_SAMPLERS = {"k_heun", "k_dpm_2", "k_dpm_2_a", "k_dpmpp_2s_a", "k_dpmpp_sde"}
SKIP_KEYS = ("unsafe_ip", "img2img", "painting", "post-processing", "lora", "controlnet", "worker_id",
             "performance", "nsfw", "untrusted", "models", "bridge_version", "max_pixels", "step_count")

# The payload the real server returns on a pop that finds no job.
EMPTY_PAYLOAD = {
    "ddim_steps": 30, "n_iter": 1, "image_is_control": False, "return_control_map": False,
    "sampler_name": "k_euler_a", "cfg_scale": 7.5, "height": 512, "width": 512, "karras": False,
    "tiling": False, "hires_fix": False, "transparent": False,
}
OPTIONAL_PARAMS = ("denoising_strength", "post_processing", "clip_skip", "facefixer_strength", "control_type",
                   "hires_fix_denoising_strength", "tis", "workflow", "extra_texts", "special", "use_nsfw_censor")


class LocalHordeError(Exception):
    """An error answer: HTTP status, rc and message, as the real server words them."""

    def __init__(self, status: int, rc: str, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.rc, self.message, self.errors = status, rc, message, errors

    def body(self) -> dict[str, Any]:
        if self.errors is not None:
            return {"errors": self.errors, "message": self.message}
        return {"message": self.message, "rc": self.rc}


def job_ttl(params: dict[str, Any], model_is_flux: bool = False, extra_slow: bool = False, minimum: int = 150) -> int:
    """Seconds the server gives one job, by the server's formula."""
    steps = int(params.get("steps", 30))
    sampler = params.get("sampler_name", "k_euler_a")
    if sampler == "k_dpm_adaptive":
        steps = 40
    elif sampler in SECOND_ORDER_SAMPLERS:
        steps *= 2
    pixels = int(params.get("width", 512)) * int(params.get("height", 512))
    ttl = 30 + steps * 2 * (pixels / 512**2)
    if params.get("control_type"):
        ttl *= 2
    if model_is_flux:
        ttl *= 3
    ttl = max(minimum, ttl)
    if extra_slow:
        ttl *= 3
    return int(ttl)


def job_reward(params: dict[str, Any], model: str = "") -> float:
    """An approximation of the server's kudos for one image (512x512x50 k_euler is about 11)."""
    mps = int(params.get("width", 512)) * int(params.get("height", 512)) * int(params.get("steps", 30)) / 1e6
    reward = 2.33 + 0.66 * mps
    reward += 3 * len(params.get("loras") or []) + (1 if params.get("tis") else 0)
    lowered = model.lower()
    if "flux" in lowered:
        reward *= 8
    elif "xl" in lowered:
        reward *= 2
    return round(reward, 2)


def unsuitable(request: ImageRequest, worker_body: dict[str, Any], models: list[str]) -> str | None:
    """The `skipped` key a worker popping with `worker_body` is passed over for, or None if it qualifies."""
    params = request.params
    if not set(request.body["models"]) & set(models):
        return "models"
    if int(params.get("width", 512)) * int(params.get("height", 512)) > int(worker_body.get("max_pixels", 262144)):
        return "max_pixels"
    if request.body.get("nsfw") and not worker_body.get("nsfw", True):
        return "nsfw"
    if request.body.get("source_image"):
        processing = request.body.get("source_processing", "img2img")
        if processing in ("inpainting", "outpainting") and not worker_body.get("allow_painting", True):
            return "painting"
        if not worker_body.get("allow_img2img", True):
            return "img2img"
    if params.get("post_processing") and not worker_body.get("allow_post_processing", True):
        return "post-processing"
    if (params.get("loras") or params.get("tis")) and not worker_body.get("allow_lora", False):
        return "lora"
    if params.get("control_type") and not worker_body.get("allow_controlnet", False):
        return "controlnet"
    prompt = request.body.get("prompt", "").lower()
    if any(word and word.lower() in prompt for word in worker_body.get("blacklist") or []):
        return "untrusted"
    return None


def job_payload(request: ImageRequest, count: int, seed: str) -> dict[str, Any]:
    """The pop's `payload` for `count` images of `request` sharing `seed`."""
    params = request.params
    payload = {
        "prompt": request.body["prompt"],
        "ddim_steps": int(params.get("steps", 30)),
        "n_iter": count,
        "seed": seed,
        "image_is_control": bool(params.get("image_is_control", False)),
        "return_control_map": bool(params.get("return_control_map", False)),
        "sampler_name": params.get("sampler_name", "k_euler_a"),
        "cfg_scale": float(params.get("cfg_scale", 5.0)),
        "height": int(params.get("height", 512)),
        "width": int(params.get("width", 512)),
        "karras": bool(params.get("karras", True)),
        "tiling": bool(params.get("tiling", False)),
        "hires_fix": bool(params.get("hires_fix", False)),
        "transparent": bool(params.get("transparent", False)),
    }
    for key in OPTIONAL_PARAMS:
        if params.get(key) is not None:
            payload[key] = params[key]
    if params.get("loras"):
        payload["loras"] = [{"is_version": False, **lora} for lora in params["loras"]]
    return payload
