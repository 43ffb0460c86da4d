"""An operator's switches (forward/controls.py): forwarding paused and resumed, a
destination switched off and on, kept durably, carried out by the scheduler.

The scheduler tests use the real queue index and bundle files with two fake destinations
(tests/fake_transport.py, held to the transport contract); the daemon tests at the end
use the real daemon, DCMTK and directory destinations.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.errors import NotFoundError
from appliance.forward.controls import FILE, Controls
from appliance.forward.scheduler import Forwarder
from tests.fake_transport import FakeTransport
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for
from tests.test_forward_failover import CFG, FAR, Box
from tests.test_transport_contract import KEY

# --- the switches and their file ---


def test_a_pause_and_a_destination_off_are_kept_over_a_restart(tmp_path: Path) -> None:
    c = Controls(tmp_path, ["primary", "backup"])
    assert c.pause("alice", now=10.0) and c.switch_off("backup", "bob", now=11.0)
    again = Controls(tmp_path, ["primary", "backup"])
    assert again.paused is not None and (again.paused.since, again.paused.by) == (10.0, "alice")
    assert set(again.off()) == {"backup"} and again.off()["backup"].by == "bob"
    assert again.resume() and again.switch_on("backup")
    assert Controls(tmp_path, ["primary", "backup"]).snapshot() == {"paused": None, "off": {}}


def test_a_second_pause_keeps_the_first_and_says_nothing_changed(tmp_path: Path) -> None:
    c = Controls(tmp_path, ["primary"])
    assert c.pause("alice", now=1.0) is True
    assert c.pause("bob", now=2.0) is False
    assert c.paused is not None and c.paused.by == "alice"
    assert c.resume() is True and c.resume() is False


def test_an_unknown_destination_cannot_be_switched(tmp_path: Path) -> None:
    c = Controls(tmp_path, ["primary"])
    with pytest.raises(NotFoundError, match="no destination named 'nowhere'"):
        c.switch_off("nowhere", "alice")
    with pytest.raises(NotFoundError):
        c.switch_on("nowhere")
    assert not (tmp_path / FILE).exists()


def test_a_destination_dropped_from_the_config_is_forgotten(tmp_path: Path) -> None:
    Controls(tmp_path, ["primary", "old"]).switch_off("old", "alice")
    assert Controls(tmp_path, ["primary"]).off() == {}


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"paused": {"since": "x", "by": 1}}',
                                     b'{"off": {"primary": 5}}', b"x" * 70_000])
def test_an_unreadable_file_starts_with_nothing_switched_off(tmp_path: Path, content: bytes,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / FILE).write_bytes(content)
    c = Controls(tmp_path, ["primary"])
    assert c.paused is None and c.off() == {}
    assert "forward.controls_unreadable" in capsys.readouterr().out


# --- the scheduler ---


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    b.fwd = Forwarder(b.queue, [FakeTransport("primary", b.a, KEY), FakeTransport("backup", b.b, KEY)],
                      CFG, budget_base_s=60, controls=Controls(tmp_path, ["primary", "backup"]))
    yield b
    b.queue.index.close()


def test_paused_no_item_is_claimed_and_resumed_it_is_delivered(box: Box) -> None:
    box.add("p001")
    woken = []
    box.fwd.wake = lambda: woken.append(1)
    assert box.fwd.pause("alice") is True
    assert box.fwd.run_once() is False
    assert box.state("p001") == "ready" and not box.a.stored
    assert box.fwd.resume() is True and woken
    box.drain()
    assert box.state("p001") == "delivered" and box.at(box.a, "p001") == [1, 1, 1]


def test_a_primary_switched_off_sends_to_the_backup_and_keeps_its_health(box: Box) -> None:
    box.add("o001")
    assert box.fwd.switch_off("primary", "alice") is True
    box.drain()
    assert box.went("o001") == {"backup": "delivered"} and not box.a.stored
    assert box.health("primary") == "up"  # switched off is not down: its record is unchanged
    [primary] = [d for d in box.fwd.snapshot(0.0) if d["name"] == "primary"]
    assert (primary["state"], primary["off_by"]) == ("off", "alice")
    assert box.fwd.link()[0] == "backup"


def test_switched_back_on_new_bundles_go_to_the_primary_again(box: Box) -> None:
    box.fwd.switch_off("primary", "alice")
    box.add("o002")
    box.drain()
    box.fwd.switch_on("primary")
    box.add("o003")
    box.drain()
    assert box.went("o002") == {"backup": "delivered"}
    assert box.went("o003") == {"primary": "delivered"}


def test_a_down_destination_switched_off_is_not_probed(box: Box) -> None:
    box.a.down = True
    box.add("d001")
    box.drain()
    assert box.health("primary") == "down"
    probed: list[str] = []
    for t in box.fwd.transports:
        t.probe = lambda name=t.name: probed.append(name) or False  # type: ignore[method-assign]
    box.fwd.switch_off("primary", "alice")
    assert box.fwd.probe_due(now=FAR) == 0 and probed == []
    box.fwd.switch_on("primary")
    assert box.fwd.probe_due(now=FAR) == 1 and probed == ["primary"]


def test_with_every_destination_off_the_bundle_waits_and_goes_when_one_is_on(box: Box) -> None:
    box.add("w001")
    box.fwd.switch_off("primary", "alice")
    box.fwd.switch_off("backup", "alice")
    assert box.fwd.run_once() is False and box.state("w001") == "ready"
    box.fwd.switch_on("backup")
    box.drain()
    assert box.went("w001") == {"backup": "delivered"}


def test_the_file_says_what_is_switched_and_by_whom(box: Box) -> None:
    box.fwd.pause("ops-center:k1")
    box.fwd.switch_off("backup", "alice")
    data = json.loads((box.root / FILE).read_text())
    assert data["paused"]["by"] == "ops-center:k1" and data["off"]["backup"]["by"] == "alice"


# --- the daemon: the CLI through the control socket, and without a daemon ---


def tiny_study(folder: Path, study: str, n: int = 2) -> list[Path]:
    """A small CT study of its own UIDs (`study` a short number)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    root = f"1.2.826.0.1.3680043.8.498.5150.{study}"
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = f"{root}.1.{i + 1}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = root, root + ".1"
        ds.PatientID, ds.Modality = f"SWITCH{study}", "CT"
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes(range(256)) * 2
        out.append(folder / f"{i}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def two_folders(root: Path) -> Appliance:
    cfg = base_config(root, free_port())
    cfg["destinations"] = [{"name": "a", "transport": "directory", "path": str(root / "a")},
                           {"name": "b", "transport": "directory", "path": str(root / "b")}]
    cfg["pack"] = {"study_quiet_s": 0.5, "adaptive": False}
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    return Appliance(root, cfg)


def ctl(box: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, "--config", str(box.config_path))


def delivered(box: Appliance) -> int:
    return int(box.status()["queue"].get("delivered", 0))


def audited(box: Appliance) -> str:
    return ctl(box, "audit", "show").stdout


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Appliance]:
    box = two_folders(tmp_path / "box")
    yield box
    box.stop()


@pytest.mark.peers
def test_paused_a_study_is_received_and_packed_not_sent_and_a_restart_keeps_it_paused(
        daemon: Appliance, tmp_path: Path) -> None:
    daemon.start()
    r = ctl(daemon, "forward", "pause")
    assert r.returncode == 0 and r.stdout.strip() == "forwarding paused", r.stderr
    assert storescu(daemon.port, tiny_study(tmp_path / "s1", "1")).returncode == 0
    wait_for(lambda: daemon.status()["queue"].get("ready"), 30, "the study packed", detail=daemon.log_text)
    time.sleep(2)  # the lanes were woken when it was packed: nothing may go
    assert delivered(daemon) == 0 and not any((tmp_path / "box" / "a").iterdir())
    assert "PAUSED since" in ctl(daemon, "status").stdout
    daemon.stop()
    daemon.start()
    assert daemon.status()["forward"]["paused"]["by"], "a restart forgot the pause"
    time.sleep(2)
    assert delivered(daemon) == 0
    assert ctl(daemon, "forward", "resume").stdout.strip() == "forwarding resumed"
    wait_for(lambda: delivered(daemon) == 1, 30, "delivered once resumed", detail=daemon.log_text)
    assert "forward pause forwarding: changed" in audited(daemon)


@pytest.mark.peers
def test_a_destination_switched_off_is_passed_over_until_it_is_switched_on(
        daemon: Appliance, tmp_path: Path) -> None:
    daemon.start()
    assert ctl(daemon, "destination", "off", "a").stdout.strip() == "destination a off"
    assert storescu(daemon.port, tiny_study(tmp_path / "s2", "2")).returncode == 0
    wait_for(lambda: delivered(daemon) == 1, 30, "delivered", detail=daemon.log_text)
    assert not any((tmp_path / "box" / "a").iterdir()) and any((tmp_path / "box" / "b").iterdir())
    assert "destination    a: OFF (since" in ctl(daemon, "status").stdout
    assert ctl(daemon, "destination", "on", "a").returncode == 0
    assert storescu(daemon.port, tiny_study(tmp_path / "s3", "3")).returncode == 0
    wait_for(lambda: delivered(daemon) == 2, 30, "the second study delivered", detail=daemon.log_text)
    assert any((tmp_path / "box" / "a").iterdir())
    trail = audited(daemon)
    assert "forward off a: changed" in trail and "forward on a: changed" in trail


@pytest.mark.peers
def test_an_unknown_destination_is_refused_by_name(daemon: Appliance) -> None:
    daemon.start()
    r = ctl(daemon, "destination", "off", "nowhere")
    assert r.returncode != 0 and "no destination named 'nowhere'" in r.stderr
    assert "forward off nowhere" in audited(daemon)


@pytest.mark.peers
def test_switches_set_with_no_daemon_running_are_in_force_when_it_starts(daemon: Appliance) -> None:
    daemon.start()
    daemon.stop()  # keys and state exist; no daemon
    assert ctl(daemon, "forward", "pause").returncode == 0
    assert ctl(daemon, "destination", "off", "b").returncode == 0
    daemon.start()
    st = daemon.status()
    assert st["forward"]["paused"] is not None
    assert {d["name"]: d["state"] for d in st["destinations"]} == {"a": "up", "b": "off"}


@pytest.mark.peers
def test_the_log_level_changes_until_a_restart_and_debug_needs_the_config(daemon: Appliance) -> None:
    r = ctl(daemon, "log-level", "warning")
    assert r.returncode == 69 and "not running" in r.stderr  # no daemon yet
    daemon.start()
    r = ctl(daemon, "log-level", "warning")
    assert r.returncode == 0 and "log level warning (was info)" in r.stdout
    assert daemon.status()["log_level"] == "warning"
    r = ctl(daemon, "log-level", "debug")
    assert r.returncode == 64 and 'log_level = "debug"' in r.stderr
    daemon.stop()
    daemon.start()
    assert daemon.status()["log_level"] == "info"
