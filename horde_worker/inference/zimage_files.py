"""Files Z-Image needs besides the reference's parts (no torch here: the supervisor plans downloads with it).

The Qwen3 tokenizer and its chat template are not in the reference: they are fetched from Qwen's own
release into this folder beside the text encoder, without a hash to check them against.
"""

TOKENIZER_DIR = "qwen3-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_URLS = {name: f"https://huggingface.co/Qwen/Qwen3-4B/resolve/main/{name}" for name in TOKENIZER_FILES}
