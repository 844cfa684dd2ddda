@echo off
rem Sets up (or updates) the worker's Python runtime in .venv.
rem   update-runtime.cmd             CUDA build of torch (NVIDIA GPUs; the default)
rem   update-runtime.cmd --directml  DirectML (any DirectX 12 GPU: AMD, Intel, NVIDIA)
rem   update-runtime.cmd --cpu       torch for the CPU (slow; for trying and testing)
rem   update-runtime.cmd --dev       also install the test tools (pytest, ruff)
setlocal
cd /d "%~dp0"
set TORCH_VERSION=2.14.1
set TORCHVISION_VERSION=0.29.1
set MODE=cuda
set DEV=0
:args
if "%~1"=="" goto done_args
if "%~1"=="--cuda" set MODE=cuda
if "%~1"=="--cpu" set MODE=cpu
if "%~1"=="--directml" set MODE=directml
if "%~1"=="--rocm" (echo ROCm runs on Linux only: use update-runtime.sh --rocm & exit /b 2)
if "%~1"=="--dev" set DEV=1
shift
goto args
:done_args
if not exist .venv\Scripts\python.exe (
  echo creating .venv
  python -m venv .venv || (echo Python 3.11 or newer is needed on PATH & exit /b 2)
)
set PIP=.venv\Scripts\python.exe -m pip install --disable-pip-version-check -q
echo installing torch for %MODE%
if "%MODE%"=="cuda" %PIP% --index-url https://download.pytorch.org/whl/cu128 torch==%TORCH_VERSION% torchvision==%TORCHVISION_VERSION% || exit /b 1
if "%MODE%"=="cpu" %PIP% torch==%TORCH_VERSION% torchvision==%TORCHVISION_VERSION% || exit /b 1
rem torch-directml brings the torch release it supports.
if "%MODE%"=="directml" %PIP% torch-directml || exit /b 1
echo installing the worker
if "%DEV%"=="1" (%PIP% -e ".[test]" || exit /b 1) else (%PIP% -e . || exit /b 1)
rem facexlib asks for the GUI build of OpenCV, which clashes with the headless one: no requirements for it
%PIP% --no-deps facexlib==0.3.0 filterpy==2.0.0 || exit /b 1
echo %MODE%> .venv\runtime-mode
echo runtime ready (%MODE%). Start the worker with horde-bridge.cmd
