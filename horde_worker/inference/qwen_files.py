"""Files Qwen-Image needs besides the reference's parts (no torch here: the supervisor plans downloads with it).

The Qwen2.5-VL tokenizer is not in the reference: it is fetched from Qwen's own release into this folder
beside the text encoder, without a hash to check it against.
"""

TOKENIZER_DIR = "qwen2.5-vl-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_URLS = {name: f"https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/resolve/main/{name}"
                  for name in TOKENIZER_FILES}
