"""The hand-off of a remote update from the unprivileged worker to the root install unit
(update/handoff.py; docs/updates.md "Remote updates").

The command end to end in process as tests/test_update_remote.py runs it (a signed
envelope, the Runner, the worker as a real subprocess, a real HTTPS server, the stand-in
`rauc`), with the hand-off forced (APPLIANCE_UPDATE_HANDOFF=1: these tests run as root,
where the worker would install itself), and the root side run as the path unit runs it:
`appliance update-install`, started once the request appears. Under the real units
(the daemon as the `appliance` user, the path unit as root) it is in
tests/test_systemd_boot.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core import config
from appliance.update import handoff
from tests.bundle_server import BundleServer
from tests.peers import base_config, cli, to_toml, wait_for
from tests.test_update_remote import DATA, SHA, Center, centers, fake_rauc, quick_retries  # noqa: F401


class RootSide:
    """What appliance-update-install.path does: run `appliance update-install` when the
    request appears (once)."""

    def __init__(self, center: Center) -> None:
        self.center = center
        self.request = handoff.folder(center.cfg) / handoff.REQUEST
        self.ran: list[subprocess.CompletedProcess[str]] = []
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        wait_for(self.request.exists, 120, "the worker's request")
        self.ran.append(cli("update-install", "--config", str(self.center.config_path), timeout=120))


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("APPLIANCE_UPDATE_HANDOFF", "1")
    yield from centers(tmp_path, monkeypatch)


def test_handed_off_bundle_is_installed_by_the_root_command_and_reported_as_installed(
        tmp_path: Path, box: Any) -> None:
    make, rauc_dir = box
    with BundleServer(tmp_path / "srv", DATA) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], ca=str(srv.ca))
        root = RootSide(c)
        res = c.send({"url": srv.url, "sha256": SHA, "reboot": False})
        kind, fields = c.outcome()
    assert (kind, fields) == ("update.installed", {"cmd_id": res["cmd_id"], "bundle_version": "2.0",
                                                   "slot": "B", "reboot": False})
    root.thread.join(30)
    assert root.ran[0].returncode == 0, root.ran[0].stdout + root.ran[0].stderr
    ready = handoff.folder(c.cfg)
    assert f"install {ready / SHA}.raucb" in (rauc_dir / "args").read_text()
    assert list(ready.iterdir()) == []  # bundle, request and result all gone
    trial = json.loads((tmp_path / "data" / "trial.json").read_text())
    assert (trial["slot"], trial["version"]) == ("B", "2.0")


def test_handed_off_bundle_rauc_refuses_is_reported_as_refused_and_removed(
        tmp_path: Path, box: Any) -> None:
    make, _ = box
    with BundleServer(tmp_path / "srv", DATA) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], refuse=True, ca=str(srv.ca))
        RootSide(c)
        c.send({"url": srv.url, "sha256": SHA, "reboot": False})
        kind, fields = c.outcome()
    assert (kind, fields["reason"]) == ("update.refused", "rauc refused")
    assert list(handoff.folder(c.cfg).iterdir()) == []
    assert not (tmp_path / "data" / "trial.json").exists()


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(base_config(tmp_path, 11112)))
    return config.load(path)


@pytest.fixture
def ready(tmp_path: Path, cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The root side's stage: the stand-in `rauc` (tmp_path/bin) first on PATH, the trial
    record in tmp_path/data, and the hand-off folder made; the folder."""
    rauc_dir = fake_rauc(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{rauc_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APPLIANCE_UPDATE_TRIAL", str(tmp_path / "data" / "trial.json"))
    folder = handoff.folder(cfg)
    folder.mkdir(parents=True)
    return folder


def request(ready: Path, cmd_id: str, reboot: bool) -> None:
    (ready / handoff.REQUEST).write_text(json.dumps({"sha256": SHA, "cmd_id": cmd_id, "reboot": reboot}))


def test_a_request_for_a_bundle_that_is_a_link_is_not_installed(
        tmp_path: Path, cfg: config.Config, ready: Path) -> None:
    (tmp_path / "elsewhere").write_bytes(DATA)
    (ready / f"{SHA}.raucb").symlink_to(tmp_path / "elsewhere")
    request(ready, "c1", False)
    result, reboot = handoff.install(cfg)
    assert (result, reboot) == ({"step": "update.failed", "reason": "bad request", "sha256": SHA,
                                 "cmd_id": "c1"}, False)
    assert not (tmp_path / "bin" / "args").exists()  # RAUC never asked
    assert sorted(p.name for p in ready.iterdir()) == [handoff.RESULT]


def test_the_result_replaces_a_link_planted_under_its_name_without_writing_through_it(
        tmp_path: Path, cfg: config.Config, ready: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    (ready / handoff.RESULT).symlink_to(victim)
    (ready / f"{SHA}.raucb").write_bytes(DATA)
    request(ready, "c1", True)
    result, reboot = handoff.install(cfg)
    assert result is not None and result["step"] == "update.installed" and reboot is True
    assert victim.read_text() == "root's file\n"
    assert not (ready / handoff.RESULT).is_symlink()
    assert json.loads((ready / handoff.RESULT).read_text())["slot"] == "B"


def test_the_result_carries_the_requests_cmd_id(
        tmp_path: Path, cfg: config.Config, ready: Path) -> None:
    (ready / f"{SHA}.raucb").write_bytes(DATA)
    request(ready, "0123abcd", False)
    handoff.install(cfg)
    assert json.loads((ready / handoff.RESULT).read_text())["cmd_id"] == "0123abcd"


def test_an_install_step_raising_unexpectedly_still_answers_failed_and_clears_the_request(
        tmp_path: Path, cfg: config.Config, ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else the request stays and the path unit (PathExists=) starts the service again, in a loop."""
    from appliance.cli import update as cli_update

    def broken(*_: Any) -> str:
        raise RuntimeError("a bug the install step did not expect")
    monkeypatch.setattr(cli_update, "install", broken)
    (ready / f"{SHA}.raucb").write_bytes(DATA)
    request(ready, "c2", True)
    result, reboot = handoff.install(cfg)
    assert (result, reboot) == ({"step": "update.failed", "reason": "internal error",
                                 "error_type": "RuntimeError", "sha256": SHA, "cmd_id": "c2"}, False)
    assert sorted(p.name for p in ready.iterdir()) == [handoff.RESULT]  # request and bundle gone
    assert json.loads((ready / handoff.RESULT).read_text()) == result


def test_a_result_that_cannot_be_written_still_clears_the_request(
        tmp_path: Path, cfg: config.Config, ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.core import durable

    def no_room(*_: Any, **__: Any) -> Any:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(durable, "atomic_file", no_room)
    (ready / f"{SHA}.raucb").write_bytes(DATA)
    request(ready, "c3", False)
    with pytest.raises(OSError):
        handoff.install(cfg)
    assert list(ready.iterdir()) == []


def test_update_install_without_a_request_does_nothing(tmp_path: Path, cfg: config.Config) -> None:
    assert handoff.install(cfg) == (None, False)
    assert not handoff.folder(cfg).exists()


def _plant_request(c: Center, cmd_id: str) -> Path:
    ready = handoff.folder(c.cfg)
    ready.mkdir(parents=True)
    (ready / f"{SHA}.raucb").write_bytes(DATA)
    request(ready, cmd_id, False)
    return ready


def test_pending_handoff_found_at_start_refuses_a_new_update_until_answered(tmp_path: Path, box: Any) -> None:
    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    _plant_request(c, "c4")
    c.runner.recover()
    res = c.send({"url": "https://127.0.0.1:1/updates/u.raucb", "sha256": SHA})
    assert res["code"] == 422 and "already in progress" in res["detail"]
    RootSide(c)  # now the root side answers
    assert c.outcome() == ("update.installed", {"cmd_id": "c4", "bundle_version": "2.0", "slot": "B",
                                                "reboot": False})


def test_pending_handoff_never_answered_is_reported_as_timeout_and_withdrawn(
        tmp_path: Path, box: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    ready = _plant_request(c, "c5")
    monkeypatch.setattr(handoff, "WAIT_S", 2.0)
    monkeypatch.setattr(handoff, "POLL_S", 0.2)
    c.runner.recover()
    assert c.outcome() == ("update.failed", {"cmd_id": "c5", "reason": "timeout"})
    assert list(ready.iterdir()) == []  # a root side starting later finds nothing to do


def _units_with_the_path_unit(tmp_path: Path) -> Path:
    units = tmp_path / "units"
    units.mkdir()
    shipped = Path(__file__).resolve().parents[1] / "systemd" / handoff.PATH_UNIT
    (units / handoff.PATH_UNIT).write_text(shipped.read_text())
    return units


def _update_config(tmp_path: Path) -> Path:
    doc = base_config(tmp_path, 11112)
    doc["update"] = {"sources": ["https://127.0.0.1:1/updates/"]}
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(doc))
    cli("keys", "init", "--config", str(path), check=True)
    return path


def test_config_check_warns_when_the_path_unit_does_not_watch_this_state_dir(tmp_path: Path) -> None:
    units, path = _units_with_the_path_unit(tmp_path), _update_config(tmp_path)
    r = cli("config", "check", "--unit-dir", str(units), "--config", str(path))
    assert r.returncode == 0, r.stderr
    want = handoff.folder(config.load(path)) / handoff.REQUEST
    assert f"watches /var/lib/appliance/update-ready/request.json, not {want}" in r.stderr


def test_config_check_says_nothing_of_the_path_unit_once_a_drop_in_watches_this_state_dir(
        tmp_path: Path) -> None:
    units, path = _units_with_the_path_unit(tmp_path), _update_config(tmp_path)
    want = handoff.folder(config.load(path)) / handoff.REQUEST
    dropins = units / f"{handoff.PATH_UNIT}.d"
    dropins.mkdir()
    (dropins / "state-dir.conf").write_text(f"[Path]\nPathExists=\nPathExists={want}\n")
    assert handoff.watched((units,)) == [want]  # the shipped path reset by the empty line
    r = cli("config", "check", "--unit-dir", str(units), "--config", str(path))
    assert r.returncode == 0 and handoff.PATH_UNIT not in r.stderr, r.stderr
