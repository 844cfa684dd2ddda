#!/usr/bin/env bash
# Starts the worker; sets up the runtime first if it is missing.
# Without bridgeData.yaml (and without AIWORKER_API_KEY) it runs in local mode, offline.
#   ./horde-bridge.sh                     serve the horde configured in bridgeData.yaml
#   ./horde-bridge.sh --local --jobs 4    try the whole loop offline with 4 sample requests
#   ./horde-bridge.sh --help              every option
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$here/.venv/bin/python" ] || ! "$here/.venv/bin/python" -c "import torch, diffusers, facexlib, rembg, spandrel_extra_arches, horde_worker" 2>/dev/null; then
  echo "the runtime is missing or incomplete: running update-runtime.sh first"
  "$here/update-runtime.sh"
fi
exec "$here/.venv/bin/python" -m horde_worker "$@"
