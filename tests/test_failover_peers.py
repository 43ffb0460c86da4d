"""Failover and failback with real peers: the daemon, two Orthancs, two folders.

The real daemon (tests/peers.py `Appliance`) receives from DCMTK storescu and forwards to
two destinations in order. The primary is cut while bundles flow (Orthanc A stopped by
PID; the first folder renamed away, as an unmounted share): every acknowledged instance
must still arrive, at the primary before the cut or at the backup after it, and the
backup must start taking bundles within the target (15 s). When the primary comes back,
its probe answers and new studies go to it again; `appliance status` shows each step.

Run with `-s` to see the measured time from the cut to the first instance at the backup.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.e2e_support import appliance_config, dicom_destination, settled
from tests.orthanc import Orthanc
from tests.peers import Appliance, cli, free_port, storescu, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.field]

FAILOVER_TARGET_S = 15.0
BIG = "MR_GE_MR750_EPI_150sl"
SMALL = "MR_Philips_abdomen_11sl"
OTHER = "MR_Philips_Ingenia_pCASL_40sl"
WRIST = "MR_GE_Signa_wrist_16sl"


def _series(samples: Path, name: str) -> tuple[list[Path], set[str]]:
    files = sorted((samples / "series" / name).iterdir())
    return files, {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _uids(pacs: Orthanc) -> set[str]:
    return {str(pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]) for i in pacs.instances()}


def _kill(pacs: Orthanc) -> None:
    assert pacs.proc is not None
    os.kill(pacs.proc.pid, signal.SIGKILL)
    pacs.proc.wait(10)


def _config(root: Path, destinations: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = appliance_config(root, free_port(), destinations[0], codec="jpeg-ls",
                           segment_max_instances=5)
    cfg["destinations"] = destinations
    cfg["queue"] = {"retry_min_s": 0.5, "retry_max_s": 2, "lanes": 2,
                    "probe_min_s": 1, "probe_max_s": 2}
    return cfg


def _destinations(app: Appliance) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app.status()["destinations"]}


def _queue_show(app: Appliance, item_id: str) -> dict[str, Any]:
    r = cli("queue", "show", item_id, "--json", "--config", str(app.config_path), check=True)
    shown: dict[str, Any] = json.loads(r.stdout)
    return shown


class Modality(threading.Thread):
    """A scanner that keeps sending: the series in associations of 10 images, half a
    second apart, so that the cut falls in the middle of the stream."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(name="modality", daemon=True)
        self.port, self.files = port, files
        self.codes: list[int] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for i in range(0, len(self.files), 10):
                self.codes.append(storescu(self.port, self.files[i:i + 10]).returncode)
                time.sleep(0.5)
        finally:
            self.done.set()


@pytest.fixture
def two_pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, Orthanc]]:
    a = Orthanc(tmp_path / "orthanc-a").start()
    b = Orthanc(tmp_path / "orthanc-b")
    try:
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("cut", ["sigterm", "sigkill"])
def test_orthanc_a_stopped_mid_stream_everything_arrives_at_b_then_new_studies_go_back_to_a(
        appliance_factory: Callable[..., Appliance], two_pacs: tuple[Orthanc, Orthanc],
        samples: Path, tmp_path: Path, cut: str) -> None:
    """sigterm: Orthanc shuts down (closes its associations, then its port); sigkill: it
    dies at once, mid-association."""
    a, b = two_pacs
    root = tmp_path / "app"
    app = appliance_factory(_config(root, [
        dicom_destination(a.dicom_port, name="center-a", timeout_s=5),
        dicom_destination(b.dicom_port, name="center-b", timeout_s=5)]), root=root)
    files, sent = _series(samples, BIG)
    modality = Modality(app.port, files)
    try:
        wait_for(lambda: a.count() >= 20, timeout=60, what="the first bundles at Orthanc A")
        assert not modality.done.is_set(), "the study was all sent before the cut"
        t0 = time.monotonic()
        if cut == "sigkill":
            _kill(a)
        else:
            a.stop()  # SIGTERM by PID, waits for it to exit
        wait_for(lambda: b.count() > 0, timeout=60, poll=0.05, what="the first instance at Orthanc B")
        took = time.monotonic() - t0
        print(f"\nfailover ({cut}): {took:.1f} s from stopping Orthanc A to the first instance"
              " stored at Orthanc B")
    finally:
        modality.join()
    assert modality.codes == [0] * len(modality.codes)
    rows = wait_for(lambda: settled(app.state_dir), timeout=120, what="every bundle delivered")
    assert sum(r["instances"] for r in rows) == len(files)
    assert took <= FAILOVER_TARGET_S
    dests = _destinations(app)
    assert dests["center-a"]["state"] == "down" and dests["center-a"]["last_error"]
    assert dests["center-b"]["state"] == "up"
    status = cli("status", "--config", str(app.config_path), check=True).stdout
    assert "center-a: DOWN" in status and "center-b: UP" in status
    at_b_rows = [r for r in rows if r["destination"] == "center-b"]
    assert at_b_rows, "nothing went to B"
    went = [{d["destination"]: d["state"] for d in _queue_show(app, r["id"])["deliveries"]}
            for r in at_b_rows]
    # the attempt that found A gone moved its bundle on; the rest went straight to B
    assert {"center-a": "moved", "center-b": "delivered"} in went, went
    assert all(w["center-b"] == "delivered" for w in went)

    a.start()  # the primary comes back: its probe answers, new studies go to it
    wait_for(lambda: _destinations(app)["center-a"]["state"] == "up", timeout=30,
             what="Orthanc A up again in status")
    at_b = _uids(b)
    small, small_uids = _series(samples, SMALL)
    assert storescu(app.port, small).returncode == 0
    wait_for(lambda: small_uids <= _uids(a), timeout=60, what="the new study at Orthanc A")
    assert not small_uids & _uids(b)
    assert _uids(b) == at_b
    # nothing lost: every acknowledged instance is at A (before the cut) or at B (after)
    assert sent <= _uids(a) | at_b
    assert "destination.down" in app.log_text() and "destination.up" in app.log_text()


def test_the_first_folder_disappears_bundles_go_to_the_second_then_back(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "nas-a", tmp_path / "nas-b"
    first.mkdir()
    second.mkdir()
    root = tmp_path / "app"
    app = appliance_factory(_config(root, [
        {"name": "nas-a", "transport": "directory", "path": str(first)},
        {"name": "nas-b", "transport": "directory", "path": str(second)}]), root=root)

    def study(name: str, before: set[str]) -> dict[str, str]:
        """Send a series; once everything is delivered, {bundle id: destination} of its bundles."""
        files, _ = _series(samples, name)
        assert storescu(app.port, files).returncode == 0
        rows = wait_for(lambda: settled(app.state_dir), timeout=60, what=f"{name} delivered")
        new = [r for r in rows if r["id"] not in before]
        assert sum(r["instances"] for r in new) == len(files)
        return {r["id"]: r["destination"] for r in new}

    def held(folder: Path) -> set[str]:
        return {p.name.removesuffix(".bundle") for p in folder.glob("*.bundle")}

    one = study(SMALL, set())
    assert set(one.values()) == {"nas-a"} and held(first) == set(one)
    first.rename(tmp_path / "nas-a.unmounted")  # the share goes away
    two = study(OTHER, set(one))
    assert set(two.values()) == {"nas-b"} and held(second) == set(two)
    dests = _destinations(app)
    assert (dests["nas-a"]["state"], dests["nas-a"]["last_error"]) == ("down", "missing")
    (tmp_path / "nas-a.unmounted").rename(first)  # mounted again
    wait_for(lambda: _destinations(app)["nas-a"]["state"] == "up", timeout=30, what="nas-a up again")
    three = study(WRIST, set(one) | set(two))  # a new study after the failback
    assert set(three.values()) == {"nas-a"} and held(first) == set(one) | set(three)
    assert held(second) == set(two)
