#!/usr/bin/env bash
# Sets up (or updates) the worker's Python runtime in .venv.
#   ./update-runtime.sh            CUDA build of torch (NVIDIA GPUs; the default)
#   ./update-runtime.sh --rocm     ROCm build of torch (AMD GPUs)
#   ./update-runtime.sh --cpu      torch for running on the CPU (slow; for trying and testing)
#   ./update-runtime.sh --dev      also install the test tools (pytest, ruff)
# DirectML (Windows) is set up by update-runtime.cmd --directml.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
FACEXLIB_VERSION="0.3.0"
FILTERPY_VERSION="2.0.0"
ROCM_INDEX="https://download.pytorch.org/whl/rocm6.4"
mode=""
dev=0
for arg in "$@"; do
  case "$arg" in
    --cuda) mode=cuda ;;
    --rocm) mode=rocm ;;
    --cpu) mode=cpu ;;
    --directml) echo "DirectML runs on Windows only: use update-runtime.cmd --directml" >&2; exit 2 ;;
    --dev) dev=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$mode" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then mode=cuda
  elif command -v rocminfo >/dev/null 2>&1; then mode=rocm
  else mode=cpu; fi
fi

python_bin="${PYTHON:-python3}"
if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3)." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

echo "installing torch $TORCH_VERSION for $mode"
case "$mode" in
  # On Linux the torch wheels of the package index are CUDA builds; they also run on the CPU.
  cuda|cpu) "${pip[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" ;;
  rocm) "${pip[@]}" --index-url "$ROCM_INDEX" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" ;;
esac

echo "installing the worker"
if [ "$dev" = 1 ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
# facexlib (face detection and alignment for the face fixers) asks for the GUI build of OpenCV, which
# clashes with the headless one the worker uses: install it and filterpy without their requirements.
"${pip[@]}" --no-deps "facexlib==$FACEXLIB_VERSION" "filterpy==$FILTERPY_VERSION"
echo "$mode" > .venv/runtime-mode
echo "runtime ready ($mode). Start the worker with ./horde-bridge.sh"
