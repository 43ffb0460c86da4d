"""The systemd unit is valid and hardened (checked offline with systemd-analyze)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.core import config, sandbox
from tests.peers import REPO

UNIT = REPO / "systemd" / "appliance.service"
OVERLAY = REPO / "image-build" / "overlay" / "usr" / "lib"
IMAGE_DROPIN = OVERLAY / "systemd" / "system" / "appliance.service.d" / "image.conf"
IMAGE_TMPFILES = OVERLAY / "tmpfiles.d" / "appliance.conf"


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


def test_config_is_checked_by_the_main_process_not_exec_start_pre() -> None:
    # systemd 252 restarts a unit whose ExecStartPre= exits 78 despite
    # RestartPreventExitStatus=78 (booted: tests/test_systemd_boot.py, docs/systemd.md);
    # `appliance run` checks the config itself.
    assert not re.search(r"^ExecStartPre=", UNIT.read_text(), re.M)


def settings(name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.M)


def test_system_calls_the_daemon_needs_are_allowed_after_the_groups_that_deny_them() -> None:
    # The lines apply in order: a later plain line adds back what a "~" line removed.
    lines = settings("SystemCallFilter")
    assert lines[0] == "@system-service"
    deny = next(i for i, ln in enumerate(lines) if ln.startswith("~"))
    assert "@resources" in lines[deny]
    allowed_after = {c for ln in lines[deny + 1:] if not ln.startswith("~") for c in ln.split()}
    assert {"mbind", "setpriority", "sched_setscheduler"} <= allowed_after


def test_a_denied_system_call_fails_with_eperm_instead_of_killing() -> None:
    assert settings("SystemCallErrorNumber") == ["EPERM"]


def test_core_dumps_are_off_and_resources_are_bounded() -> None:
    assert settings("LimitCORE") == ["0"]
    assert settings("TasksMax") and settings("MemoryHigh") and settings("MemoryMax")


def test_a_directory_destination_on_a_nas_is_mounted_before_the_daemon_starts() -> None:
    assert "remote-fs.target" in settings("After")[0].split()


# --- the reading center's ingest unit ---------------------------------------------------------

INGEST_UNIT = REPO / "systemd" / "appliance-ingest.service"


def test_ingest_unit_verifies_apart_from_the_not_installed_binary() -> None:
    r = _analyze("verify", str(INGEST_UNIT))
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "/opt/appliance/venv/bin/appliance is not executable" not in ln]
    assert problems == []


def test_ingest_unit_exposure_is_low() -> None:
    r = _analyze("security", "--offline=yes", str(INGEST_UNIT))
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0


def test_ingest_unit_is_notify_with_watchdog_no_capabilities_and_no_restart_on_config_error() -> None:
    text = INGEST_UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^RestartPreventExitStatus=78$", text, re.M)
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert re.search(r"^ExecStart=\S+ ingest --config ", text, re.M)
    main = {ln for ln in UNIT.read_text().splitlines() if ln.startswith("SystemCallFilter=")}
    assert {ln for ln in text.splitlines() if ln.startswith("SystemCallFilter=")} == main


def test_the_unit_and_the_image_let_the_daemon_write_only_the_remote_config_folder(tmp_path: Path) -> None:
    """ops/desired.py writes config.remote_dir of the config the daemon runs: under the
    shipped unit (--config /etc/appliance/appliance.toml) and on the image (the imported
    /data/config/current/appliance.toml, a link: its remote.d is beside the link)."""
    granted = sandbox.parse_read_write_paths(UNIT.read_text())
    assert config.remote_dir(Path("/etc/appliance/appliance.toml")) in granted
    assert Path("/etc/appliance/conf.d") not in granted  # the technician's drop-ins stay read-only
    (tmp_path / "site-1").mkdir()
    (tmp_path / "current").symlink_to("site-1")
    assert config.remote_dir(tmp_path / "current" / "appliance.toml") == tmp_path / config.REMOTE_DIR
    image = sandbox.parse_read_write_paths(IMAGE_DROPIN.read_text())
    assert image == [config.SITE_CONFIG_DIR / config.REMOTE_DIR]
    assert f"d {config.SITE_CONFIG_DIR / config.REMOTE_DIR} 0700 appliance appliance -\n" \
        in IMAGE_TMPFILES.read_text()
