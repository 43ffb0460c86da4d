"""The dicom transport streams a large instance from the bundle to the association
(`Link.store_streamed`): the wire bytes are pynetdicom's own, the PACS stores exactly the
instance, the sender never holds it whole in memory, and a bundle that changes after it
was verified never completes its C-STORE (the association is aborted before the last
P-DATA fragment, so the PACS drops what it got).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import dimse, dul, fsm
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from structlog.testing import capture_logs

from appliance.bundle import format as bundle
from appliance.bundle.format import BundleWriter, InstanceInfo
from appliance.core import crypto
from appliance.forward import Permanent, Retryable
from appliance.forward.dicom import dataset_offset, link
from appliance.forward.dicom import transport as transport_mod
from appliance.pack import codec
from tests.orthanc import Orthanc
from tests.test_forward_dicom import (  # noqa: F401 - pacs_factory, transports: fixtures
    KEY,
    Progress,
    ct_slices,
    destination,
    j2k,
    make_bundle,
    mr_slice,
    pacs_factory,
    stored_ts,
    transport,
    transports,
    uid_of,
)
from tests.test_intake import MF_SC, write_multiframe
from tests.test_stream_convert import reencapsulate, split_frame, write_j2k_multiframe
from tests.test_stream_pack import multiframe

MiB = 1 << 20


# --- the pynetdicom internals the streaming hook relies on ------------------------------


def _pdvs(pdus: list[Any]) -> list[tuple[int, bytes]]:
    return [pdv for p in pdus for pdv in p.presentation_data_value_list]


def _primitive(dataset: bytes | None) -> C_STORE:
    req = C_STORE()
    req.MessageID = 7
    req.Priority = 2
    req.AffectedSOPClassUID = MF_SC
    req.AffectedSOPInstanceUID = "1.2.3.4.5.6"
    req.DataSet = None if dataset is None else io.BytesIO(dataset)
    return req


@pytest.mark.parametrize("max_pdu", [16384, 4096, 131072])
def test_streamed_pdus_are_exactly_what_pynetdicom_sends(max_pdu: int) -> None:
    """`command_pdus` + `data_pdu` must give the P-DATA pynetdicom's own send_msg would
    queue for the same C-STORE (command set, fragmentation, control headers). A
    pynetdicom upgrade that changes its encoding or the hooks used fails here."""
    dataset = os.urandom(100_000)
    theirs = C_STORE_RQ()
    theirs.primitive_to_message(_primitive(dataset))
    expected = _pdvs(list(theirs.encode_msg(3, max_pdu)))

    frag = link.fragment_size(max_pdu)
    pieces = [dataset[i:i + frag] for i in range(0, len(dataset), frag)]
    ours = link.command_pdus(_primitive(None), 3, max_pdu)
    ours += [link.data_pdu(3, p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert _pdvs(ours) == expected


def test_fragments_are_capped_whatever_the_peer_allows() -> None:
    assert link.fragment_size(16384) == 16378
    assert link.fragment_size(0) == link.MAX_FRAGMENT
    assert link.fragment_size(1 << 30) == link.MAX_FRAGMENT


def test_the_pynetdicom_internals_we_use_are_still_there() -> None:
    """Link.store_streamed queues P-DATA on the DUL's provider queue itself, waits on the
    queue's `not_full` (notified by every get, here DT-1's), and reads the peer's maximum
    PDU length. Fail loudly if pynetdicom moves these."""
    assert "to_provider_queue.get(" in inspect.getsource(fsm.DT_1)
    assert "queue.Queue" in inspect.getsource(dul.DULServiceProvider.__init__)
    assert "to_provider_queue.put(" in inspect.getsource(dul.DULServiceProvider.send_pdu)
    assert isinstance(dimse.DIMSEServiceProvider.maximum_pdu_size, property)
    src = inspect.getsource(DIMSEMessage.encode_msg)
    assert "if self.data_set is not None:" in src and "elif self._data_set_path is not None:" in src
    # CPython's Queue.get wakes a not_full waiter even without a maxsize.
    assert "self.not_full.notify()" in inspect.getsource(queue.Queue.get)


# --- helpers --------------------------------------------------------------------------------


def big_bundle(path: Path, src: Path, piece: int = 8 * MiB,
               transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A bundle of the one Part-10 file `src` (in `transfer_syntax`), written in pieces
    (never whole in memory)."""
    size = src.stat().st_size
    h = hashlib.sha256()
    with src.open("rb") as f:
        while b := f.read(piece):
            h.update(b)
    with path.open("wb") as out, src.open("rb") as f:
        w = BundleWriter(out, "big-1", [KEY.public_key()], "study-1")
        w.begin_instance(InstanceInfo(
            sop_instance_uid=uid_of(f.read(64 * 1024)), sop_class=MF_SC,
            transfer_syntax=transfer_syntax, received_transfer_syntax=transfer_syntax,
            received_size=size, received_sha256=h.hexdigest(), action="passthrough"))
        f.seek(0)
        while b := f.read(piece):
            w.write(b)
        w.end_instance()
        w.close()
    return path


def dataset_sha256(part10: Path | bytes) -> str:
    raw = part10.read_bytes() if isinstance(part10, Path) else part10
    return hashlib.sha256(memoryview(raw)[dataset_offset(raw[:1 << 20]):]).hexdigest()


def rewrite_keeping_the_key(path: Path, change: Callable[[bytearray], None]) -> None:
    """Rewrite the bundle in place (same inode) with its plaintext changed, under the same
    header and data key: every chunk still authenticates, only the instance checks of the
    second pass can notice. (What a recipient of the bundle, or a bug, could do.)"""
    raw = path.read_bytes()
    src = io.BytesIO(raw)
    header, chunks = bundle._open(src, KEY)
    plain = bytearray(b"".join(chunks))
    change(plain)
    key = bundle.payload_key(bundle._unwrap(header, KEY))
    out = io.BytesIO()
    out.write(header.raw)
    crypto.stream_seal(key, header.raw, io.BytesIO(bytes(plain)), out, header.chunk_size)
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(out.getvalue())


# --- real sends ---------------------------------------------------------------------------------


@pytest.mark.peers
def test_every_instance_streamed_is_stored_byte_for_byte(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the threshold at 0 every instance goes the streamed way, also the one a PACS
    without JPEG 2000 gets decompressed (frame by frame, as it is sent)."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", 0)
    flags: list[bool] = []
    real = link.data_pdu
    monkeypatch.setattr(link, "data_pdu", lambda cx, frag, last: flags.append(last) or real(cx, frag, last))
    cts = ct_slices(3)
    instances = [cts[0], mr_slice(), j2k(cts[1]), cts[2]]
    b = make_bundle(tmp_path / "b.bundle", instances)
    pacs = pacs_factory()
    progress = Progress()
    transport(transports, destination(pacs.dicom_port)).send("b-1", b, progress)
    assert flags.count(True) == len(instances)
    sizes = [len(x) for x in instances]
    assert progress.values == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    for raw in instances:
        oid = pacs.find_instance(uid_of(raw))
        assert oid is not None
        stored = pacs.instance_file(oid)
        assert stored[dataset_offset(stored):] == raw[dataset_offset(raw):]

    # A PACS without JPEG 2000: that instance is decompressed as it is streamed, and
    # stored exactly as codec.decompress would have made it.
    flags.clear()
    other = pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})
    progress = Progress()
    with capture_logs() as logs:
        transport(transports, destination(other.dicom_port)).send("b-1", b, progress)
    assert flags.count(True) == len(instances)
    assert progress.values == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    oid = other.find_instance(uid_of(instances[2]))
    assert oid is not None and stored_ts(other, oid) == ExplicitVRLittleEndian
    stored, want = other.instance_file(oid), codec.decompress(instances[2])
    assert stored[dataset_offset(stored):] == want[dataset_offset(want):]
    assert other.count() == len(instances)
    sent = [e for e in logs if e["event"] == "dicom.sent"]
    assert sent[0]["converted"] == {
        "JPEG 2000 Image Compression (Lossless Only) -> Explicit VR Little Endian": 1}


_PROBE = """
import json, sys, time
from pathlib import Path
from appliance.core import crypto
from appliance.core.config import Destination
from appliance.forward.dicom import DicomTransport

def hwm(pid="self"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

bundle, key, port = Path(sys.argv[1]), crypto.load_private_key(Path(sys.argv[2])), int(sys.argv[3])
if len(sys.argv) > 4:  # the streaming threshold, e.g. raised to measure the whole path
    from appliance.forward.dicom import transport
    transport.STREAM_THRESHOLD = int(sys.argv[4])
t = DicomTransport(Destination(name="pacs", transport="dicom", host="127.0.0.1", port=port,
                               ae_title="ORTHANC", calling_ae_title="EDGE", plaintext=True,
                               timeout_s=60.0), key)
before = hwm()
t0 = time.monotonic()
t.send("big-1", bundle, lambda n: None)
seconds = time.monotonic() - t0
workers = [hwm(pid) for pid in t.converter().pids()]  # conversion workers, idle again
print(json.dumps({"before": before, "after": hwm(), "seconds": seconds,
                  "worker": max(workers, default=0)}))
t.close()
"""


@pytest.mark.peers
def test_a_large_instance_is_streamed_stored_exactly_and_never_held_in_memory(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc]) -> None:  # noqa: F811
    """A 128 MiB multi-frame instance (256 distinct 512x512 16-bit frames), sent by the
    transport in a process of its own: Orthanc's copy has exactly the original data set,
    and the sender's peak RSS grows by a few MiB, not by the instance (read whole and sent
    with pynetdicom's send_msg it would grow by at least twice its size)."""
    src = write_multiframe(tmp_path / "big.dcm", frames=256)
    size = src.stat().st_size
    assert size > 128 * MiB
    b = big_bundle(tmp_path / "big.bundle", src)
    pacs = pacs_factory()
    send_within(b, tmp_path, pacs.dicom_port, f"instance {size / MiB:.0f} MiB", 24 * MiB)

    assert pacs.count() == 1
    oid = pacs.instances()[0]
    assert dataset_sha256(pacs.instance_file(oid)) == dataset_sha256(src)


def key_file(tmp_path: Path) -> Path:
    key = tmp_path / "key.pem"
    key.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    key.chmod(0o600)
    return key


def send_within(bundle_path: Path, tmp_path: Path, port: int, what: str, limit: int) -> None:
    """`probe_send` the bundle with the appliance key; print the figures (for the test
    log) and fail if the sender's peak RSS grew by `limit` bytes or more."""
    m = probe_send(bundle_path, key_file(tmp_path), port)
    grew = m["after"] - m["before"]
    print(f"\n{what}: sent in {m['seconds']:.1f} s; sender peak RSS {m['before'] / MiB:.0f} -> "
          f"{m['after'] / MiB:.0f} MiB (+{grew / MiB:.1f} MiB)")
    assert grew < limit, f"sender peak RSS grew by {grew / MiB:.0f} MiB ({what})"


def probe_send(bundle_path: Path, key: Path, port: int, threshold: int | None = None) -> dict[str, Any]:
    """Send `bundle_path` with a DicomTransport in a process of its own (`threshold`: its
    STREAM_THRESHOLD, if not the default): its peak RSS before and after, and the time
    the send took."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    extra = [] if threshold is None else [str(threshold)]
    r = subprocess.run([sys.executable, "-c", _PROBE, str(bundle_path), str(key), str(port), *extra],
                       capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.peers
def test_a_large_instance_the_pacs_refuses_compressed_is_decompressed_as_it_is_streamed(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc]) -> None:  # noqa: F811
    """A multi-frame JPEG 2000 instance of more than 64 MiB in its bundle (256 frames of
    512x512 10-bit noise, 128 MiB decoded) to an Orthanc that refuses JPEG 2000, sent by
    the transport in a process of its own at the default threshold: Orthanc stores it in
    Explicit VR LE with exactly the original native pixel data, and the sender's peak RSS
    grows by far less than the instance (decompressed whole it would grow by several
    times 128 MiB)."""
    src = tmp_path / "big-j2k.dcm"
    native = write_j2k_multiframe(src, frames=256)
    size = src.stat().st_size
    assert size >= transport_mod.STREAM_THRESHOLD
    b = big_bundle(tmp_path / "big.bundle", src, transfer_syntax=JPEG2000Lossless)
    pacs = pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})
    send_within(b, tmp_path, pacs.dicom_port,
                f"JPEG 2000 instance {size / MiB:.0f} MiB (128 MiB decoded), converted", 32 * MiB)

    assert pacs.count() == 1
    oid = pacs.instances()[0]
    assert stored_ts(pacs, oid) == ExplicitVRLittleEndian
    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(oid)))
    assert ds.NumberOfFrames == 256 and ds["PixelData"].VR == "OW"
    assert hashlib.sha256(ds.PixelData).hexdigest() == native


def _j2k_frames(frames: int, change: Callable[[list[bytes]], bytes]) -> bytes:
    """A 256x256 16-bit multi-frame instance in JPEG 2000, Pixel Data rebuilt by `change`."""
    return reencapsulate(j2k(multiframe(frames=frames, rows=256, columns=256)), change)


@pytest.mark.peers
def test_frames_split_across_fragments_without_an_offset_table_go_the_whole_way(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No offset table and the first frame in two fragments: the streamed conversion
    cannot map fragments to frames up front, so before a byte is sent the instance goes
    the whole way (which groups fragments by end-of-image markers), is delivered, and the
    log says so."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", 0)
    raw = _j2k_frames(8, lambda f: encapsulate(f, fragments_per_frame=2, has_bot=False))
    b = make_bundle(tmp_path / "b.bundle", [raw])
    pacs = pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})
    with capture_logs() as logs:
        transport(transports, destination(pacs.dicom_port)).send("split", b, Progress())
    assert [e["reason"] for e in logs if e["event"] == "dicom.convert_whole"] == [
        "no offset table, and the first fragment is not a whole frame"]
    oid = pacs.find_instance(uid_of(raw))
    assert oid is not None and stored_ts(pacs, oid) == ExplicitVRLittleEndian
    stored, want = pacs.instance_file(oid), codec.decompress(raw)
    assert stored[dataset_offset(stored):] == want[dataset_offset(want):]


@pytest.mark.peers
@pytest.mark.parametrize("layout", ["later-frame-split", "corrupt-frame"])
def test_an_instance_that_cannot_be_converted_midway_is_aborted_and_not_stored(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """In a bundle that authenticates, a multi-frame JPEG 2000 instance whose fragments
    turn out midway not to be one per frame (no offset table, the 30th frame in two
    fragments), or whose 30th frame is not a codestream at all: the send is Permanent with
    the instance's index and the reason, the last P-DATA fragment never goes out, and
    Orthanc stores nothing."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", 0)

    def corrupt(frames: list[bytes]) -> bytes:
        frames[29] = b"\x00" * len(frames[29])
        return encapsulate(frames, has_bot=True)

    change = {"later-frame-split": split_frame(29), "corrupt-frame": corrupt}[layout]
    raw = _j2k_frames(40, change)
    b = make_bundle(tmp_path / "b.bundle", [raw])
    flags: list[bool] = []
    real = link.data_pdu
    monkeypatch.setattr(link, "data_pdu", lambda cx, frag, last: flags.append(last) or real(cx, frag, last))
    pacs = pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})
    t = transport(transports, destination(pacs.dicom_port))
    with pytest.raises(Permanent, match=r"^instance 0: (cannot be converted for this PACS|the PACS does not "
                       r"accept JPEG 2000 .* cannot be decompressed)") as e:
        t.send("bad", b, Progress())
    print(f"\n{layout}: {e.value}")
    assert uid_of(raw) not in str(e.value)
    assert not any(flags), "the last fragment went out"
    assert "cannot be converted for this PACS" in str(e.value)
    assert len(flags) > 100  # 29 frames went out before
    assert "abort" in pacs.log_text().lower()
    assert pacs.count() == 0


@pytest.mark.peers
def test_a_bundle_changed_after_verification_is_aborted_and_not_stored(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle is rewritten (same key, every chunk authentic) between the verifying
    pass and the streaming pass, one pixel byte in the middle of the instance changed. The
    changed bytes reach the PACS, but the last fragment never does: the stream fails its
    SHA-256 at the end, the association is aborted, Orthanc stores nothing, and the send
    is Permanent (the queue holds the bundle with the reason). The untouched bundle then
    goes through on the same transport."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", 1 * MiB)
    src = write_multiframe(tmp_path / "mf.dcm", frames=16)  # 8 MiB: ~500 PDUs of 16 KiB
    raw = src.read_bytes()
    good = make_bundle(tmp_path / "good.bundle", [raw])
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(good.read_bytes())

    def flip(plain: bytearray) -> None:
        plain[9 + len(raw) // 2] ^= 0x01  # one DATA record: its payload starts at 9

    class ChangedAfterVerification(bundle.VerifiedBundle):
        def __init__(self, f: Any, key: Any) -> None:
            super().__init__(f, key)
            if Path(f.name) == bad:
                rewrite_keeping_the_key(bad, flip)

    monkeypatch.setattr(transport_mod, "VerifiedBundle", ChangedAfterVerification)
    flags: list[bool] = []
    real = link.data_pdu
    monkeypatch.setattr(link, "data_pdu", lambda cx, frag, last: flags.append(last) or real(cx, frag, last))
    pacs = pacs_factory()
    t = transport(transports, destination(pacs.dicom_port))
    with pytest.raises(Permanent, match="does not verify: bundle changed while it was being read") as e:
        t.send("bad", bad, Progress())
    assert uid_of(raw) not in str(e.value)
    assert len(flags) > 100 and not any(flags), "the last fragment went out"
    assert pacs.count() == 0
    assert "abort" in pacs.log_text().lower()

    flags.clear()
    t.send("good", good, Progress())
    assert flags.count(True) == 1
    assert pacs.count() == 1
    oid = pacs.instances()[0]
    assert dataset_sha256(pacs.instance_file(oid)) == dataset_sha256(raw)


@pytest.mark.peers
@pytest.mark.parametrize(("sig", "match", "within"), [
    (signal.SIGKILL, "lost|aborted", 3.0),
    (signal.SIGSTOP, "no answer from the PACS within 2 s", 6.0),
])
def test_a_pacs_that_dies_or_freezes_mid_instance_is_retryable(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, match: str, within: float) -> None:
    """While a streamed instance is waiting for room in the DUL's queue, the link is
    still watched: a dead PACS is noticed at once, a frozen one after timeout_s."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", 1 * MiB)
    src = write_multiframe(tmp_path / "mf.dcm", frames=64)  # 32 MiB
    b = make_bundle(tmp_path / "b.bundle", [src.read_bytes()])
    pacs = pacs_factory()
    assert pacs.pid is not None
    pid = pacs.pid
    t = transport(transports, destination(pacs.dicom_port, timeout_s=2))
    progress = Progress(lambda _: os.kill(pid, sig))  # at the first 4 MiB queued
    t0 = time.monotonic()
    try:
        with pytest.raises(Retryable, match=match) as e:
            t.send("b-1", b, progress)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "while sending instance 0 of 1" in str(e.value)
    assert elapsed < within
    assert progress.values and progress.values[-1] < src.stat().st_size
