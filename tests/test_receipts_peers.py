"""End-to-end receipts with real peers: a modality (DCMTK storescu) -> the appliance daemon
-> a real OpenSSH sshd as the reading center's drop (tests/sshd.py) -> the real
`appliance ingest --once` storing into a real Orthanc, which writes its signed receipt into
the drop -> the appliance reads it back over SFTP and `appliance queue list` says
"stored at center". Also: a study the center stored in part is shown partial with the
count; a receipt signed by another key is ignored; a receipt that never comes makes the
bundle overdue in `appliance status`; the transport reads receipts size-capped. A copy
destination (`mode = "copy"`) over SFTP with `receipt_key` has its copy's receipt read
back and verified as a bundle's; a receipt that does not match the copy is refused."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.uid import UID

from appliance.forward.sftp import SftpTransport
from appliance.ingest import receipt as receipts
from tests.e2e_support import queue_rows, read_dataset
from tests.orthanc import Orthanc
from tests.peers import REPO, cli, free_port, storescu, wait_for
from tests.sshd import REMOTE_DIR, Sshd
from tests.test_ingest import PHOTOACOUSTIC, Center, _center_keys, _send_with_pynetdicom, _study
from tests.test_transport_contract import KEY

pytestmark = pytest.mark.peers

FILES = sorted((REPO.parent / "shared" / "dicom-samples" / "series"
                / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[:4]
WAIT_S = 120


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Sshd]:
    with Sshd(tmp_path / "sshd") as s:
        yield s


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    p = Orthanc(tmp_path / "orthanc").start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    _center_keys(tmp_path / "keys")  # center.key/.pub (bundles), sign.key/.pub (receipts)
    return tmp_path / "keys"


def site(appliance_factory: Any, server: Sshd, keys: Path, root: Path,
         overdue_s: float = 1800) -> Any:
    """The daemon sending to the sshd drop, with receipts checked against sign.pub."""
    return appliance_factory(site_config(server, keys, root, overdue_s), root=root)


def site_config(server: Sshd, keys: Path, root: Path, overdue_s: float = 1800) -> dict[str, Any]:
    from tests.peers import base_config

    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 5, "workers": 2}
    cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1}
    cfg["encryption"]["recipients"] = [str(keys / "center.pub")]
    dest = server.destination()
    cfg["destinations"] = [{"name": "center", "transport": "sftp", "host": dest.host,
                            "port": dest.port, "user": dest.user, "key": str(dest.key),
                            "known_hosts": str(dest.known_hosts), "remote_dir": REMOTE_DIR,
                            "receipt_key": str(keys / "sign.pub"), "receipt_overdue_s": overdue_s}]
    return cfg


def copy_site(appliance_factory: Any, server: Sshd, keys: Path, root: Path) -> Any:
    """The daemon delivering to a folder (the failover chain) and copying every bundle to
    the sshd drop (`mode = "copy"`), with receipts for the copy checked against sign.pub."""
    cfg = site_config(server, keys, root)
    cfg["destinations"] = [{"name": "pacs", "transport": "directory", "path": str(root / "out")},
                           {**cfg["destinations"][0], "name": "archive", "mode": "copy"}]
    (root / "out").mkdir(parents=True)
    return appliance_factory(cfg, root=root)


def copy_row(app: Any) -> dict[str, Any]:
    rows = [r for r in queue_rows(app.config_path) if r["copy_to"] == "archive"]
    return rows[0] if len(rows) == 1 else {"shown": f"{len(rows)} copy rows"}


def copy_uploaded(app: Any, server: Sshd) -> tuple[str, str]:
    """Send the study; wait until its copy is in the drop and listed "uploaded";
    (the bundle id, the copy's item id)."""
    r = storescu(app.port, FILES)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: copy_row(app)["shown"] == "uploaded", WAIT_S, "the copy to be uploaded",
             detail=app.log_text)
    (bundle,) = server.drop.glob("*.bundle")
    row = copy_row(app)
    assert row["copy_of"] == bundle.name.removesuffix(".bundle")
    return row["copy_of"], row["id"]


def shown(app: Any) -> list[str]:
    return [r["shown"] for r in queue_rows(app.config_path)]


def uploaded(app: Any, server: Sshd, files: list[Path] | None = None) -> str:
    """Send the study; wait until its one bundle is in the drop and listed "uploaded"."""
    if files is None:
        r = storescu(app.port, FILES)
        assert r.returncode == 0, r.stderr
    else:
        _send_with_pynetdicom(app.port, files)
    wait_for(lambda: shown(app) == ["uploaded"], WAIT_S, "the bundle to be uploaded",
             detail=app.log_text)
    (bundle,) = server.drop.glob("*.bundle")
    return bundle.name.removesuffix(".bundle")


def events(app: Any, name: str) -> list[dict[str, Any]]:
    out = []
    for line in app.log_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == name:
            out.append(e)
    return out


def test_a_study_stored_by_the_center_is_shown_stored_at_center(
        appliance_factory: Any, server: Sshd, keys: Path, pacs: Orthanc, tmp_path: Path) -> None:
    app = site(appliance_factory, server, keys, tmp_path / "edge")
    bundle_id = uploaded(app, server)
    center = Center(tmp_path / "center", keys, pacs.dicom_port, drop_dir=str(server.drop))
    assert center.once().counts["stored"] == 1
    wait_for(lambda: shown(app) == ["stored at center"], WAIT_S, "the receipt to be read back",
             detail=app.log_text)
    [row] = queue_rows(app.config_path)
    assert row["center"]["receipt"] == "stored" and row["center"]["stored"] == len(FILES)
    assert len(pacs.get("/instances")) == len(FILES)
    r = cli("queue", "show", bundle_id, "--config", str(app.config_path))
    assert f"stored at center rc-test (stored): {len(FILES)} of {len(FILES)} instance(s)" in r.stdout
    [e] = events(app, "receipt.stored")
    assert (e["bundle"], e["destination"], e["stored"]) == (bundle_id, "center", len(FILES))


def test_a_receipt_signed_with_another_key_is_ignored_and_the_bundle_stays_uploaded(
        appliance_factory: Any, server: Sshd, keys: Path, tmp_path: Path) -> None:
    app = site(appliance_factory, server, keys, tmp_path / "edge")
    bundle_id = uploaded(app, server)
    sha = hashlib.sha256((server.drop / f"{bundle_id}.bundle").read_bytes()).hexdigest()
    forged = receipts.Receipt(bundle_id, sha, "rc-test", "2026-12-07T05:00:00Z", "stored",
                              (receipts.InstanceOutcome(0, "stored"),))
    receipts.write(server.drop, bundle_id, receipts.sign(forged, Ed25519PrivateKey.generate()))
    [e] = wait_for(lambda: events(app, "receipt.ignored"), WAIT_S, "the forged receipt to be read",
                   detail=app.log_text)
    assert (e["bundle"], e["why"]) == (bundle_id, "receipt is signed by a key that is not trusted")
    assert shown(app) == ["uploaded"]
    assert app.status()["receipts"][0]["awaiting"] == 1


def test_a_receipt_that_never_comes_makes_the_bundle_overdue_in_status(
        appliance_factory: Any, server: Sshd, keys: Path, tmp_path: Path) -> None:
    app = site(appliance_factory, server, keys, tmp_path / "edge", overdue_s=2)
    uploaded(app, server)
    st = wait_for(lambda: (s := app.status())["receipts"][0]["overdue"] and s, WAIT_S,
                  "the bundle to be overdue", detail=app.log_text)
    assert st["receipts"][0] == {"destination": "center", "awaiting": 1, "overdue": 1,
                                 "overdue_after_s": 2.0, "last_error": None}
    text = cli("status", "--config", str(app.config_path)).stdout
    assert "receipts       center: 1 uploaded, awaiting the center's receipt, 1 OVERDUE" in text


def test_a_study_the_center_stored_in_part_is_shown_partial_with_the_count(
        appliance_factory: Any, server: Sshd, keys: Path, pacs: Orthanc, tmp_path: Path) -> None:
    files = _study(FILES[:3], tmp_path / "study", "RECEIPT-ODD")
    ds = read_dataset(files[1])  # a SOP class Orthanc 1.10.1 refuses
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(PHOTOACOUSTIC)
    ds.save_as(files[1], enforce_file_format=True)
    app = site(appliance_factory, server, keys, tmp_path / "edge")
    bundle_id = uploaded(app, server, files)
    center = Center(tmp_path / "center", keys, pacs.dicom_port, drop_dir=str(server.drop))
    assert center.once().counts == {"partial": 1}
    wait_for(lambda: shown(app) == ["partial at center"], WAIT_S, "the receipt to be read back",
             detail=app.log_text)
    [row] = queue_rows(app.config_path)
    assert (row["center"]["stored"], row["center"]["failed"]) == (2, 1)
    table = cli("queue", "list", "--config", str(app.config_path)).stdout
    assert "partial at center" in table and "the center stored 2 of 3 instance(s)" in table
    [e] = events(app, "receipt.partial")
    assert e == {**e, "bundle": bundle_id, "level": "warning", "stored": 2, "failed": 1}
    assert "RECEIPT-ODD" not in app.log_text()


def test_a_copy_stored_by_the_center_is_shown_stored_at_center(
        appliance_factory: Any, server: Sshd, keys: Path, pacs: Orthanc, tmp_path: Path) -> None:
    app = copy_site(appliance_factory, server, keys, tmp_path / "edge")
    bundle_id, copy_id = copy_uploaded(app, server)
    center = Center(tmp_path / "center", keys, pacs.dicom_port, drop_dir=str(server.drop))
    assert center.once().counts["stored"] == 1
    wait_for(lambda: copy_row(app)["shown"] == "stored at center", WAIT_S,
             "the copy's receipt to be read back", detail=app.log_text)
    row = copy_row(app)
    assert row["center"]["receipt"] == "stored" and row["center"]["stored"] == len(FILES)
    assert len(pacs.get("/instances")) == len(FILES)
    r = cli("queue", "show", bundle_id, "--config", str(app.config_path))
    assert (f"receipt        archive: stored at center rc-test (stored): {len(FILES)} of"
            f" {len(FILES)} instance(s)") in r.stdout, r.stdout
    [e] = events(app, "receipt.stored")
    assert (e["bundle"], e["copy_of"], e["destination"], e["stored"]) == (
        copy_id, bundle_id, "archive", len(FILES))
    assert app.status()["receipts"][0]["awaiting"] == 0


def test_a_receipt_signed_by_the_center_for_another_file_is_refused_for_a_copy(
        appliance_factory: Any, server: Sshd, keys: Path, tmp_path: Path) -> None:
    """Signed with the center's own key, naming the bundle, but for another upload of it
    (its SHA-256 differs from the file the copy sent): refused, the copy stays uploaded."""
    app = copy_site(appliance_factory, server, keys, tmp_path / "edge")
    bundle_id, copy_id = copy_uploaded(app, server)
    other = hashlib.sha256(b"another upload of this bundle").hexdigest()
    mismatched = receipts.Receipt(bundle_id, other, "rc-test", "2026-12-07T05:00:00Z", "stored",
                                  tuple(receipts.InstanceOutcome(i, "stored") for i in range(len(FILES))))
    receipts.write(server.drop, bundle_id,
                   receipts.sign(mismatched, receipts.load_signing_key(keys / "sign.key")))
    [e] = wait_for(lambda: events(app, "receipt.ignored"), WAIT_S, "the receipt to be read",
                   detail=app.log_text)
    assert (e["bundle"], e["destination"], e["why"]) == (
        copy_id, "archive", "receipt is for another copy of the bundle (its SHA-256 differs)")
    assert copy_row(app)["shown"] == "uploaded"
    assert app.status()["receipts"][0]["awaiting"] == 1
    assert not events(app, "receipt.stored")


def test_receipts_are_read_by_name_at_most_cap_plus_one_bytes_and_none_when_absent(
        server: Sshd) -> None:
    (server.drop / "receipts").mkdir()
    (server.drop / "receipts" / f"big{receipts.SUFFIX}").write_bytes(b"x" * 1_000_000)
    (server.drop / "receipts" / f"small{receipts.SUFFIX}").write_bytes(b"{}")
    t = SftpTransport(server.destination(), KEY)
    got = t.read_receipts([("big", 1000), ("small", 1000), ("none", 1000)], threading.Event())
    assert got == {"big": b"x" * 1001, "small": b"{}", "none": None}


def test_the_daemon_refuses_to_start_with_a_receipt_key_that_is_not_an_ed25519_public_key(
        appliance_factory: Any, server: Sshd, keys: Path, tmp_path: Path) -> None:
    app = site(appliance_factory, server, keys, tmp_path / "edge")  # started: stop, break the key
    app.stop()
    (keys / "sign.pub").write_bytes((keys / "center.pub").read_bytes())  # an X25519 key
    with pytest.raises(RuntimeError, match="daemon exited with 78") as e:
        app.start()
    assert f"key file {keys / 'sign.pub'} is not an Ed25519 public key" in str(e.value)
