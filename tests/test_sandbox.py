"""The folders the systemd unit lets the daemon write, and the drop-in that widens them.

Pure rules (`appliance.core.sandbox`), the CLI that prints or writes the drop-in and names
it in `config check`, `appliance run` refusing a state_dir on a read-only mount (exit 78,
which the unit does not restart), and a directory destination on one being held with the
fix named. The same paths under the real unit: tests/test_systemd_boot.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.core import config, sandbox
from appliance.core.errors import EX_CONFIG
from tests.peers import REPO, base_config, cli, in_read_only_bind, to_toml

UNIT = REPO / "systemd" / "appliance.service"
NAS = "/mnt/nas-that-is-not-here/outbox"  # never created: config check only reads paths


def load(tmp_path: Path, **changes: Any) -> config.Config:
    cfg = base_config(tmp_path, 11112)
    cfg["appliance"]["state_dir"] = "/var/lib/appliance"
    cfg["destinations"] = [{"name": "local", "transport": "directory",
                            "path": "/var/lib/appliance/outbox"}]
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    return config.load(path)


def with_nas(tmp_path: Path) -> config.Config:
    load(tmp_path)
    path = tmp_path / "appliance.toml"
    path.write_text(path.read_text() + to_toml(
        {"destinations": [{"name": "nas", "transport": "directory", "path": NAS}]}))
    return config.load(path)


# --- the rules --------------------------------------------------------------------------


def test_writable_table_is_what_the_unit_grants() -> None:
    text = UNIT.read_text()
    assert tuple(sandbox.parse_read_write_paths(text)) == sandbox.UNIT_WRITABLE
    assert "StateDirectory=appliance\n" in text  # also /var/lib/appliance


def test_hidden_table_matches_the_units_private_folders() -> None:
    text = UNIT.read_text()
    assert "PrivateTmp=yes\n" in text and "ProtectHome=yes\n" in text
    private = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")  # noqa: S108 - names, not files
    assert set(sandbox.UNIT_HIDDEN) == {Path(p) for p in private}


def test_the_default_paths_need_no_dropin(tmp_path: Path) -> None:
    assert sandbox.problems(load(tmp_path), (), sandbox.dropin_path()) == []


def test_a_destination_outside_names_the_dropin_and_the_command(tmp_path: Path) -> None:
    dropin = Path("/etc/systemd/system/appliance.service.d/paths.conf")
    found = sandbox.problems(with_nas(tmp_path), (), dropin)
    assert [k for k, _ in found] == ["destinations[1].path"]
    msg = found[0][1]
    assert NAS in msg and "/etc/systemd/system/appliance.service.d/paths.conf" in msg
    assert "appliance config systemd-dropin --write" in msg and "daemon-reload" in msg


def test_a_granted_folder_covers_the_folders_below_it(tmp_path: Path) -> None:
    assert sandbox.problems(with_nas(tmp_path), (Path("/mnt/nas-that-is-not-here"),), Path("x")) == []


def test_a_folder_next_to_a_granted_one_is_not_covered(tmp_path: Path) -> None:
    found = sandbox.problems(with_nas(tmp_path), (Path("/mnt/nas-that-is"),), Path("x"))
    assert [k for k, _ in found] == ["destinations[1].path"]


def test_a_moved_state_dir_needs_the_dropin(tmp_path: Path) -> None:
    found = sandbox.problems(load(tmp_path, appliance__state_dir="/data/appliance"), (), Path("x"))
    assert [k for k, _ in found] == ["appliance.state_dir"]


def test_a_folder_the_unit_hides_cannot_be_fixed_by_a_dropin(tmp_path: Path) -> None:
    # tmp_path is under /tmp, which the unit's PrivateTmp= replaces; even "/" granted
    found = sandbox.problems(load(tmp_path, appliance__state_dir=str(tmp_path / "state")),
                             (Path("/"),), Path("x"))
    assert [k for k, _ in found] == ["appliance.state_dir"]
    assert "PrivateTmp=yes" in found[0][1] and "choose a folder elsewhere" in found[0][1]


def test_dropin_grants_each_outside_folder_once_and_tolerates_a_missing_share(tmp_path: Path) -> None:
    text = sandbox.dropin_text(with_nas(tmp_path))
    assert "[Service]\n" in text
    assert [ln for ln in text.splitlines() if ln.startswith("ReadWritePaths=")] == [
        f'ReadWritePaths="-{NAS}"']


def test_dropin_text_reads_back_as_what_it_grants(tmp_path: Path) -> None:
    c = load(tmp_path, appliance__state_dir="/data/100% appliance")
    granted = sandbox.parse_read_write_paths(sandbox.dropin_text(c))
    assert granted == [Path("/data/100% appliance")]
    assert sandbox.problems(c, tuple(granted), Path("x")) == []


@pytest.mark.parametrize(("line", "paths"), [
    ("ReadWritePaths=/a -/b +/c", ["/a", "/b", "/c"]),
    ('ReadWritePaths="-/with space" /d', ["/with space", "/d"]),
    ("ReadWritePaths = /e/../f", ["/f"]),
    ("ReadWritePaths=/g\nReadWritePaths=\nReadWritePaths=/h", ["/h"]),  # empty resets
    ("ReadOnlyPaths=/i\n# ReadWritePaths=/j", []),
])
def test_read_write_paths_are_parsed_as_systemd_does(line: str, paths: list[str]) -> None:
    assert sandbox.parse_read_write_paths(line) == [Path(p) for p in paths]


# --- the CLI ----------------------------------------------------------------------------


def write(tmp_path: Path, cfg: dict[str, Any]) -> str:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    cli("keys", "init", "--config", str(path), check=True)
    return str(path)


def nas_site(tmp_path: Path) -> dict[str, Any]:
    """Keys in tmp (checked as files), the daemon's folders where the unit has them."""
    cfg = base_config(tmp_path, 11112)
    cfg["appliance"]["state_dir"] = "/var/lib/appliance"
    cfg["destinations"] = [{"name": "nas", "transport": "directory", "path": NAS}]
    return cfg


def test_systemd_dropin_prints_the_dropin(tmp_path: Path) -> None:
    r = cli("config", "systemd-dropin", "--config", write(tmp_path, nas_site(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert f'ReadWritePaths="-{NAS}"' in r.stdout.splitlines()


def test_config_check_with_systemd_names_the_missing_dropin_then_passes_once_written(tmp_path: Path) -> None:
    path = write(tmp_path, nas_site(tmp_path))
    units = tmp_path / "units"
    r = cli("config", "check", "--systemd", "--unit-dir", str(units), "--config", path)
    assert r.returncode == EX_CONFIG
    assert f"destinations[0].path: {NAS} is read-only" in r.stderr
    assert str(units / "appliance.service.d" / "paths.conf") in r.stderr

    w = cli("config", "systemd-dropin", "--write", "--unit-dir", str(units), "--config", path)
    assert w.returncode == 0, w.stderr
    written = units / "appliance.service.d" / "paths.conf"
    assert oct(written.stat().st_mode & 0o777) == "0o644"  # read by the service user's check
    assert cli("config", "check", "--systemd", "--unit-dir", str(units), "--config", path).returncode == 0


def test_config_check_without_systemd_and_no_unit_installed_ignores_the_unit(tmp_path: Path) -> None:
    if sandbox.unit_installed():
        pytest.fail("the appliance unit is installed on this machine: this test needs a machine without it")
    assert cli("config", "check", "--config", write(tmp_path, nas_site(tmp_path))).returncode == 0


def test_systemd_dropin_refuses_a_hidden_folder(tmp_path: Path) -> None:
    cfg = nas_site(tmp_path)
    cfg["destinations"][0]["path"] = "/tmp/outbox-in-private-tmp"  # noqa: S108 - only a name
    r = cli("config", "systemd-dropin", "--config", write(tmp_path, cfg))
    assert r.returncode == EX_CONFIG
    assert "destinations[0].path: /tmp/outbox-in-private-tmp is inside /tmp" in r.stderr


# --- on a read-only mount (a private mount namespace per test; needs root) ----------------


@pytest.mark.root
def test_run_refuses_a_state_dir_on_a_read_only_mount_with_exit_78(tmp_path: Path) -> None:
    cfg = base_config(tmp_path, 11112)
    (tmp_path / "state").mkdir()
    path = write(tmp_path, cfg)
    r = in_read_only_bind(tmp_path / "state", sys.executable, "-m", "appliance", "run", "--config", path)
    assert r.returncode == EX_CONFIG, r.stderr
    assert f"appliance.state_dir: {tmp_path / 'state'} is on a read-only file system" in r.stderr
    assert "appliance config systemd-dropin --write" in r.stderr


@pytest.mark.root
def test_read_only_is_judged_on_the_nearest_existing_folder(tmp_path: Path) -> None:
    assert sandbox.read_only(tmp_path / "not" / "yet") is False
    code = "import sys; from pathlib import Path; from appliance.core import sandbox;" \
           " print(sandbox.read_only(Path(sys.argv[1]) / 'not' / 'yet'))"
    r = in_read_only_bind(tmp_path, sys.executable, "-c", code, str(tmp_path))
    assert r.stdout.strip() == "True", r.stderr
