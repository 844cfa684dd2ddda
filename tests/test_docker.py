"""The Docker files: linted with hadolint, built from update-runtime.sh (no second list of dependencies), one
compose service per GPU. (No image is built here: no Docker daemon and no registry for the CUDA wheels.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("name, mode", [("Dockerfile", "--cuda"), ("Dockerfile.rocm", "--rocm")])
def test_the_dockerfiles_lint_clean_and_install_the_way_volunteers_do(name, mode):
    result = subprocess.run([HADOLINT, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / name).read_text()
    assert f"./update-runtime.sh {mode}" in text and "pip install" not in text
    assert "USER 1000" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["/worker/.venv/bin/python", "-m", "horde_worker"]' in text
    assert "AIWORKER_DASHBOARD_HOST=0.0.0.0" in text


def test_the_linter_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nCMD python -m horde_worker\n")
    result = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # the check can fail


def test_compose_runs_one_service_per_gpu():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert len(services) >= 2
    gpus, ports, names = [], [], []
    for service in services.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        gpus += [d for device in devices for d in device["device_ids"]]
        ports += [port.split(":")[1] for port in service["ports"]]
        names.append(service["environment"]["AIWORKER_DREAMER_NAME"])
        mounts = {volume.split(":")[1] for volume in service["volumes"]}
        assert {"/worker/bridgeData.yaml", "/worker/models", "/worker/logs"} <= mounts
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])  # the dashboard stays local
    assert len(set(gpus)) == len(gpus) == len(services)
    assert len(set(ports)) == len(ports) and len(set(names)) == len(names)
