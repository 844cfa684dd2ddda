"""Prompt features that are text only: `{a|b|c}` choices, picked from the image's own seed."""

from __future__ import annotations

import random
import re

_CHOICE = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def expand_choices(prompt: str, seed: int) -> str:
    """Replace every `{a|b|c}` with one option, chosen by `seed`: the same seed always gives the same prompt,
    so an image of a batch regenerates alone. Nested braces resolve from the inside out."""
    rng = random.Random(seed)
    while True:
        match = _CHOICE.search(prompt)
        if match is None:
            return prompt
        option = rng.choice(match.group(1).split("|"))
        prompt = prompt[: match.start()] + option + prompt[match.end():]
