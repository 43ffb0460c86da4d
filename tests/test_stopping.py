"""How long the daemon's stop may take, against the systemd unit's TimeoutStopSec=
(appliance/stopping.py; `appliance config check` warns, docs/systemd.md "Stop timeout").
The stop itself runs under real daemons in tests/test_forward_isolation.py,
test_watchdog.py and test_pipeline.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from appliance import stopping
from appliance.core import config
from appliance.core.config import Config
from tests.peers import REPO, base_config, cli, to_toml

MAIN = Path("/etc/appliance/appliance.toml")
SHIPPED_UNITS = REPO / "systemd"
EVERYTHING: dict[str, Any] = {  # every section whose stop waits beyond the stages
    "operations": {"host": "ops.example", "ca": "/k/ca.pem", "cert": "/k/c.pem", "key": "/k/c.key"},
    "update": {"sources": ["https://updates.example/appliance/"]},
    "audit": {"syslog_host": "audit.hospital.example", "syslog_ca": "/k/ca.pem"},
}


def parsed(dimse_timeout_s: float = 60, **sections: Any) -> Config:
    return config.parse({"receive": {"callers": [{"ae_title": "CT"}], "dimse_timeout_s": dimse_timeout_s},
                         **sections}, {}, MAIN)


def units_with(tmp_path: Path, dropin: str | None = None) -> Path:
    """A unit folder holding the shipped unit and, if given, one drop-in."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "appliance.service").write_text((SHIPPED_UNITS / "appliance.service").read_text())
    if dropin is not None:
        (units / "appliance.service.d").mkdir()
        (units / "appliance.service.d" / "timeout.conf").write_text(dropin)
    return units


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("1min 30s", 90.0), ("1min30s", 90.0), ("2m", 120.0),
    ("500ms", 0.5), ("1h", 3600.0), ("infinity", math.inf),
    ("ninety", None), ("", None), ("90 parsecs", None), ("-5", None)])
def test_a_systemd_time_span_is_read_as_systemd_reads_it(text: str, seconds: float | None) -> None:
    assert stopping.parse_timespan(text) == seconds


def test_the_check_assumes_the_stop_timeout_the_shipped_unit_sets() -> None:
    got = stopping.unit_timeout_stop_s((SHIPPED_UNITS,))
    assert got is not None and got[0] == stopping.SHIPPED_TIMEOUT_STOP_S


def test_the_stop_budget_is_the_dimse_timeout_and_the_pool_grace_without_other_sections() -> None:
    assert stopping.budget_s(parsed(100)) == 100 + stopping.POOL_STOP_GRACE_S


def test_the_stop_budget_adds_the_ops_link_update_worker_and_audit_sender_waits() -> None:
    assert stopping.budget_s(parsed(60, **EVERYTHING)) - stopping.budget_s(parsed(60)) == 25.0


def test_the_default_dimse_timeout_fits_the_shipped_unit_with_every_section() -> None:
    assert stopping.timeout_warnings(parsed(60, **EVERYTHING), (SHIPPED_UNITS,)) == []


def test_a_dimse_timeout_past_the_unit_warns_naming_the_key_the_setting_and_a_drop_in(tmp_path: Path) -> None:
    [w] = stopping.timeout_warnings(parsed(120), (units_with(tmp_path),))
    assert w.startswith("receive.dimse_timeout_s: a stop may take 125 s")
    assert "TimeoutStopSec=90s" in w
    assert "appliance.service.d/timeout.conf with [Service] and TimeoutStopSec=135s" in w


def test_without_an_installed_unit_the_shipped_unit_is_assumed(tmp_path: Path) -> None:
    [w] = stopping.timeout_warnings(parsed(120), (tmp_path,))
    assert "TimeoutStopSec=90s (the shipped appliance.service)" in w


def test_a_drop_in_that_raises_the_stop_timeout_ends_the_warning(tmp_path: Path) -> None:
    units = units_with(tmp_path, "[Service]\nTimeoutStopSec=3min\n")
    assert stopping.unit_timeout_stop_s((units,)) == (180.0, str(units / "appliance.service.d/timeout.conf"))
    assert stopping.timeout_warnings(parsed(120), (units,)) == []


def test_timeout_sec_in_a_drop_in_sets_the_stop_timeout_too(tmp_path: Path) -> None:
    units = units_with(tmp_path, "[Service]\nTimeoutSec=200\n")
    assert stopping.unit_timeout_stop_s((units,)) == (200.0, str(units / "appliance.service.d/timeout.conf"))


def test_an_empty_assignment_is_systemds_default_and_a_bad_one_is_ignored(tmp_path: Path) -> None:
    units = units_with(tmp_path, "[Service]\nTimeoutStopSec=600\nTimeoutStopSec=\nTimeoutStopSec=soon\n")
    assert stopping.unit_timeout_stop_s((units,)) == (
        stopping.SYSTEMD_DEFAULT_TIMEOUT_STOP_S, str(units / "appliance.service.d/timeout.conf"))


def test_config_check_warns_and_passes_when_a_stop_may_outlast_the_unit(tmp_path: Path) -> None:
    doc = base_config(tmp_path, 11112, dimse_timeout_s=300)
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(doc))
    cli("keys", "init", "--config", str(path), check=True)
    r = cli("config", "check", "--unit-dir", str(units_with(tmp_path)), "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "warning: receive.dimse_timeout_s: a stop may take 305 s" in r.stderr
    assert "TimeoutStopSec=315s" in r.stderr
