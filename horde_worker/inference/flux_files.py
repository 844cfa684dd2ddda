"""Files Flux needs besides its checkpoint (no torch here: the supervisor plans downloads with it)."""

# The T5 tokenizer is looked for, and downloaded to, this folder beside the checkpoints.
T5_TOKENIZER_DIR = "t5-tokenizer"
T5_TOKENIZER_URL = "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/tokenizer_2/tokenizer.json"
