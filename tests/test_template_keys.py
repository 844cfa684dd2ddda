"""Every key of bridgeData_template.yaml is a setting the worker reads and acts on: a key that is accepted but
read nowhere fails here. Keys kept only for compatibility are out of the template, each with its reason."""

from __future__ import annotations

import re

import yaml

from horde_worker.config.bridge_data import NOT_YET_HONOURED, BridgeData
from tests.conftest import REPO

TEMPLATE = yaml.safe_load((REPO / "bridgeData_template.yaml").read_text())
DECLARATION = REPO / "horde_worker" / "config" / "bridge_data.py"


def _readers(key: str) -> list[str]:
    """Files of the package that read `key` as an attribute (the declaration itself aside)."""
    found = []
    for path in (REPO / "horde_worker").rglob("*.py"):
        text = path.read_text()
        if path == DECLARATION:
            text = re.sub(rf"^\s+{key}:.*$", "", text, flags=re.MULTILINE)  # the field line is no reader
        if re.search(rf"\.{key}\b", text):
            found.append(path.relative_to(REPO).as_posix())
    return found


def test_every_template_key_is_a_setting_that_is_read():
    unknown = [key for key in TEMPLATE if key not in BridgeData.model_fields]
    assert unknown == []
    unread = [key for key in TEMPLATE if not _readers(key)]
    assert unread == [], f"accepted but never read: {unread}"


def test_every_setting_is_in_the_template_unless_kept_for_compatibility():
    missing = [key for key in BridgeData.model_fields if key not in TEMPLATE and key not in NOT_YET_HONOURED]
    assert missing == []
    for key, reason in NOT_YET_HONOURED.items():
        assert key not in TEMPLATE and len(reason) > 20
        assert key in (REPO / "bridgeData_template.yaml").read_text()  # the template says why it is gone


def test_the_check_fails_for_a_key_nobody_reads():
    assert _readers("a_setting_nobody_reads") == []
    assert _readers("dashboard_port")  # and finds a real reader
