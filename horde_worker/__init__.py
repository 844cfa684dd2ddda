"""An image worker for the AI Horde built on Hugging Face diffusers."""

__version__ = "0.1.0"
PROJECT_URL = "https://github.com/horde-worker/horde-worker"
BRIDGE_NAME = "horde-worker-diffusers"
# The horde grants capabilities by this name:version:url; it is this project's own.
BRIDGE_AGENT = f"{BRIDGE_NAME}:{__version__}:{PROJECT_URL}"
