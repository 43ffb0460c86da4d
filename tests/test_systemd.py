"""The systemd unit is valid and hardened (checked offline with systemd-analyze)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.peers import REPO

UNIT = REPO / "systemd" / "appliance.service"


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze not found (Debian package systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def test_unit_verifies_apart_from_the_not_installed_binary() -> None:
    r = _analyze("verify", str(UNIT))
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "/opt/appliance/venv/bin/appliance is not executable" not in ln]
    assert problems == []


def test_unit_exposure_is_low() -> None:
    r = _analyze("security", "--offline=yes", str(UNIT))
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0


def test_unit_is_notify_with_watchdog_and_no_restart_on_config_error() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert "RestartPreventExitStatus=78" in text
