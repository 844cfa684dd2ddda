"""Malformed jobs: ways to spoil a pop answer that carries a job, keeping its ids readable.

Each mutation takes the decoded pop answer (a dict) and changes it in place; `EXPECTED` says what
a worker must answer for the spoiled job: `fault` (submitted as faulted), `note:<type>` (faulted,
or done with a gen_metadata entry of that type: the bad input was left out, not used), or `any`
(done or faulted, as long as every id is answered once).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAVERSAL = "../../etc/passwd"
LINK_LOCAL_URL = "http://169.254.169.254/latest/meta-data/source.png"
# Served by the proxy itself: a PNG whose header claims 50000 x 50000 pixels.
BOMB_PATH = "/fault/bomb.png"


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A small, valid-looking PNG whose header claims `width` x `height` 8-bit grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # four rows: decoding more would need the rest
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def real_png(path: Path) -> Path:
    """A genuine 64x64 PNG at `path`: if a worker read a file:// source, it would get a usable image."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, format="PNG")
    return path


def _payload(pop: dict[str, Any]) -> dict[str, Any]:
    return pop.setdefault("payload", {})


def _set_payload(key: str, value: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def mutate(pop: dict[str, Any], context: dict[str, Any]) -> None:
        _payload(pop)[key] = value
    return mutate


def _set_top(key: str, value: Any) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def mutate(pop: dict[str, Any], context: dict[str, Any]) -> None:
        pop[key] = value
    return mutate


def _source(value_of: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def mutate(pop: dict[str, Any], context: dict[str, Any]) -> None:
        pop["source_image"] = value_of(context)
        pop["source_processing"] = "img2img"
        _payload(pop).setdefault("denoising_strength", 0.6)
    return mutate


def _ids_not_list(pop: dict[str, Any], context: dict[str, Any]) -> None:
    pop["ids"] = pop["id"]  # a bare string where a list belongs; `id` still names the job


# name -> (mutation(pop, context), expected answer). `context` holds `proxy_root` and `file_source`.
MUTATIONS: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], None], str]] = {
    "garbage_source": (_source(lambda c: base64.b64encode(b"\x00garbage, not an image" * 40).decode()),
                       "note:source_image"),
    "bomb_source": (_source(lambda c: c["proxy_root"] + BOMB_PATH), "note:source_image"),
    "file_source": (_source(lambda c: "file://" + str(c["file_source"])), "note:source_image"),
    "link_local_source": (_source(lambda c: LINK_LOCAL_URL), "note:source_image"),
    "huge_width": (_set_payload("width", 100_000), "fault"),
    "negative_steps": (_set_payload("ddim_steps", -5), "fault"),
    "huge_steps": (_set_payload("ddim_steps", 10_000), "fault"),
    "nan_cfg": (_set_payload("cfg_scale", float("nan")), "fault"),
    "string_cfg": (_set_payload("cfg_scale", "seven and a half"), "fault"),
    "unknown_sampler": (_set_payload("sampler_name", "k_no_such_sampler"), "fault"),
    "unknown_model": (_set_top("model", "no-such-model-anywhere"), "fault"),
    "traversal_model": (_set_top("model", TRAVERSAL), "fault"),
    "unknown_postprocessor": (_set_payload("post_processing", ["NoSuchUpscaler_x9"]), "any"),
    "unknown_control": (_set_payload("control_type", "telepathy"), "fault"),
    "traversal_lora": (_set_payload("loras", [{"name": TRAVERSAL, "model": 1.0, "clip": 1.0, "is_version": False}]),
                       "note:lora"),
    "traversal_ti": (_set_payload("tis", [{"name": TRAVERSAL, "strength": 1.0}]), "note:ti"),
    "huge_prompt": (_set_payload("prompt", "a lighthouse " * 80_000), "any"),
    "int_prompt": (_set_payload("prompt", 12345), "any"),
    "ids_not_list": (_ids_not_list, "any"),
    "null_field": (_set_payload("width", None), "any"),
}

# Mutations that would hide the other ids of a batch: applied only to one-id pops.
SINGLE_ID_ONLY = frozenset({"ids_not_list"})


def satisfied(expected: str, state: str | None, gen_metadata: list[dict[str, Any]] | None) -> bool:
    """Whether a submit with `state` and `gen_metadata` is an acceptable answer to a spoiled job."""
    if state == "faulted":
        return True
    if expected == "fault":
        return False
    if expected.startswith("note:"):
        kind = expected.split(":", 1)[1]
        return any(isinstance(m, dict) and m.get("type") == kind for m in gen_metadata or [])
    return True
