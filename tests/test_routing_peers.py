"""Copy destinations and per-rule destinations with real peers: the daemon, DCMTK storescu,
two Orthancs and folders.

A copy destination (a folder, as the hospital's own archive on a share) gets every study
besides the failover chain: failover from Orthanc A to Orthanc B works with it present; the
archive unmounted never delays the chain and catches up once it is back. A rule on the
calling AE title sends its studies to B only, and a restart while they wait keeps that.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.e2e_support import appliance_config, dicom_destination, queue_db, settled
from tests.orthanc import Orthanc
from tests.peers import Appliance, cli, free_port, storescu, wait_for
from tests.test_rules import SlowPacs

pytestmark = [pytest.mark.peers, pytest.mark.field]

SMALL = "MR_Philips_abdomen_11sl"
WRIST = "MR_GE_Signa_wrist_16sl"


def _series(samples: Path, name: str) -> tuple[list[Path], set[str]]:
    files = sorted((samples / "series" / name).iterdir())
    return files, {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _uids(pacs: Orthanc) -> set[str]:
    return {str(pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]) for i in pacs.instances()}


def _config(root: Path, destinations: list[dict[str, Any]],
            rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    cfg = appliance_config(root, free_port(), destinations[0], codec="jpeg-ls",
                           segment_max_instances=5)
    cfg["destinations"] = destinations
    cfg["receive"]["callers"] = [{"ae_title": "MODALITY"}, {"ae_title": "CT_ER"}]
    cfg["queue"] = {"retry_min_s": 0.5, "retry_max_s": 2, "lanes": 2,
                    "probe_min_s": 1, "probe_max_s": 2}
    if rules:
        cfg["rules"] = rules
    return cfg


def _folder(path: Path, mode: str = "failover") -> dict[str, Any]:
    return {"name": path.name, "transport": "directory", "path": str(path), "mode": mode}


def _held(folder: Path) -> set[str]:
    return {p.name.removesuffix(".bundle") for p in folder.glob("*.bundle")}


def _bundles(app: Appliance) -> list[dict[str, Any]]:
    """The failover chain's items (not copies, not parked instances)."""
    return [r for r in queue_db(app.state_dir) if r["parent"] is None]


def _copies(app: Appliance) -> list[dict[str, Any]]:
    return [r for r in queue_db(app.state_dir) if r["copy_to"] is not None]


def _show(app: Appliance, item_id: str) -> dict[str, Any]:
    r = cli("queue", "show", item_id, "--json", "--config", str(app.config_path), check=True)
    shown: dict[str, Any] = json.loads(r.stdout)
    return shown


def test_failover_to_orthanc_b_with_a_copy_to_the_archive(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    a = Orthanc(tmp_path / "orthanc-a")  # never started: the primary is down
    b = Orthanc(tmp_path / "orthanc-b").start()
    archive = tmp_path / "archive"
    archive.mkdir()
    try:
        root = tmp_path / "app"
        app = appliance_factory(_config(root, [
            dicom_destination(free_port(), name="center-a", timeout_s=5),
            dicom_destination(b.dicom_port, name="center-b", timeout_s=5),
            _folder(archive, "copy")]), root=root)
        files, uids = _series(samples, SMALL)
        assert storescu(app.port, files).returncode == 0
        rows = wait_for(lambda: settled(app.state_dir), timeout=120, what="bundles and copies delivered")
        assert _uids(b) == uids
        bundles = [r for r in rows if r["parent"] is None]
        copies = [r for r in rows if r["copy_to"] == "archive"]
        assert sum(r["instances"] for r in bundles) == len(files)
        assert {r["destination"] for r in bundles} == {"center-b"}
        assert sorted(r["parent"] for r in copies) == sorted(r["id"] for r in bundles)
        assert _held(archive) == {r["id"] for r in bundles}  # a copy is written as its bundle
        shown = _show(app, bundles[0]["id"])
        assert shown["overall"] == "delivered"
        assert [(c["destination"], c["state"]) for c in shown["copies"]] == [("archive", "delivered")]
    finally:
        a.stop()
        b.stop()


def test_the_archive_unmounted_never_delays_the_primary_and_catches_up(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    primary, archive = tmp_path / "center-a", tmp_path / "archive"
    primary.mkdir()  # the archive share is not mounted: its folder is missing
    root = tmp_path / "app"
    app = appliance_factory(_config(root, [_folder(primary), _folder(archive, "copy")]), root=root)
    files, _ = _series(samples, WRIST)
    assert storescu(app.port, files).returncode == 0

    def primary_done() -> list[dict[str, Any]] | None:
        rows = _bundles(app)
        done = rows and all(r["state"] == "delivered" for r in rows)
        return rows if done and sum(r["instances"] for r in rows) == len(files) else None

    bundles = wait_for(primary_done, timeout=60, what="the study at the primary")
    assert _held(primary) == {r["id"] for r in bundles}
    # a bundle's copy item is made by the next claim after the bundle is ready: a moment
    # after the primary took it, on a loaded machine
    def all_copies() -> list[dict[str, Any]] | None:
        rows = _copies(app)
        return rows if len(rows) == len(bundles) else None

    copies = wait_for(all_copies, timeout=30, what="a copy item for each bundle")
    assert all(r["state"] != "delivered" for r in copies)
    shown = _show(app, bundles[0]["id"])
    assert shown["state"] == "delivered" and shown["overall"] == "delivered, copies 0/1"
    assert all(p.exists() for p in (app.state_dir / "bundles" / f"{r['id']}.bundle" for r in bundles))
    listed = cli("queue", "list", "--config", str(app.config_path), check=True).stdout
    assert listed.count("copy:archive") == len(bundles)
    status = cli("status", "--config", str(app.config_path), check=True).stdout
    assert "archive (copy): DOWN" in status and "center-a: UP" in status
    assert "+ 1 for copies" in status
    archive.mkdir()  # mounted again: the copies go, the prober having found it
    rows = wait_for(lambda: settled(app.state_dir), timeout=60, what="the copies delivered")
    assert _held(archive) == {r["parent"] for r in rows if r["copy_to"] == "archive"}
    assert _held(archive) == {r["id"] for r in bundles}


def test_a_copy_pacs_that_hangs_on_every_instance_holds_no_lane_of_the_chain(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    """The archive PACS takes 20 s per instance (it would hold every lane for minutes):
    the study reaches the primary all the same while the copy is still crawling."""
    primary = tmp_path / "center-a"
    primary.mkdir()
    slow = SlowPacs(delay_s=20)
    try:
        root = tmp_path / "app"
        app = appliance_factory(_config(root, [
            _folder(primary),
            {**dicom_destination(slow.port, name="archive", ae_title="PACS", timeout_s=60),
             "mode": "copy"}]), root=root)
        files, _ = _series(samples, WRIST)
        t0 = time.monotonic()
        assert storescu(app.port, files).returncode == 0
        wait_for(lambda: (rows := _bundles(app)) and sum(r["instances"] for r in rows) == len(files)
                 and all(r["state"] == "delivered" for r in rows),
                 timeout=60, poll=0.05, what="the study at the primary")
        print(f"\nprimary done {time.monotonic() - t0:.1f} s after the first C-STORE, the copy PACS"
              f" holding {sum(len(v) for v in slow.arrived.values())} of {len(files)}")
        assert sum(len(v) for v in slow.arrived.values()) < len(files)
        assert any(r["state"] == "active" for r in _copies(app))  # the copy is on its own lane
    finally:
        slow.close()


def _routed(app_root: Path, a: Path, b: Path, priority: str = "routine") -> dict[str, Any]:
    return _config(app_root, [_folder(a), _folder(b)], rules=[
        {"name": "er-to-b", "priority": priority, "calling_ae": ["CT_ER"],
         "destinations": ["center-b"]}])


def test_a_rule_sends_its_studies_to_b_only(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "center-a", tmp_path / "center-b"
    a.mkdir()
    b.mkdir()
    root = tmp_path / "app"
    app = appliance_factory(_routed(root, a, b), root=root)
    er, _ = _series(samples, SMALL)
    other, _ = _series(samples, WRIST)
    assert storescu(app.port, er, aet="CT_ER").returncode == 0
    assert storescu(app.port, other).returncode == 0
    rows = wait_for(lambda: settled(app.state_dir), timeout=60, what="both studies delivered")
    by_count = {sum(r["instances"] for r in rows if r["study_key"] == k): k
                for k in {r["study_key"] for r in rows}}
    er_ids = {r["id"] for r in rows if r["study_key"] == by_count[len(er)]}
    other_ids = {r["id"] for r in rows if r["study_key"] == by_count[len(other)]}
    assert _held(b) == er_ids and _held(a) == other_ids
    assert {r["route"] for r in rows if r["id"] in er_ids} == {",center-b,"}
    assert _show(app, sorted(er_ids)[0])["route"] == ["center-b"]


def test_a_restart_while_a_routed_study_waits_keeps_its_route(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "center-a", tmp_path / "center-b"
    a.mkdir()  # B's share is not mounted yet: the routed study must wait for it, not go to A
    root = tmp_path / "app"
    app = appliance_factory(_routed(root, a, b), root=root)
    er, _ = _series(samples, SMALL)
    assert storescu(app.port, er, aet="CT_ER").returncode == 0
    wait_for(lambda: (rows := _bundles(app)) and sum(r["instances"] for r in rows) == len(er)
             and all(r["state"] in ("ready", "deferred") for r in rows),
             timeout=60, what="the routed study packed and waiting")
    app.stop()
    b.mkdir()
    app.start()
    rows = wait_for(lambda: settled(app.state_dir), timeout=60, what="the routed study delivered")
    assert _held(b) == {r["id"] for r in rows} and _held(a) == set()
    assert "study.routed" in app.log_text()


def test_a_stat_rule_with_destinations_makes_every_segment_stat_and_sends_it_to_b_only(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    """The receiver remembers a stat study and skips the rules for its later instances:
    those must keep the route too (their segments take the study's)."""
    a, b = tmp_path / "center-a", tmp_path / "center-b"
    a.mkdir()
    b.mkdir()
    root = tmp_path / "app"
    app = appliance_factory(_routed(root, a, b, priority="stat"), root=root)
    er, _ = _series(samples, WRIST)
    assert storescu(app.port, er, aet="CT_ER").returncode == 0
    rows = wait_for(lambda: settled(app.state_dir), timeout=60, what="the stat study delivered")
    assert len(rows) > 1 and sum(r["instances"] for r in rows) == len(er)
    assert {(r["priority"], r["route"]) for r in rows} == {(10, ",center-b,")}
    assert _held(b) == {r["id"] for r in rows} and _held(a) == set()
