"""appliance/update/rauc.py against a stand-in `rauc` (a script): RAUC's JSON read the
way RAUC 1.8 writes it, its errors and its "already processing" answer while it installs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.update import rauc

STATUS: dict[str, Any] = {
    "compatible": "teleradiology-edge-appliance/x86_64", "variant": "", "booted": "A",
    "boot_primary": "rootfs.1",
    "slots": [
        {"rootfs.0": {"class": "rootfs", "device": "/dev/disk/by-partuuid/x2", "type": "ext4",
                      "bootname": "A", "state": "booted", "parent": None, "mountpoint": "/",
                      "boot_status": "good",
                      "slot_status": {"bundle": {"compatible": "c", "version": "1.0"}}}},
        {"rootfs.1": {"class": "rootfs", "device": "/dev/disk/by-partuuid/x3", "type": "ext4",
                      "bootname": "B", "state": "inactive", "parent": None, "mountpoint": None,
                      "boot_status": "good",
                      "slot_status": {"bundle": {"compatible": "c", "version": "1.1"}}}},
    ],
}


def fake_rauc(tmp_path: Path, busy_times: int = 0, fail: str | None = None) -> Path:
    """A `rauc` that answers STATUS, busy the first `busy_times` calls, or fails."""
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    script = tmp_path / "rauc"
    script.write_text(f"""#!/bin/sh
n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/calls
echo "$@" >> {tmp_path}/args
if [ "$n" -lt {busy_times} ]; then
  echo 'Error calling D-Bus method "GetSlotStatus": already processing a different method' >&2; exit 1
fi
{f"echo 'rauc-Message: checking' >&2; echo '{fail}' >&2; exit 1" if fail else ""}
cat {tmp_path}/status.json
""")
    script.chmod(0o755)
    return script


def test_status_names_the_primary_slot_and_the_installed_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rauc, "RAUC", str(fake_rauc(tmp_path)))
    st = rauc.status()
    assert rauc.primary_bootname(st) == "B"
    assert rauc.installed_versions(st) == {"1.0", "1.1"}
    assert (tmp_path / "args").read_text().split() == ["status", "--detailed", "--output-format=json"]


def test_busy_service_is_asked_again_until_it_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rauc, "RAUC", str(fake_rauc(tmp_path, busy_times=2)))
    monkeypatch.setattr(rauc, "BUSY_POLL_S", 0.01)
    assert rauc.status()["booted"] == "A"
    assert (tmp_path / "calls").read_text().strip() == "3"


def test_failure_is_an_update_error_with_raucs_last_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rauc, "RAUC", str(fake_rauc(tmp_path, fail="signature verification failed")))
    with pytest.raises(rauc.UpdateError, match="rauc install failed: signature verification failed"):
        rauc.install(tmp_path / "update.raucb")
    assert (tmp_path / "calls").read_text().strip() == "1"  # not busy: not asked again


def test_mark_takes_only_good_or_bad_of_booted_or_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rauc, "RAUC", str(fake_rauc(tmp_path)))
    rauc.mark("bad", "other")
    assert (tmp_path / "args").read_text().split() == ["status", "mark-bad", "other"]
    with pytest.raises(ValueError):
        rauc.mark("active", "booted")
