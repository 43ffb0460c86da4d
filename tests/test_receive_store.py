"""C-STORE outcomes a modality and an operator see: duplicates, refusals, status, queue."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import encode, encode_file_meta
from pynetdicom.sop_class import Verification

from tests.peers import Appliance, cli, free_port, storescu
from tests.receive_support import STATUS_C211, STATUS_C212, held_config, meta_uids, split_part10

ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"

Factory = Callable[..., Appliance]


@pytest.fixture
def app(appliance_factory: Factory, tmp_path: Path) -> Appliance:
    root = tmp_path / "appliance"
    return appliance_factory(held_config(root, free_port()), root=root)


def ct(study: str | None = None, name: str = "Store^Test") -> Dataset:
    """A small CT instance with fresh UIDs (and no sample's patient data)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = name, "STORE-0001", "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_part10(path: Path, ds: Dataset, meta_sop_instance: str) -> Path:
    """A Part-10 file whose file meta names `meta_sop_instance`, whatever the data set says."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    body = encode(ds, False, True)
    assert body is not None
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


@contextmanager
def association(port: int, aet: str = "MODALITY") -> Iterator[Association]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established, "association was not accepted"
    try:
        yield assoc
    finally:
        assoc.release()
        ae.shutdown()


def store(assoc: Association, ds: Dataset | Path) -> int:
    rsp = assoc.send_c_store(ds)
    assert "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)


def spooled_sop_uids(app: Appliance) -> list[str]:
    return [meta_uids(split_part10(p)[1])["MediaStorageSOPInstanceUID"] for p in app.spooled().values()]


def assert_still_serves(app: Appliance) -> None:
    """A new association: C-ECHO and a valid store succeed, and the instance is spooled."""
    good = ct()
    with association(app.port) as assoc:
        assert int(assoc.send_c_echo().Status) == 0x0000
        assert store(assoc, good) == 0x0000
    assert str(good.SOPInstanceUID) in spooled_sop_uids(app)


def test_same_file_sent_twice_is_stored_once(app: Appliance, samples: Path) -> None:
    """A modality that sends an instance again (it never saw our answer) gets Success
    both times; the spool keeps one copy and status counts one duplicate."""
    f = samples / ONE_CT
    for _ in range(2):
        r = storescu(app.port, [f])
        assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    st = app.status()["receive"]
    assert (st["instances_received"], st["instances_duplicate"]) == (2, 1)
    assert spooled_sop_uids(app) == [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)]


def test_sop_instance_uid_differing_from_request_is_refused(
        app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE whose Affected SOP Instance UID is not the data set's SOP Instance UID
    gets 0xC212, nothing is spooled, and the daemon keeps serving."""
    # pynetdicom takes the request's UID from the data set it encodes; sent from a file
    # in chunks, it takes it from the file meta instead and sends the data set bytes as
    # they are. So a file whose meta names another instance makes a mismatched request.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = ct()
    path = write_part10(tmp_path / "mismatch.dcm", ds, meta_sop_instance=generate_uid())
    with association(app.port) as assoc:
        assert store(assoc, path) == STATUS_C212
    assert spooled_sop_uids(app) == []
    assert app.status()["receive"]["instances_refused"] == {"uid_mismatch": 1}
    assert_still_serves(app)


def test_data_set_without_study_uid_is_refused(app: Appliance) -> None:
    """A data set without Study Instance UID cannot be grouped into a study: 0xC211,
    nothing is spooled, and the daemon keeps serving."""
    ds = ct()
    del ds.StudyInstanceUID
    with association(app.port) as assoc:
        assert store(assoc, ds) == STATUS_C211
    assert spooled_sop_uids(app) == []
    assert app.status()["receive"]["instances_refused"] == {"missing_uids": 1}
    assert_still_serves(app)


_UID_LIKE = re.compile(rb"\d+(\.\d+){3,}")


def test_status_and_queue_list_report_outcomes_without_uids(
        app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance status --json` counts received, duplicate and refused-by-reason;
    `appliance queue list --json` shows one segment per study with its instance count
    and bytes, and neither names a UID."""
    study_a, study_b = generate_uid(), generate_uid()
    a1, a2, b1 = ct(study_a), ct(study_a), ct(study_b)
    no_study = ct()
    del no_study.StudyInstanceUID
    mismatch = write_part10(tmp_path / "mismatch.dcm", ct(study_b), meta_sop_instance=generate_uid())
    with association(app.port) as assoc:
        assert [store(assoc, d) for d in (a1, a2, a1, b1, no_study)] == [0, 0, 0, 0, STATUS_C211]
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        assert store(assoc, mismatch) == STATUS_C212

    st = app.status()
    r = st["receive"]
    assert r["instances_received"] == 4 and r["instances_duplicate"] == 1
    assert r["instances_refused"] == {"missing_uids": 1, "uid_mismatch": 1}

    q = cli("queue", "list", "--json", "--config", str(app.config_path))
    assert q.returncode == 0, q.stderr
    segments = json.loads(q.stdout)
    # Expected from the spool itself: instances and Part-10 bytes per study.
    expected: Counter[tuple[int, int]] = Counter()
    per_study: dict[str, list[int]] = {}
    for part10 in app.spooled().values():
        study = str(pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True).StudyInstanceUID)
        per_study.setdefault(study, []).append(len(part10))
    expected.update((len(v), sum(v)) for v in per_study.values())
    assert set(per_study) == {study_a, study_b}
    assert Counter((s["instances"], s["bytes"]) for s in segments) == expected

    sent_uids = {str(u) for d in (a1, a2, b1, no_study, pydicom.dcmread(mismatch))
                 for u in (d.get("StudyInstanceUID"), d.get("SeriesInstanceUID"), d.SOPInstanceUID) if u}
    for out in (q.stdout, json.dumps(st)):
        assert not [u for u in sent_uids if u in out]
    assert not _UID_LIKE.search(q.stdout.encode()), q.stdout
