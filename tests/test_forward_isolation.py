"""One instance that makes the PACS hang, abort or refuse never holds back the others.

The real daemon receives a CT series from DCMTK storescu and forwards it over DICOM to a
PACS that misbehaves on exactly one instance: a pynetdicom Storage SCP the test controls
(it hangs without answering, or aborts the association), and Orthanc with a Lua filter
that refuses the instance's SOP class. Every other instance must arrive exactly once without waiting
for the bad one's retries; the bad one is parked - its own held queue item, shown with
the reason in `queue list` and counted in `status` - and releasing it once the PACS is
fixed delivers it exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.orthanc import Orthanc
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.field]

CT = "CT_Philips_Ingenuity_phantom_28sl"
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # a storage SOP class Orthanc 1.10.1 does not know


class ControlledPacs:
    """A Storage SCP that stores (counts) every instance, except the SOP Instance UIDs in
    `modes`: "hang" (no answer until `fixed` is set) or "abort" (drops the association)."""

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.stored: Counter[str] = Counter()
        self.fixed = threading.Event()
        self.hanging = threading.Event()  # an instance is hanging now
        self.lock = threading.Lock()
        self._saved = _config.UNRESTRICTED_STORAGE_SERVICE
        _config.UNRESTRICTED_STORAGE_SERVICE = True  # any storage SOP class, any syntax
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        mode = None if self.fixed.is_set() else self.modes.get(uid)
        if mode == "hang":
            self.hanging.set()
            self.fixed.wait(120)
            return 0xA700
        if mode == "abort":
            event.assoc.abort()
            return 0x0000
        with self.lock:
            self.stored[uid] += 1
        return 0x0000

    def close(self) -> None:
        self.fixed.set()
        self.server.shutdown()
        _config.UNRESTRICTED_STORAGE_SERVICE = self._saved


def _daemon(factory: Callable[..., Appliance], root: Path, port: int, ae_title: str,
            timeout_s: float = 2) -> Appliance:
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 30, "segment_max_instances": 10}
    cfg["queue"] = {"retry_min_s": 0.5, "retry_max_s": 2, "lanes": 2}
    cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1", "port": port,
                            "ae_title": ae_title, "plaintext": True, "timeout_s": timeout_s}]
    return factory(cfg, root=root)


def _queue(app: Appliance) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        cli("queue", "list", "--json", "--config", str(app.config_path), check=True).stdout)
    return rows


def _series(samples: Path) -> tuple[list[Path], list[str]]:
    files = sorted((samples / "series" / CT).iterdir())
    return files, [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


@pytest.fixture
def pacs() -> Iterator[ControlledPacs]:
    p = ControlledPacs()
    yield p
    p.close()


def _parked(app: Appliance) -> list[dict[str, Any]]:
    return [r for r in _queue(app) if r["state"] == "held" and "parked" in (r["reason"] or "")]


@pytest.mark.parametrize("mode", ["hang", "abort"])
def test_an_instance_the_pacs_chokes_on_is_parked_and_the_rest_arrives_once(
        appliance_factory: Callable[..., Appliance], pacs: ControlledPacs, samples: Path,
        tmp_path: Path, mode: str) -> None:
    files, uids = _series(samples)
    poison = uids[14]
    pacs.modes[poison] = mode
    app = _daemon(appliance_factory, tmp_path / "app", pacs.port, "PACS")
    t0 = time.monotonic()
    assert storescu(app.port, files).returncode == 0
    healthy = [u for u in uids if u != poison]
    wait_for(lambda: all(pacs.stored[u] for u in healthy), timeout=60,
             what="every healthy instance at the PACS")
    took = time.monotonic() - t0
    parked = wait_for(lambda: _parked(app), timeout=30, what="the bad instance parked")
    assert len(parked) == 1 and parked[0]["instances"] == 1
    wait_for(lambda: all(r["state"] == "delivered" for r in _queue(app) if r["id"] != parked[0]["id"]),
             what="every bundle delivered without it")
    assert app.status()["forward"]["parked"] == 1
    assert pacs.stored[poison] == 0 and all(pacs.stored[u] == 1 for u in healthy)
    print(f"{mode}: 27 healthy instances at the PACS {took:.1f} s after the first C-STORE")

    pacs.fixed.set()  # the PACS is fixed; the operator releases the parked instance
    r = cli("queue", "release", parked[0]["id"], "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: pacs.stored[poison] == 1, timeout=30, what="the released instance delivered")
    wait_for(lambda: all(r["state"] == "delivered" for r in _queue(app)), what="all delivered")
    time.sleep(1)
    assert pacs.stored[poison] == 1 and all(pacs.stored[u] == 1 for u in healthy)
    assert app.status()["forward"]["parked"] == 0


def test_an_instance_orthanc_refuses_is_parked_and_the_rest_is_stored(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    """Orthanc 1.10 accepts no context for Photoacoustic Image Storage: one slice of the
    study relabelled so (new UIDs, same study) is refused; the other 28 are stored."""
    files, uids = _series(samples)
    ds = pydicom.dcmread(files[3])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PHOTOACOUSTIC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)
    with Orthanc(tmp_path / "orthanc") as orthanc:
        app = _daemon(appliance_factory, tmp_path / "app", orthanc.dicom_port, "ORTHANC")
        assert storescu(app.port, files).returncode == 0
        # DCMTK's storescu does not know this SOP class: send it with pynetdicom
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(PHOTOACOUSTIC, str(ds.file_meta.TransferSyntaxUID))
        assoc = scu.associate("127.0.0.1", app.port, ae_title="EDGE")
        assert assoc.is_established
        assert assoc.send_c_store(odd).Status == 0x0000
        assoc.release()
        orthanc.wait_count(28, timeout=60)
        parked = wait_for(lambda: _parked(app), timeout=30, what="the refused instance parked",
                          detail=lambda: json.dumps(_queue(app), indent=1))
        assert len(parked) == 1 and "Photoacoustic" in parked[0]["reason"]
        wait_for(lambda: all(r["state"] == "delivered" for r in _queue(app) if r["id"] != parked[0]["id"]),
                 what="every bundle delivered without it")
        assert sorted(orthanc.files_by_sop_uid()) == sorted(uids)


def test_a_lone_instance_that_hangs_the_pacs_is_parked_not_retried_forever(
        appliance_factory: Callable[..., Appliance], pacs: ControlledPacs, samples: Path,
        tmp_path: Path) -> None:
    """A study of one instance: nothing else of its bundle can show the PACS works, but the
    PACS answers a C-ECHO after each hang, so the instance is parked after two, instead of
    waiting with back-off for ever (and holding a lane for every retry)."""
    files, uids = _series(samples)
    pacs.modes[uids[0]] = "hang"
    app = _daemon(appliance_factory, tmp_path / "app", pacs.port, "PACS")
    assert storescu(app.port, files[:1]).returncode == 0
    parked = wait_for(lambda: _parked(app), timeout=60, what="the lone instance parked",
                      detail=lambda: json.dumps(_queue(app), indent=1))
    assert "no answer from the PACS" in parked[0]["reason"]
    probes = [json.loads(line) for line in app.log_text().splitlines()
              if '"destination.probed"' in line]
    assert len(probes) >= 2 and all(p["answers"] for p in probes)
    pacs.fixed.set()
    assert cli("queue", "release", parked[0]["id"], "--config", str(app.config_path)).returncode == 0
    wait_for(lambda: pacs.stored[uids[0]] == 1, timeout=30, what="the released instance delivered")


def test_a_sigterm_while_the_pacs_hangs_stops_the_daemon_in_seconds_and_loses_nothing(
        appliance_factory: Callable[..., Appliance], pacs: ControlledPacs, samples: Path,
        tmp_path: Path) -> None:
    """The PACS hangs on one instance and the destination allows a minute's silence: a
    SIGTERM ends the daemon within seconds (the send is cut short, not waited for), the cut
    counts against nothing (no strike, nothing parked, the destination not marked down),
    and after a restart with the PACS fixed every instance arrives exactly once."""
    files, uids = _series(samples)
    pacs.modes[uids[3]] = "hang"
    app = _daemon(appliance_factory, tmp_path / "app", pacs.port, "PACS", timeout_s=60)
    assert storescu(app.port, files).returncode == 0
    assert pacs.hanging.wait(60), "the PACS never got the instance it hangs on"
    t0 = time.monotonic()
    assert app.stop(timeout=60) == 0
    took = time.monotonic() - t0
    print(f"stopped {took:.1f} s after SIGTERM, a send hanging")
    assert took < 30  # was more than 60: the stop waited on the hung send
    log = app.log_text()
    assert '"bundle.interrupted"' in log and '"destination.down"' not in log
    assert not _parked(app)
    pacs.fixed.set()
    app.start()
    wait_for(lambda: all(pacs.stored[u] for u in uids), timeout=90, what="every instance at the PACS",
             detail=lambda: json.dumps(_queue(app), indent=1))
    wait_for(lambda: all(r["state"] == "delivered" for r in _queue(app)), what="every bundle delivered")
    assert all(pacs.stored[u] == 1 for u in uids) and not _parked(app)
