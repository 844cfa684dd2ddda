"""LoRAs and textual inversions, applied to a resident pipeline for one job and removed after.

LoRAs go through diffusers' loaders and peft (kohya and diffusers layouts both load), each with
its own model and text-encoder strength. A LoRA whose weights match nothing in the model is a
`baseline_mismatch`: noted for gen_metadata, the image is made without it. Textual inversions
become new tokens of the tokenizer(s); the job's prompt (or negative prompt) gets the token
with its strength, or an `embedding:NAME` the requester wrote is replaced by it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from loguru import logger

from horde_worker.inference.messages import AdapterFile, GenerateRequest

Note = tuple[str, str, str | None]


def _lora_weights(pipe, lora: AdapterFile) -> dict[str, float]:
    weights = {}
    for component in getattr(pipe, "_lora_loadable_modules", ()):
        weights[component] = lora.clip_strength if component.startswith("text_encoder") else lora.model_strength
    return weights


def _load_loras(pipe, loras: list[AdapterFile], notes: list[Note]) -> list[str]:
    names, weights = [], []
    for index, lora in enumerate(loras):
        adapter = f"horde_lora_{index}"
        try:
            pipe.load_lora_weights(lora.path, adapter_name=adapter)
        except Exception as exc:  # any refusal of the file's keys means it is not for this model
            logger.warning("LoRA {} does not fit this model: {}", lora.name, exc)
            notes.append(("lora", "baseline_mismatch", lora.name))
            # The loader may have put part of it in (the UNet, say, before the text encoder refused):
            # take that part out, or this job would be made with half a LoRA it reports as left out.
            _discard_adapter(pipe, adapter)
            continue
        loaded = {name for names_ in pipe.get_list_adapters().values() for name in names_}
        if adapter not in loaded:
            logger.warning("LoRA {} matched no layer of this model", lora.name)
            notes.append(("lora", "baseline_mismatch", lora.name))
            continue
        names.append(adapter)
        weights.append(_lora_weights(pipe, lora))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def _discard_adapter(pipe, adapter: str) -> None:
    loaded = {name for names_ in pipe.get_list_adapters().values() for name in names_}
    if adapter in loaded:
        pipe.delete_adapters([adapter])


def _ti_targets(pipe):
    """(state-dict key, text encoder, tokenizer) per encoder a TI file can carry vectors for."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)]
    return [(None, pipe.text_encoder, pipe.tokenizer)]


def _load_tis(pipe, tis: list[AdapterFile], notes: list[Note]) -> list[AdapterFile]:
    from horde_worker.inference.checkpoint import load_state_dict

    loaded = []
    for ti in tis:
        try:
            state_dict = load_state_dict(ti.path)
            for key, text_encoder, tokenizer in _ti_targets(pipe):
                vectors = state_dict[key] if key else _single_vectors(state_dict)
                pipe.load_textual_inversion({ti.token: vectors} if key else vectors, token=ti.token,
                                            text_encoder=text_encoder, tokenizer=tokenizer)
        except Exception as exc:  # wrong width, missing encoder vectors: not for this model
            logger.warning("textual inversion {} does not fit this model: {}", ti.name, exc)
            notes.append(("ti", "baseline_mismatch", ti.name))
            _unload_tis(pipe, [ti])
            continue
        loaded.append(ti)
    return loaded


def _single_vectors(state_dict):
    """SD1/SD2 files: an A1111 `string_to_param` dict, `emb_params`, or a lone tensor."""
    if "string_to_param" in state_dict:
        return next(iter(state_dict["string_to_param"].values()))
    if "emb_params" in state_dict:
        return state_dict["emb_params"]
    if "clip_l" in state_dict:
        return state_dict["clip_l"]
    tensors = [v for v in state_dict.values() if hasattr(v, "shape")]
    if len(tensors) != 1:
        raise ValueError(f"cannot tell the embedding among {sorted(state_dict)[:5]}")
    return tensors[0]


def _unload_tis(pipe, tis: list[AdapterFile]) -> None:
    for ti in tis:
        for _key, text_encoder, tokenizer in _ti_targets(pipe):
            # A TI of n vectors added `token`, `token_1` ... `token_{n-1}`.
            tokens = [t for t in tokenizer.get_vocab() if t == ti.token or t.startswith(ti.token + "_")]
            if tokens:
                with contextlib.suppress(Exception):
                    pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=text_encoder)


def inject(prompts: list[str], negatives: list[str], loras: list[AdapterFile],
           tis: list[AdapterFile]) -> tuple[list[str], list[str]]:
    """Add LoRA triggers and TI tokens where the job asked for them."""
    prompts, negatives = list(prompts), list(negatives)
    for lora in loras:
        if lora.inject:
            prompts = [f"{p}, {lora.inject}" if p else lora.inject for p in prompts]
    for ti in tis:
        names = "|".join(re.escape(n) for n in (ti.name, *ti.aliases) if n)
        pattern = re.compile(rf"embedding:(?:{names})(?![\w.-])", re.IGNORECASE)
        prompts = [pattern.sub(ti.token, p) for p in prompts]
        negatives = [pattern.sub(ti.token, n) for n in negatives]
        weighted = f"({ti.token}:{ti.clip_strength:g})"
        if ti.inject == "prompt":
            prompts = [f"{weighted}, {p}" if p else weighted for p in prompts]
        elif ti.inject == "negprompt":
            negatives = [f"{weighted}, {n}" if n else weighted for n in negatives]
    return prompts, negatives


@contextlib.contextmanager
def applied(model, request: GenerateRequest, notes: list[Note]) -> Iterator[tuple[list[str], list[str]]]:
    """LoRAs and TIs of the job on the pipeline for the duration of the block; yields the prompts
    and negative prompts with triggers and TI tokens in place."""
    from horde_worker.inference.prompts import expand_choices

    pipe = model.pipeline
    prompts = [expand_choices(request.prompt, seed) for seed in request.seeds]
    negatives = [expand_choices(request.negative_prompt, seed) for seed in request.seeds]
    if not request.loras and not request.tis:
        yield prompts, negatives
        return
    can_ti = hasattr(pipe, "load_textual_inversion")
    try:
        # Everything from the first load on is undone in `finally`, whatever failed: a LoRA that raised
        # half-way, a TI, the prompt conversion, the job itself (or its cancellation).
        lora_names = _load_loras(pipe, request.loras, notes) if request.loras else []
        tis = _load_tis(pipe, request.tis, notes) if request.tis and can_ti else []
        applied_loras = [lora for lora in request.loras if not any(n[2] == lora.name for n in notes)]
        prompts, negatives = inject(prompts, negatives, applied_loras, tis)
        if tis:
            prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
            negatives = [pipe.maybe_convert_prompt(n, pipe.tokenizer) for n in negatives]
        logger.debug("adapters applied: LoRAs {}, TIs {}", lora_names, [ti.name for ti in tis])
        yield prompts, negatives
    finally:
        try:
            if request.loras:
                # Unloading (not just deleting the adapters) gives the layers back their original modules.
                pipe.unload_lora_weights()
        finally:
            if request.tis and can_ti:
                _unload_tis(pipe, request.tis)
