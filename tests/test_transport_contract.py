"""One conformance suite for every transport: the fake, the directory, the dicom (Orthanc),
the sftp (OpenSSH sshd), the dicomweb (Orthanc's DICOMweb plugin).

The contract is in appliance/forward/__init__.py: deliver and report each instance the
destination now holds; a missing bundle is Permanent; a bundle that fails authentication
is Unreadable; an unreachable destination is Retryable and blames no instance; a cancelled
attempt stops with Retryable; `skip` and `only` are honoured by transports that deliver
instance by instance (a folder or an SFTP drop takes a bundle whole, so the directory and
sftp transports ignore them, as their docstrings say).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.bundle.format import BundleWriter, InstanceInfo
from appliance.core.config import Destination
from appliance.forward import Permanent, Plan, Retryable, Transport, Unreadable
from appliance.forward.dicom import DicomTransport
from appliance.forward.dicomweb import DicomWebTransport
from appliance.forward.directory import DirectoryTransport
from appliance.forward.sftp import SftpTransport
from tests.fake_transport import FakeDestination, FakeTransport
from tests.orthanc import Orthanc
from tests.peers import SAMPLES, free_port
from tests.sshd import Sshd

KEY = X25519PrivateKey.generate()
CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def make_bundle(path: Path, n: int = 3, first: int = 0) -> tuple[Path, list[str]]:
    """A bundle of `n` CT slices from the sample series, starting at slice `first` (so
    that bundles made with different `first` hold different SOP instances)."""
    raws = [p.read_bytes() for p in sorted(CT.iterdir())[first:first + n]]
    assert len(raws) == n, "not that many slices in the sample series"
    uids = []
    with path.open("wb") as f:
        w = BundleWriter(f, path.stem, [KEY.public_key()], "study-1")
        for raw in raws:
            ds = pydicom.dcmread(path_like(raw), stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            uids.append(str(ds.SOPInstanceUID))
            w.begin_instance(InstanceInfo(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
                transfer_syntax=ts, received_transfer_syntax=ts, received_size=len(raw),
                received_sha256=hashlib.sha256(raw).hexdigest(), action="passthrough"))
            w.write(raw)
            w.end_instance()
        w.close()
    return path, uids


def path_like(raw: bytes) -> Any:
    return io.BytesIO(raw)


@dataclass
class Kind:
    """A transport under test and a way to ask its destination what it holds."""

    transport: Transport
    holds: Any  # (list of SOP Instance UIDs) -> count held
    unreachable: Transport


@pytest.fixture(params=["fake", "directory", "dicom", "sftp", "dicomweb"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    with _kind(request.param, tmp_path) as k:
        yield k


@pytest.fixture(params=["fake", "dicom", "dicomweb"])
def partial_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    """The transports that deliver instance by instance (a folder takes a bundle whole,
    so the directory transport ignores skip/only, as its docstring says)."""
    with _kind(request.param, tmp_path) as k:
        yield k


@contextlib.contextmanager
def _kind(name: str, tmp_path: Path) -> Iterator[Kind]:
    if name == "fake":
        dest = FakeDestination()
        down = FakeDestination()
        down.down = True
        yield Kind(FakeTransport("fake", dest, KEY), lambda uids: sum(dest.stored[u] > 0 for u in uids),
                   FakeTransport("down", down, KEY))
    elif name == "directory":
        folder = tmp_path / "nas"
        folder.mkdir()

        def held(uids: list[str]) -> int:
            return len(uids) if list(folder.glob("*.bundle")) else 0
        yield Kind(DirectoryTransport("nas", folder, KEY), held,
                   DirectoryTransport("gone", tmp_path / "not-mounted", KEY))
    elif name == "sftp":
        with Sshd(tmp_path / "sshd") as server:
            def in_drop(uids: list[str]) -> int:
                return len(uids) if list(server.drop.glob("*.bundle")) else 0
            yield Kind(SftpTransport(server.destination(), KEY), in_drop,
                       SftpTransport(server.destination(port=free_port(), timeout_s=5.0), KEY))
    elif name == "dicomweb":
        with Orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
            def web(url: str) -> Destination:
                return Destination(name="web", transport="dicomweb", url=url, plaintext=True, timeout_s=5.0)
            yield Kind(DicomWebTransport(web(pacs.dicomweb_url), KEY),
                       lambda uids: sum(pacs.find_instance(u) is not None for u in uids),
                       DicomWebTransport(web(f"http://127.0.0.1:{free_port()}/dicom-web"), KEY))
    else:
        with Orthanc(tmp_path / "orthanc") as pacs:
            def dest(port: int) -> Destination:
                return Destination(name="pacs", transport="dicom", host="127.0.0.1", port=port,
                                   ae_title="ORTHANC", calling_ae_title="EDGE", plaintext=True,
                                   timeout_s=5.0)
            t, gone = DicomTransport(dest(pacs.dicom_port), KEY), DicomTransport(dest(free_port()), KEY)
            try:
                yield Kind(t, lambda uids: sum(pacs.find_instance(u) is not None for u in uids), gone)
            finally:
                t.close()
                gone.close()


def test_delivers_the_bundle_and_reports_every_instance(kind: Kind, tmp_path: Path) -> None:
    bundle, uids = make_bundle(tmp_path / "b1.bundle")
    got: list[int] = []
    kind.transport.send("b1", bundle, lambda n: None, Plan(delivered=got.append))
    assert sorted(got) == [0, 1, 2]
    assert kind.holds(uids) == 3


def test_a_missing_bundle_file_is_permanent(kind: Kind, tmp_path: Path) -> None:
    with pytest.raises(Permanent) as e:
        kind.transport.send("b1", tmp_path / "nothing.bundle", lambda n: None)
    assert not isinstance(e.value, Unreadable)


def test_a_missing_bundle_file_is_the_bundles_fault_not_the_destinations(kind: Kind, tmp_path: Path) -> None:
    """It must never count towards marking the destination down (forward.failover)."""
    with pytest.raises(Permanent) as e:
        kind.transport.send("b1", tmp_path / "nothing.bundle", lambda n: None)
    assert e.value.scope == "bundle"


def test_a_bundle_that_fails_authentication_is_unreadable(kind: Kind, tmp_path: Path) -> None:
    bundle, uids = make_bundle(tmp_path / "b1.bundle")
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    got: list[int] = []
    with pytest.raises(Unreadable):
        kind.transport.send("b1", bundle, lambda n: None, Plan(delivered=got.append))
    assert got == [] and kind.holds(uids) == 0


def test_an_unreachable_destination_is_retryable_and_blames_no_instance(kind: Kind, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Retryable) as e:
        kind.unreachable.send("b1", bundle, lambda n: None)
    assert e.value.instances == () and e.value.scope == "destination"


def test_a_cancelled_attempt_stops_with_retryable(kind: Kind, tmp_path: Path) -> None:
    bundle, uids = make_bundle(tmp_path / "b1.bundle")
    plan = Plan()
    plan.cancelled.set()
    t0 = time.monotonic()
    with pytest.raises(Retryable):
        kind.transport.send("b1", bundle, lambda n: None, plan)
    assert time.monotonic() - t0 < 5
    assert kind.holds(uids) == 0


def test_skip_and_only_leave_out_what_the_plan_says(partial_kind: Kind, tmp_path: Path) -> None:
    kind = partial_kind
    bundle, uids = make_bundle(tmp_path / "b1.bundle")
    got: list[int] = []
    kind.transport.send("b1", bundle, lambda n: None, Plan(skip=frozenset({0}), delivered=got.append))
    assert sorted(got) == [1, 2] and kind.holds(uids[:1]) == 0 and kind.holds(uids[1:]) == 2
    got.clear()
    kind.transport.send("b1", bundle, lambda n: None, Plan(only=frozenset({0}), delivered=got.append))
    assert got == [0] and kind.holds(uids) == 3


def test_a_check_gives_the_probes_answer_and_says_why(kind: Kind) -> None:
    good, bad = kind.transport.check(), kind.unreachable.check()
    assert good.ok is True and good.detail
    assert bad.ok is False and bad.detail and bad.detail != good.detail


def test_a_probe_says_whether_the_destination_answers(kind: Kind) -> None:
    assert kind.transport.probe() is True
    t0 = time.monotonic()
    assert kind.unreachable.probe() is False
    assert time.monotonic() - t0 < 10
