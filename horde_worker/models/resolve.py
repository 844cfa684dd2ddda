"""models_to_load / models_to_skip: names and meta-instructions resolved against the reference.

Meta-instructions (case-insensitive, with or without a trailing MODELS, as the reGen template writes
them: "ALL SDXL MODELS"): ALL or ALL MODELS; ALL SDXL, ALL SD15, ALL SD21; ALL FLUX, ALL CASCADE, ALL QWEN,
ALL ZIMAGE (or ALL Z-IMAGE); ALL INPAINTING; ALL SFW, ALL NSFW; TOP n and BOTTOM n by the horde's monthly
usage counts. Skip entries resolve the same way and are taken out. Cascade, Flux, Qwen-Image and Z-Image
models need load_large_models.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from horde_worker.models.reference import ModelEntry, ModelReference

_GROUPS: dict[str, Callable[[ModelEntry], bool]] = {
    "ALL": lambda e: True,
    "ALL MODELS": lambda e: True,
    "ALL SDXL": lambda e: e.baseline == "stable_diffusion_xl",
    "ALL SD15": lambda e: e.baseline == "stable_diffusion_1",
    "ALL SD21": lambda e: e.baseline == "stable_diffusion_2",
    "ALL FLUX": lambda e: e.baseline == "flux_1",
    "ALL CASCADE": lambda e: e.baseline == "stable_cascade",
    "ALL QWEN": lambda e: e.baseline == "qwen_image",
    "ALL ZIMAGE": lambda e: e.baseline == "z_image_turbo",
    "ALL Z-IMAGE": lambda e: e.baseline == "z_image_turbo",
    "ALL INPAINTING": lambda e: e.inpainting,
    "ALL SFW": lambda e: not e.nsfw,
    "ALL NSFW": lambda e: e.nsfw,
}
_RANKED = re.compile(r"^(TOP|BOTTOM)\s+(\d+)$")


@dataclass
class Resolution:
    """The models to serve, in order, and what the user should be told."""

    names: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def _ranked(entries: list[ModelEntry], counts: dict[str, int], top: bool, n: int) -> list[str]:
    lowered = {k.lower(): v for k, v in counts.items()}
    # Most used first for TOP; least used first for BOTTOM; reference order breaks ties.
    order = sorted(range(len(entries)), key=lambda i: (-lowered.get(entries[i].name.lower(), 0) if top
                                                       else lowered.get(entries[i].name.lower(), 0), i))
    return [entries[i].name for i in order[:n]]


def _expand(items: list[str], reference: ModelReference, eligible: list[ModelEntry], counts: dict[str, int] | None,
            extra_names: list[str], key: str, notices: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        text = item.strip()
        upper = re.sub(r"\s+", " ", text.upper())
        if upper not in _GROUPS and upper.endswith(" MODELS") and upper.removesuffix(" MODELS") in _GROUPS:
            upper = upper.removesuffix(" MODELS")  # "ALL SDXL MODELS", "ALL SFW MODELS": the reGen template's forms
        if upper in _GROUPS:
            out += [e.name for e in eligible if _GROUPS[upper](e)]
            continue
        ranked = _RANKED.match(upper)
        if ranked:
            if counts is None:
                notices.append(f"{key}: {text!r}: the horde's usage statistics could not be read; "
                               "ranking by the reference's order instead")
            out += _ranked(eligible, counts or {}, ranked.group(1) == "TOP", int(ranked.group(2)))
            continue
        custom = next((n for n in extra_names if n.lower() == text.lower()), None)
        if custom is not None:
            out.append(custom)
            continue
        entry = reference.get(text)
        if entry is None:
            close = difflib.get_close_matches(text.lower(), [n.lower() for n in reference.names()], n=3, cutoff=0.6)
            names = [reference.get(c).name for c in close]
            hint = f"; did you mean {', '.join(repr(n) for n in names)}?" if names else ""
            notices.append(f"{key}: {text!r} is not a model of the horde's reference{hint}")
            continue
        out.append(entry.name)
    return out


def resolve(models_to_load: list[str], models_to_skip: list[str], reference: ModelReference,
            usage_counts: dict[str, int] | None, load_large_models: bool = False,
            extra_names: list[str] | None = None) -> Resolution:
    """Resolve the settings' model lists; `usage_counts` are the horde's monthly counts (None if unknown)."""
    result = Resolution()
    extra_names = list(extra_names or [])
    everything = list(reference.entries.values())
    eligible = [e for e in everything if load_large_models or not e.is_large]
    wanted = _expand(models_to_load or ["TOP 2"], reference, eligible, usage_counts, extra_names,
                     "models_to_load", result.notices)
    skipped = {n.lower() for n in _expand(models_to_skip, reference, everything, usage_counts, extra_names,
                                          "models_to_skip", result.notices)}
    seen: set[str] = set()
    for name in wanted:
        lowered = name.lower()
        if lowered in seen or lowered in skipped:
            continue
        entry = reference.get(name)
        if entry is not None and entry.is_large and not load_large_models:
            result.notices.append(f"models_to_load: {name!r} is a {entry.baseline} model: set load_large_models: "
                                  "true to serve it (it needs far more memory)")
            continue
        seen.add(lowered)
        result.names.append(name)
    return result
