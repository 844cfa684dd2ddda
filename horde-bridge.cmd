@echo off
rem Starts the worker; sets up the runtime first if it is missing.
rem Without bridgeData.yaml (and without AIWORKER_API_KEY) it runs in local mode, offline.
setlocal
cd /d "%~dp0"
.venv\Scripts\python.exe -c "import torch, diffusers, facexlib, rembg, spandrel_extra_arches, horde_worker" 2>nul || (
  echo the runtime is missing or incomplete: running update-runtime.cmd first
  call update-runtime.cmd || exit /b 1
)
set DEVICE_ARG=
findstr /x directml .venv\runtime-mode >nul 2>&1 && set DEVICE_ARG=--device directml
.venv\Scripts\python.exe -m horde_worker %DEVICE_ARG% %*
