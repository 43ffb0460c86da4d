"""The dicom transport: its pure decision tables, and real sends to a real Orthanc on loopback.

Bundles are written here with `BundleWriter` from sample files (CT slices, an MR in
Implicit VR LE, JPEG 2000 versions made with `codec.compress`). What Orthanc stored is
read back over its REST API and compared with pydicom: same SOP Instance UIDs, same
pixels, and the transfer syntax it was stored in. TLS certificates are made here with
`cryptography`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

from appliance.bundle.format import BundleWriter, InstanceInfo
from appliance.core.config import Destination, TLSClient
from appliance.core.config import Queue as QueueConfig
from appliance.core.errors import ConfigError
from appliance.forward import Permanent, Retryable, dicom
from appliance.forward.dicom import (
    DicomTransport,
    Outcome,
    choose_context,
    classify_rejection,
    classify_status,
    classify_tls_error,
    dataset_offset,
    plan_groups,
)
from appliance.forward.scheduler import Forwarder
from appliance.pack import codec
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from tests.orthanc import Modality, Orthanc, OrthancTLS
from tests.peers import SAMPLES, free_port

KEY = X25519PrivateKey.generate()
CT_DIR = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"
MR_DIR = SAMPLES / "series" / "MR_Philips_abdomen_11sl"
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # a storage SOP class Orthanc 1.10.1 does not know
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


# --- pure: statuses -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.SUCCESS),
    (0xB000, Outcome.WARNING), (0xB006, Outcome.WARNING), (0xB007, Outcome.WARNING),
    (0xB123, Outcome.WARNING), (0x0001, Outcome.WARNING), (0x0107, Outcome.WARNING),
    (0x0116, Outcome.WARNING), (0x0111, Outcome.WARNING),
    (0xA700, Outcome.RETRY), (0xA7FF, Outcome.RETRY), (0xA702, Outcome.RETRY),
    (0x0110, Outcome.RETRY), (0x0213, Outcome.RETRY), (0x0210, Outcome.RETRY),
    (0xFE00, Outcome.RETRY), (0xFF00, Outcome.RETRY), (None, Outcome.RETRY),
    (0xA900, Outcome.PERMANENT), (0xA9FF, Outcome.PERMANENT), (0xC000, Outcome.PERMANENT),
    (0xCFFF, Outcome.PERMANENT), (0xC123, Outcome.PERMANENT), (0x0122, Outcome.PERMANENT),
    (0x0124, Outcome.PERMANENT), (0x0117, Outcome.PERMANENT), (0x0211, Outcome.PERMANENT),
    (0x0212, Outcome.PERMANENT), (0x0120, Outcome.PERMANENT),
    (0x0999, Outcome.RETRY), (0xD000, Outcome.RETRY), (0xA800, Outcome.RETRY),  # unknown
])
def test_status_table(status: int | None, outcome: Outcome) -> None:
    v = classify_status(status)
    assert v.outcome is outcome
    assert v.meaning


def test_status_meanings_name_the_condition() -> None:
    assert classify_status(0xA701).meaning == "out of resources"
    assert classify_status(0xC001).meaning == "cannot understand"
    assert classify_status(0x0122).meaning == "SOP class not supported"
    assert classify_status(0x4242).meaning == "unknown status"
    assert classify_status(None).meaning == "no response"


@pytest.mark.parametrize(("result", "source", "reason", "permanent", "text"), [
    (1, 1, 7, True, "called AE title not recognized"),
    (1, 1, 3, True, "calling AE title not recognized"),
    (1, 1, 1, True, "no reason given"),
    (1, 2, 2, True, "protocol version not supported"),
    (2, 1, 1, False, "no reason given"),
    (2, 3, 1, False, "temporary congestion"),
    (1, 3, 2, False, "local limit exceeded"),  # presentation layer: transient by nature
    (1, 1, 9, True, "source 1, reason 9"),
])
def test_association_rejection(result: int, source: int, reason: int, permanent: bool, text: str) -> None:
    assert classify_rejection(result, source, reason) == (permanent, text)


def _ssl_error(reason: str, cls: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    e = cls(1, f"[SSL: {reason}] test")
    e.reason = reason  # type: ignore[misc]
    return e


def test_tls_error_classification() -> None:
    v = ssl.SSLCertVerificationError(1, "certificate verify failed")
    v.verify_message = "unable to get local issuer certificate"  # type: ignore[misc]
    permanent, text = classify_tls_error(v)
    assert permanent and "PACS's TLS certificate was not accepted" in text
    assert "local issuer" in text
    for reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                   "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        permanent, text = classify_tls_error(_ssl_error(reason))
        assert permanent and "client certificate" in text, reason
    permanent, text = classify_tls_error(_ssl_error("WRONG_VERSION_NUMBER"))
    assert permanent and "does not speak TLS" in text
    permanent, text = classify_tls_error(_ssl_error("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError))
    assert not permanent and "closed the TLS connection during set-up" in text
    permanent, text = classify_tls_error(_ssl_error("SOMETHING_ELSE"))
    assert not permanent and "TLS connection to the PACS failed (SOMETHING_ELSE)" in text


# --- pure: presentation contexts ------------------------------------------------------------


def test_contexts_offer_the_compressed_syntax_and_the_uncompressed_pair() -> None:
    groups = plan_groups([(CT, JPEG2000Lossless), (CT, JPEG2000Lossless), (CT, ExplicitVRLittleEndian),
                          (MR, ImplicitVRLittleEndian)])
    assert len(groups) == 1
    g = groups[0]
    assert (g.start, g.stop) == (0, 4)
    pair = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert g.contexts == ((CT, (JPEG2000Lossless,)), (CT, pair), (CT, (ExplicitVRLittleEndian,)),
                          (MR, (ImplicitVRLittleEndian,)), (MR, pair))


def test_contexts_split_at_the_128_limit() -> None:
    # 100 SOP classes, each compressed: 2 contexts per class -> 200 contexts.
    instances = [(f"1.2.3.{i}", JPEG2000Lossless) for i in range(100)]
    groups = plan_groups(instances)
    assert [(g.start, g.stop) for g in groups] == [(0, 64), (64, 100)]
    assert all(len(g.contexts) <= 128 for g in groups)
    with_commitment = plan_groups(instances, commitment=True)
    assert [(g.start, g.stop) for g in with_commitment] == [(0, 63), (63, 100)]
    assert all(len(g.contexts) <= 127 for g in with_commitment)
    # Every instance's contexts are in its group.
    for g in with_commitment:
        for sop, ts in instances[g.start:g.stop]:
            assert (sop, (ts,)) in g.contexts
    assert plan_groups([]) == []


def test_choose_context() -> None:
    acc = {CT: [(1, JPEG2000Lossless), (3, ExplicitVRLittleEndian)], MR: [(5, ImplicitVRLittleEndian)]}
    assert choose_context(acc, CT, JPEG2000Lossless) == dicom.Choice(1, "as-is", JPEG2000Lossless)
    assert choose_context(acc, CT, JPEGLSLossless) == dicom.Choice(3, "explicit", ExplicitVRLittleEndian)
    assert choose_context(acc, CT, ExplicitVRLittleEndian).how == "as-is"
    assert choose_context(acc, MR, ImplicitVRLittleEndian).how == "as-is"
    assert choose_context(acc, MR, JPEG2000Lossless) == dicom.Choice(5, "implicit", ImplicitVRLittleEndian)
    with pytest.raises(Permanent, match="does not accept SOP class Photoacoustic Image Storage"):
        choose_context(acc, PHOTOACOUSTIC, ExplicitVRLittleEndian)
    with pytest.raises(Permanent, match="only as JPEG 2000"):
        choose_context({CT: [(1, JPEG2000Lossless)]}, CT, ExplicitVRLittleEndian)


def test_dataset_offset() -> None:
    raw = sorted(CT_DIR.iterdir())[0].read_bytes()
    off = dataset_offset(raw)
    assert raw[off:off + 2] == b"\x08\x00"  # group 0008 follows the meta
    with pytest.raises(ValueError, match="Part-10"):
        dataset_offset(raw[200:])
    with pytest.raises(ValueError, match="truncated"):
        dataset_offset(raw[:150])


# --- helpers for the real sends ---------------------------------------------------------------


def read(raw: bytes, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(BytesIO(raw), **kw)


def part10(ds: Any) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_slices(n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(CT_DIR.iterdir())[:n]]


def mr_slice() -> bytes:
    return sorted(MR_DIR.iterdir())[0].read_bytes()


def j2k(raw: bytes) -> bytes:
    r = codec.compress(raw, "jpeg2000", verify=False)
    assert r.action == "compressed", r.reason
    return r.data


def refused_class_instance() -> bytes:
    """A CT slice relabelled with a SOP class Orthanc 1.10.1 refuses (never stored)."""
    ds = read(ct_slices(1)[0])
    ds.SOPClassUID = PHOTOACOUSTIC
    ds.file_meta.MediaStorageSOPClassUID = PHOTOACOUSTIC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return part10(ds)


def uid_of(raw: bytes) -> str:
    return str(read(raw, stop_before_pixels=True).SOPInstanceUID)


def make_bundle(path: Path, instances: list[bytes], bundle_id: str = "b-1") -> Path:
    with path.open("wb") as f:
        w = BundleWriter(f, bundle_id, [KEY.public_key()], "study-1")
        for raw in instances:
            ds = read(raw, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            w.begin_instance(InstanceInfo(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
                transfer_syntax=ts, received_transfer_syntax=ts, received_size=len(raw),
                received_sha256=hashlib.sha256(raw).hexdigest(), action="passthrough"))
            w.write(raw)
            w.end_instance()
        w.close()
    return path


def destination(port: int, **kw: Any) -> Destination:
    args: dict[str, Any] = {"name": "pacs", "transport": "dicom", "host": "127.0.0.1", "port": port,
                            "ae_title": "ORTHANC", "calling_ae_title": "EDGE", "plaintext": True,
                            "timeout_s": 5.0}
    args.update(kw)
    if args.get("tls") is not None:
        args["plaintext"] = False
    return Destination(**args)


class Progress:
    def __init__(self, action: Callable[[int], None] | None = None) -> None:
        self.values: list[int] = []
        self.action = action

    def __call__(self, done: int) -> None:
        self.values.append(done)
        if self.action is not None and len(self.values) == 1:
            self.action(done)


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    started: list[Orthanc] = []

    def make(**kw: Any) -> Orthanc:
        p = Orthanc(tmp_path / f"orthanc{len(started)}", **kw)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        if p.pid is not None and p.proc is not None and p.proc.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
        p.stop()


@pytest.fixture
def transports() -> Iterator[list[DicomTransport]]:
    made: list[DicomTransport] = []
    yield made
    for t in made:
        t.close()


def transport(made: list[DicomTransport], dest: Destination, **kw: Any) -> DicomTransport:
    t = DicomTransport(dest, KEY, **kw)
    made.append(t)
    return t


def stored_ts(pacs: Orthanc, oid: str) -> str:
    return pacs.request("GET", f"/instances/{oid}/metadata/TransferSyntax").decode()


def assert_same_pixels(stored: bytes, reference: bytes) -> None:
    a, b = read(stored), read(reference)
    assert np.array_equal(a.pixel_array, b.pixel_array)


# --- real sends ----------------------------------------------------------------------------------


@pytest.mark.peers
def test_sends_a_bundle_with_the_same_uids_pixels_and_syntaxes(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    cts = ct_slices(4)
    compressed = [j2k(cts[2]), j2k(cts[3])]
    mr = mr_slice()
    instances = [cts[0], cts[1], mr, *compressed]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port))
    progress = Progress()
    t0 = time.monotonic()
    t.send("b-1", bundle, progress)
    elapsed = time.monotonic() - t0
    assert elapsed < 10

    assert pacs.count() == len(instances)
    sizes = [len(x) for x in instances]
    assert progress.values == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    expected_ts = [ExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                   JPEG2000Lossless, JPEG2000Lossless]
    references = [cts[0], cts[1], mr, cts[2], cts[3]]
    for raw, ts, ref in zip(instances, expected_ts, references, strict=True):
        oid = pacs.find_instance(uid_of(raw))
        assert oid is not None
        assert stored_ts(pacs, oid) == ts
        stored = pacs.instance_file(oid)
        # Sent as is: the data set Orthanc stored is byte for byte the bundle's.
        assert stored[dataset_offset(stored):] == raw[dataset_offset(raw):]
        assert_same_pixels(stored, ref)

    # Idempotent: the same bundle again changes nothing in the PACS.
    t.send("b-1", bundle, Progress())
    assert pacs.count() == len(instances)


@pytest.mark.peers
def test_several_associations_when_contexts_do_not_fit_one(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom.transport, "MAX_CONTEXTS", 3)  # 2 + 1 for storage commitment
    cts = ct_slices(2)
    instances = [cts[0], mr_slice(), j2k(cts[1])]  # 2 contexts each: 3 associations
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    listen = free_port()
    pacs = pacs_factory(modalities={"edge": Modality("EDGE", "127.0.0.1", listen)})
    t = transport(transports, destination(pacs.dicom_port, storage_commitment=True),
                  commitment_port=listen, commitment_bind="127.0.0.1")
    opened: list[int] = []
    associate = t._associate

    def counting(specs: Any, ctx: Any, cancelled: Any = None) -> Any:
        opened.append(len(specs))
        return associate(specs, ctx, cancelled)

    monkeypatch.setattr(t, "_associate", counting)
    t.send("b-1", bundle, Progress())
    assert opened == [2, 2, 3]  # the last one also carries the N-ACTION (all 3 instances)
    assert sorted(pacs.files_by_sop_uid()) == sorted(uid_of(x) for x in instances)


@pytest.mark.peers
def test_falls_back_to_uncompressed_when_the_peer_refuses_jpeg2000(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    cts = ct_slices(3)
    instances = [j2k(cts[0]), j2k(cts[1]), cts[2]]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    pacs = pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})
    t = transport(transports, destination(pacs.dicom_port))
    t.send("b-1", bundle, Progress())
    assert pacs.count() == 3
    for raw, ref in zip(instances, cts, strict=True):
        oid = pacs.find_instance(uid_of(raw))
        assert oid is not None
        assert stored_ts(pacs, oid) == ExplicitVRLittleEndian
        stored = pacs.instance_file(oid)
        assert_same_pixels(stored, ref)
        s, r = read(stored), read(ref)
        assert s.SOPInstanceUID == r.SOPInstanceUID
        assert s.PixelData == r.PixelData


@pytest.mark.peers
def test_a_refused_sop_class_is_permanent_and_nothing_is_sent(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port))
    odd = refused_class_instance()
    mixed = make_bundle(tmp_path / "mixed.bundle", [ct_slices(1)[0], odd], "mixed")
    with pytest.raises(Permanent, match="does not accept SOP class Photoacoustic Image Storage") as e:
        t.send("mixed", mixed, Progress())
    assert uid_of(odd) not in str(e.value)
    alone = make_bundle(tmp_path / "alone.bundle", [odd], "alone")
    with pytest.raises(Permanent, match="Photoacoustic Image Storage"):
        t.send("alone", alone, Progress())
    assert pacs.count() == 0


@pytest.mark.peers
def test_a_bundle_that_does_not_verify_goes_to_quarantine_and_the_queue_moves_on(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    q = Queue(state, open_index(state))
    good, bad = ct_slices(2)
    for item_id, raw, created in (("bad1", bad, 1.0), ("good1", good, 2.0)):
        make_bundle(q.path(item_id), [raw], item_id)
        with q.index.tx() as c:
            c.execute("INSERT INTO segments(id, study_key, state, priority, created, updated,"
                      " instances, bytes) VALUES (?,?,?,?,?,?,1,?)",
                      (item_id, "k" * 16, "ready", 0, created, created, len(raw)))
    tampered = bytearray(q.path("bad1").read_bytes())
    tampered[len(tampered) // 2] ^= 0x01  # one bit of the payload
    q.path("bad1").write_bytes(bytes(tampered))
    pacs = pacs_factory()
    fwd = Forwarder(q, [transport(transports, destination(pacs.dicom_port))], QueueConfig())

    assert fwd.run_once() and fwd.run_once()  # the older, bad one first; then the good one

    item = q.get("bad1")
    assert item.state == "failed" and item.reason is not None
    assert item.reason.startswith("quarantined: bundle does not verify")
    assert not q.path("bad1").exists()
    kept = list(q.quarantine_dir.glob("bad1.bundle.*"))
    assert [p.read_bytes() for p in kept] == [bytes(tampered)]  # kept as it was, for a human
    assert q.get("good1").state == "delivered"
    assert pacs.count() == 1 and pacs.find_instance(uid_of(good)) is not None
    assert fwd.run_once() is False  # nothing retries the quarantined one


@pytest.mark.peers
def test_pacs_down_is_retryable_at_once(tmp_path: Path, transports: list[DicomTransport]) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    t = transport(transports, destination(free_port(), timeout_s=10))
    t0 = time.monotonic()
    with pytest.raises(Retryable, match="refused the connection"):
        t.send("b-1", bundle, Progress())
    assert time.monotonic() - t0 < 2


@pytest.mark.peers
def test_pacs_killed_mid_bundle_is_retryable_at_once(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(6))
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port, timeout_s=10))
    assert pacs.pid is not None
    pid = pacs.pid
    progress = Progress(lambda _: os.kill(pid, signal.SIGKILL))
    t0 = time.monotonic()
    with pytest.raises(Retryable, match="lost|aborted") as e:
        t.send("b-1", bundle, progress)
    assert time.monotonic() - t0 < 3, "waited for a timeout instead of noticing the dead peer"
    assert "while sending instance 1 of 6" in str(e.value)
    assert len(progress.values) == 1


@pytest.mark.peers
def test_frozen_pacs_is_retryable_within_the_timeout(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(6))
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port, timeout_s=2))
    assert pacs.pid is not None
    pid = pacs.pid
    t0 = time.monotonic()
    try:
        with pytest.raises(Retryable, match="no answer from the PACS within 2 s"):
            t.send("b-1", bundle, Progress(lambda _: os.kill(pid, signal.SIGSTOP)))
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert 1.5 < elapsed < 6


@pytest.mark.peers
def test_frozen_pacs_is_judged_by_the_timeout_not_the_link_timeout(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    """A frozen PACS's machine still acknowledges (then answers zero-window probes): the
    short link timeout (TCP_USER_TIMEOUT) must not cut it short, only `timeout_s` may."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(6))
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port, timeout_s=6, link_timeout_s=2))
    assert pacs.pid is not None
    pid = pacs.pid
    t0 = time.monotonic()
    try:
        with pytest.raises(Retryable, match="no answer from the PACS within 6 s") as e:
            t.send("b-1", bundle, Progress(lambda _: os.kill(pid, signal.SIGSTOP)))
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "went silent" not in str(e.value)
    assert e.value.instances, "a PACS that stopped answering mid-instance makes it a suspect"
    assert 5 < elapsed < 12


def test_a_connect_nobody_answers_gives_up_after_link_timeout_not_timeout(
        tmp_path: Path, transports: list[DicomTransport]) -> None:
    """A listener whose accept queue is full: the kernel drops further SYNs, as a silent
    link would. The TCP connect ends after link_timeout_s (2), not timeout_s (30): the SYN
    is answered by the server's kernel, not by the PACS."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as queued:
        queued.connect(full.getsockname())  # fills the queue: nothing accepts it
        t = transport(transports, destination(full.getsockname()[1], timeout_s=30, link_timeout_s=2))
        t0 = time.monotonic()
        with pytest.raises(Retryable, match=r"cannot connect .*: no answer within 2 s \(link_timeout_s\)"):
            t.send("b-1", bundle, Progress())
    assert time.monotonic() - t0 < 10


# --- TLS --------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
          ips: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.DNSName(d) for d in dns]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class PKI:
    """A CA with a PACS and an appliance certificate, and a second CA nobody trusts."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        self._write("ca", ca_key, _cert("Test CA", ca_key, "Test CA", ca_key, True))
        self._write("rogue-ca", rogue_key, _cert("Rogue CA", rogue_key, "Rogue CA", rogue_key, True))
        for name, issuer, ikey, ips, dns in (
                ("pacs", "Test CA", ca_key, ("127.0.0.1",), ("pacs.example",)),
                ("edge", "Test CA", ca_key, ("127.0.0.1",), ()),
                ("rogue", "Rogue CA", rogue_key, (), ())):
            k = ec.generate_private_key(ec.SECP256R1())
            self._write(name, k, _cert(name, k, issuer, ikey, False, ips, dns))

    def _write(self, name: str, key: Any, cert: x509.Certificate) -> None:
        p = self.dir / f"{name}.key"
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        p.chmod(0o600)
        (self.dir / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def client(self, name: str = "edge", ca: str = "ca") -> TLSClient:
        d = self.dir
        return TLSClient(cert=d / f"{name}.crt", key=d / f"{name}.key", ca=d / f"{ca}.crt")

    def orthanc(self) -> OrthancTLS:
        return OrthancTLS(self.dir / "pacs.crt", self.dir / "pacs.key", self.dir / "ca.crt")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.mark.peers
def test_dicom_tls_with_mutual_authentication_and_commitment(
        tmp_path: Path, pki: PKI, pacs_factory: Callable[..., Orthanc],
        transports: list[DicomTransport]) -> None:
    listen = free_port()
    pacs = pacs_factory(tls=pki.orthanc(),
                        modalities={"edge": Modality("EDGE", "127.0.0.1", listen, use_tls=True)})
    instances = [*ct_slices(2), mr_slice()]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    t = transport(transports, destination(pacs.dicom_port, tls=pki.client(), storage_commitment=True),
                  commitment_port=listen, commitment_bind="127.0.0.1")
    t.send("b-1", bundle, Progress())
    assert sorted(pacs.files_by_sop_uid()) == sorted(uid_of(x) for x in instances)


@pytest.mark.peers
def test_tls_certificate_failures_are_permanent(
        tmp_path: Path, pki: PKI, pacs_factory: Callable[..., Orthanc],
        transports: list[DicomTransport]) -> None:
    pacs = pacs_factory(tls=pki.orthanc())
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    cases = [
        # Orthanc does not trust our client certificate.
        (destination(pacs.dicom_port, tls=pki.client("rogue")),
         "rejected this appliance's TLS client certificate"),
        # We do not trust Orthanc's certificate.
        (destination(pacs.dicom_port, tls=pki.client(ca="rogue-ca")),
         "PACS's TLS certificate was not accepted"),
        # A host name is checked against the certificate (it names pacs.example only).
        (destination(pacs.dicom_port, host="localhost", tls=pki.client()),
         "PACS's TLS certificate was not accepted: Hostname mismatch"),
    ]
    for dest, reason in cases:
        t = transport(transports, dest)
        t0 = time.monotonic()
        with pytest.raises(Permanent, match=reason):
            t.send("b-1", bundle, Progress())
        assert time.monotonic() - t0 < 3
    # Plaintext to a TLS-only port: not accepted either, and not a hang.
    t = transport(transports, destination(pacs.dicom_port, timeout_s=3))
    t0 = time.monotonic()
    with pytest.raises((Retryable, Permanent)):
        t.send("b-1", bundle, Progress())
    assert time.monotonic() - t0 < 5
    assert pacs.count() == 0


def test_a_tls_connect_nobody_answers_gives_up_after_link_timeout(
        tmp_path: Path, pki: PKI, transports: list[DicomTransport]) -> None:
    """The same full accept queue under TLS: the TCP connect is bounded by link_timeout_s
    (2) although pynetdicom wraps the socket before connecting."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as queued:
        queued.connect(full.getsockname())
        t = transport(transports, destination(full.getsockname()[1], tls=pki.client(), timeout_s=30,
                                              link_timeout_s=2))
        t0 = time.monotonic()
        with pytest.raises(Retryable, match=r"cannot connect .*: no answer within 2 s \(link_timeout_s\)"):
            t.send("b-1", bundle, Progress())
    assert time.monotonic() - t0 < 10


def test_a_tls_handshake_nobody_answers_is_judged_by_the_timeout_not_the_link_timeout(
        tmp_path: Path, pki: PKI, transports: list[DicomTransport]) -> None:
    """A server that accepts but never answers the ClientHello (the PACS process, not its
    kernel, is slow): the handshake may take timeout_s (4), not only link_timeout_s (1)."""
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    with socket.create_server(("127.0.0.1", 0)) as mute:
        t = transport(transports, destination(mute.getsockname()[1], tls=pki.client(), timeout_s=4,
                                              link_timeout_s=1))
        t0 = time.monotonic()
        with pytest.raises(Retryable, match="timed out after 4 s"):
            t.send("b-1", bundle, Progress())
        elapsed = time.monotonic() - t0
    assert 3.5 < elapsed < 9


def test_missing_tls_files_are_a_config_error(tmp_path: Path) -> None:
    tls = TLSClient(cert=tmp_path / "no.crt", key=tmp_path / "no.key", ca=tmp_path / "no-ca.crt")
    with pytest.raises(ConfigError, match="cannot load the TLS client certificate"):
        DicomTransport(destination(104, tls=tls), KEY)
    with pytest.raises(ConfigError, match="tls is required"):
        DicomTransport(destination(104, plaintext=False), KEY)


# --- storage commitment ---------------------------------------------------------------------


@pytest.mark.peers
def test_storage_commitment_delivers_only_after_a_complete_report(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport],
        monkeypatch: pytest.MonkeyPatch) -> None:
    instances = ct_slices(3)
    dropped = uid_of(instances[1])
    # Orthanc answers Success to a C-STORE its filter drops: only the commitment notices.
    lua = tmp_path / "drop.lua"
    lua.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                   f"  return dicom.SOPInstanceUID ~= '{dropped}'\nend\n")
    listen = free_port()
    pacs = pacs_factory(modalities={"edge": Modality("EDGE", "127.0.0.1", listen)},
                        extra={"LuaScripts": [str(lua)]})
    judged: list[tuple[bool, int]] = []
    judge = DicomTransport._judge

    def spy(self: DicomTransport, item_id: str, waiter: Any, n: int, listening: bool) -> None:
        judged.append((waiter.event.is_set(), len(waiter.committed)))
        judge(self, item_id, waiter, n, listening)

    monkeypatch.setattr(DicomTransport, "_judge", spy)
    t = transport(transports, destination(pacs.dicom_port, storage_commitment=True),
                  commitment_port=listen, commitment_bind="127.0.0.1")

    ok = make_bundle(tmp_path / "ok.bundle", [instances[0], instances[2]], "ok")
    t.send("ok", ok, Progress())
    assert judged == [(True, 2)]

    bad = make_bundle(tmp_path / "bad.bundle", instances, "bad")
    progress = Progress()
    reason = r"did not commit 1 of 3 instances \(instance 1: no such object instance\)"
    with pytest.raises(Retryable, match=reason) as e:
        t.send("bad", bad, progress)
    assert dropped not in str(e.value)
    assert len(progress.values) == 3  # every C-STORE succeeded; the report decided
    assert judged[-1] == (True, 2)


@pytest.mark.peers
def test_storage_commitment_without_a_report_is_retryable(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[DicomTransport]) -> None:
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    # Orthanc knows our AE title but sends its report where nobody listens.
    pacs = pacs_factory(modalities={"edge": Modality("EDGE", "127.0.0.1", free_port())})
    t = transport(transports, destination(pacs.dicom_port, storage_commitment=True, timeout_s=2,
                                                 commitment_timeout_s=2))
    t0 = time.monotonic()
    with pytest.raises(Retryable, match="no complete storage commitment report within 2 s"):
        t.send("b-1", bundle, Progress())
    assert 1.5 < time.monotonic() - t0 < 6
    # An Orthanc that does not know our AE title aborts the request.
    other = pacs_factory()
    t = transport(transports, destination(other.dicom_port, storage_commitment=True, timeout_s=2))
    with pytest.raises(Retryable, match="AE title 'EDGE'"):
        t.send("b-1", bundle, Progress())


# --- a pynetdicom SCP as the peer: statuses, rejection, same-association reports ----------------


class FakePACS:
    """A pynetdicom Storage + Storage Commitment SCP that answers what the test says."""

    def __init__(self, statuses: dict[str, int] | None = None, report_on_association: bool = False,
                 calling_aets: list[str] | None = None, syntaxes: list[str] | None = None) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import StorageCommitmentPushModel

        self.statuses = statuses or {}
        self.report_on_association = report_on_association
        self.stored: list[str] = []
        self.datasets: dict[str, Any] = {}
        ae = AE("ORTHANC")
        # pynetdicom's own send_n_event_report can lose our response to a race of its
        # reactor (it pauses it per request): keep the fake from waiting long for it.
        ae.dimse_timeout = 2
        ae.add_supported_context(CT, syntaxes or ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(StorageCommitmentPushModel)
        if calling_aets is not None:
            ae.require_calling_aet = calling_aets
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.stored.append(uid)
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.datasets[uid] = ds
        return self.statuses.get(uid, 0x0000)

    def _action(self, event: Any) -> tuple[int, None]:
        import threading

        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StorageCommitmentPushModel

        req = event.action_information
        report = Dataset()
        report.TransactionUID = req.TransactionUID
        report.ReferencedSOPSequence = list(req.ReferencedSOPSequence)
        assoc = event.assoc

        def send() -> None:
            time.sleep(0.1)  # after the N-ACTION response
            assoc.send_n_event_report(report, 1, StorageCommitmentPushModel,
                                      dicom.STORAGE_COMMITMENT_INSTANCE)

        if self.report_on_association:
            threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_pacs() -> Iterator[Callable[..., FakePACS]]:
    made: list[FakePACS] = []

    def make(**kw: Any) -> FakePACS:
        f = FakePACS(**kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize(("status", "outcome"), [
    (0xB000, None), (0x0111, None), (0xA700, Retryable), (0x0110, Retryable), (0x4242, Retryable),
    (0xC000, Permanent), (0xA900, Permanent), (0x0124, Permanent),
])
def test_c_store_statuses_from_the_peer(tmp_path: Path, fake_pacs: Callable[..., FakePACS],
                                         transports: list[DicomTransport], status: int,
                                         outcome: type[Exception] | None) -> None:
    cts = ct_slices(2)
    pacs = fake_pacs(statuses={uid_of(cts[0]): status})
    bundle = make_bundle(tmp_path / "b.bundle", cts)
    t = transport(transports, destination(pacs.port))
    if outcome is None:
        t.send("b-1", bundle, Progress())
        assert len(pacs.stored) == 2
        return
    with pytest.raises(outcome, match=rf"the PACS answered 0x{status:04X} \(.+\) to instance 0 "
                                      r"\(CT Image Storage\)") as e:
        t.send("b-1", bundle, Progress())
    assert uid_of(cts[0]) not in str(e.value)
    assert len(pacs.stored) == 1  # stopped at the first failure


def test_association_rejected_permanently_names_the_reason(
        tmp_path: Path, fake_pacs: Callable[..., FakePACS], transports: list[DicomTransport]) -> None:
    pacs = fake_pacs(calling_aets=["SOMEONE"])
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(1))
    t = transport(transports, destination(pacs.port))
    with pytest.raises(Permanent, match="rejected the association permanently: calling AE title "
                                        "not recognized .this appliance calls as 'EDGE'"):
        t.send("b-1", bundle, Progress())


def test_commitment_report_on_the_same_association(
        tmp_path: Path, fake_pacs: Callable[..., FakePACS], transports: list[DicomTransport],
        monkeypatch: pytest.MonkeyPatch) -> None:
    judged: list[tuple[bool, float]] = []
    judge = DicomTransport._judge

    def spy(self: DicomTransport, item_id: str, waiter: Any, n: int, listening: bool) -> None:
        judged.append((waiter.event.is_set(), time.monotonic()))
        judge(self, item_id, waiter, n, listening)

    monkeypatch.setattr(DicomTransport, "_judge", spy)
    pacs = fake_pacs(report_on_association=True)
    bundle = make_bundle(tmp_path / "b.bundle", ct_slices(2))
    t = transport(transports, destination(pacs.port, storage_commitment=True, timeout_s=5))
    t0 = time.monotonic()
    t.send("b-1", bundle, Progress())
    assert len(judged) == 1
    complete, when = judged[0]
    assert complete and when - t0 < 3  # the report ended the wait, not the timeout
    # Without a report, the same peer makes it Retryable.
    silent = fake_pacs()
    t = transport(transports, destination(silent.port, storage_commitment=True, timeout_s=1,
                                          commitment_timeout_s=1))
    with pytest.raises(Retryable, match="no complete storage commitment report within 1 s"):
        t.send("b-1", bundle, Progress())


def test_a_peer_that_takes_only_implicit_vr_gets_decoded_pixels(
        tmp_path: Path, fake_pacs: Callable[..., FakePACS], transports: list[DicomTransport]) -> None:
    pacs = fake_pacs(syntaxes=[ImplicitVRLittleEndian])
    cts = ct_slices(2)
    instances = [j2k(cts[0]), cts[1]]
    bundle = make_bundle(tmp_path / "b.bundle", instances)
    t = transport(transports, destination(pacs.port))
    t.send("b-1", bundle, Progress())
    for raw, ref in zip(instances, cts, strict=True):
        got = pacs.datasets[uid_of(raw)]
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        want = read(ref)
        assert got.SOPInstanceUID == want.SOPInstanceUID
        assert got.PixelData == want.PixelData
