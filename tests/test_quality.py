"""The code base stays lint-clean, and the supervisor side never imports torch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.skip("ruff is not installed (update-runtime.sh --dev installs it)")
    result = subprocess.run([ruff, "check", "horde_worker", "tests"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_supervisor_side_does_not_import_torch():
    code = ("import sys, horde_worker.cli, horde_worker.local_mode, horde_worker.supervisor.loop, "
            "horde_worker.localhorde; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
