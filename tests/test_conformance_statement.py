"""The DICOM Conformance Statement (docs/conformance-statement.md) says what the code does.

Its tables are written by docs/gen_conformance.py from the code's own tables; the first
tests hold the checked-in document to that. The others read the document's tables and
hold them against what runs: a real daemon answering a pynetdicom SCU (the SOP classes
and transfer syntaxes it accepts, its rejections, the identifiers it sends), the dicom
transport sending to a pynetdicom SCP (what it proposes and how it identifies itself),
and the codec (which transfer syntaxes are compressed, into which syntax).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import re
import ssl
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from appliance.bundle.format import BundleWriter, InstanceInfo
from appliance.core import config
from appliance.core.config import Destination
from appliance.forward import Permanent
from appliance.forward.dicom import DicomTransport
from appliance.pack import codec
from appliance.receive.identify import part10_header
from tests.peers import REPO, SAMPLES, Appliance, base_config, free_port, wait_for

DOC = REPO / "docs" / "conformance-statement.md"
GENERATOR = REPO / "docs" / "gen_conformance.py"
PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.999"  # not under 1.2.840.10008: private
PRIVATE_SYNTAX = "1.3.6.1.4.1.9590.100.1.3.999"
J2K_CT = SAMPLES / "transfer_syntax" / "WG04" / "CT2" / "CT2_J2KR"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_conformance", GENERATOR)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def doc_table(name: str) -> list[dict[str, str]]:
    """The rows of a generated table of the document, as {column: cell}."""
    m = re.search(rf"<!-- generated: {name} -->\n(.*?)<!-- end: {name} -->", DOC.read_text(), re.S)
    assert m, f"no table {name} in {DOC.name}"
    lines = [line for line in m.group(1).splitlines() if line.startswith("|")]

    def cells(line: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = cells(lines[0])
    return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def uid(cell: str) -> str:
    """The UID in a cell such as "`1.2.840.10008.1.2`"."""
    m = re.fullmatch(r"`([0-9.]+)`", cell)
    assert m, cell
    return m.group(1)


# --- the document is what the code generates ------------------------------------------


def test_the_statement_is_what_the_code_generates() -> None:
    r = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_a_table_edited_by_hand_is_found_stale() -> None:
    gen = generator()
    text = DOC.read_text().replace("| 0xA700 |", "| 0xA7FF |", 1)
    _, changed = gen.generate(text)
    assert changed == ["scp-statuses"]


def test_every_receive_setting_is_in_the_statement_or_set_aside() -> None:
    """A new [receive] key (a limit, a timeout) needs a row in table 4.2.1-2, or a reason why not."""
    gen = generator()
    listed = {key for key, _, _ in gen.RECEIVE_SETTINGS} | set(gen.NOT_ASSOCIATION_SETTINGS)
    fields = {f.name for f in dataclasses.fields(config.Receive)}
    fields |= {f"tls.{f.name}" for f in dataclasses.fields(config.ReceiveTLS)}
    assert fields - listed == set()
    assert listed - fields == set()  # no row for a key that is gone


# --- the Receive AE, as a modality meets it ----------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("conformance")
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 3600, "segment_max_age_s": 3600}  # keep instances spooled
    app = Appliance(root, cfg)
    app.start()
    yield app
    app.stop()
    app.kill9()


def associate(port: int, contexts: list[tuple[str, list[str]]], calling: str = "MODALITY") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title="EDGE")


def accepted(assoc: Any) -> dict[int, str]:
    """{context id: accepted transfer syntax} of an established association, released."""
    assert assoc.is_established
    try:
        return {cx.context_id: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()


def test_receive_accepts_every_storage_class_in_the_statement(daemon: Appliance) -> None:
    rows = doc_table("scp-sop-classes")
    classes = [uid(r["SOP Class UID"]) for r in rows if r["SOP Class UID"] != "(any)"]
    assert len(classes) > 150 and str(Verification) in classes
    classes.append(PRIVATE_SOP_CLASS)  # the "(any)" row
    for start in range(0, len(classes), 100):  # at most 128 contexts per association
        batch = classes[start : start + 100]
        got = accepted(associate(daemon.port, [(c, [ExplicitVRLittleEndian]) for c in batch]))
        assert len(got) == len(batch)


def test_receive_rejects_the_sop_classes_of_other_services_but_the_documented_ones(
        daemon: Appliance) -> None:
    exceptions = [uid(r["SOP Class UID"]) for r in doc_table("scp-other-classes")]
    assert exceptions  # pynetdicom 3.0.4 has four; an empty table would make this check nothing
    others = [StudyRootQueryRetrieveInformationModelFind, StorageCommitmentPushModel,
              ModalityPerformedProcedureStep, *exceptions]
    assoc = associate(daemon.port, [(Verification, [ExplicitVRLittleEndian])]
                      + [(c, [ExplicitVRLittleEndian]) for c in others])
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification, *exceptions]
        assert {cx.result for cx in assoc.rejected_contexts} == {0x03}  # abstract syntax not supported
    finally:
        assoc.release()


def test_receive_accepts_the_first_proposed_syntax_of_each_row(daemon: Appliance) -> None:
    rows = doc_table("scp-transfer-syntaxes")
    syntaxes = [uid(r["UID"]) for r in rows if r["UID"] != "(any)"]
    syntaxes.append(PRIVATE_SYNTAX)  # the "(any)" row
    # each first, before a syntax the SCP would also take, in a context of its own
    got = accepted(associate(daemon.port, [(CTImageStorage, [ts, ExplicitVRLittleEndian])
                                           for ts in syntaxes]))
    assert list(got.values()) == syntaxes


def test_receive_takes_verification_in_the_documented_syntaxes_in_their_order(daemon: Appliance) -> None:
    documented = [uid(r["UID"]) for r in doc_table("scp-verification-syntaxes")]
    assoc = associate(daemon.port, [(Verification, list(reversed(documented))),
                                    (Verification, ["1.2.840.10008.1.2.4.50"])])  # JPEG baseline
    try:
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [documented[0]]
        assert [cx.result for cx in assoc.rejected_contexts] == [0x04]  # syntaxes not supported
    finally:
        assoc.release()


def test_receive_identifies_itself_and_its_max_pdu_as_documented(daemon: Appliance) -> None:
    ident = {r["AE"]: r for r in doc_table("implementation")}["Receive AE (SCP)"]
    settings = {r["Setting"]: r["Default"] for r in doc_table("scp-settings")}
    assoc = associate(daemon.port, [(Verification, [ImplicitVRLittleEndian])])
    try:
        assert assoc.is_established
        assert assoc.acceptor.implementation_class_uid == uid(ident["Implementation Class UID"])
        assert f"`{assoc.acceptor.implementation_version_name}`" == ident["Implementation Version Name"]
        assert f"`{assoc.acceptor.maximum_length}` bytes" == settings["`receive.max_pdu`"]
    finally:
        assoc.release()


def test_receive_writes_the_documented_identifiers_into_the_stored_file_meta(daemon: Appliance) -> None:
    ident = doc_table("implementation")[2]
    assert ident["AE"].startswith("File Meta")
    ds = dcmread(J2K_CT)
    assoc = associate(daemon.port, [(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])])
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    stored = [dcmread(DicomBytesIO(p), stop_before_pixels=True) for p in daemon.spooled().values()]
    (meta,) = [s.file_meta for s in stored if s.SOPInstanceUID == ds.SOPInstanceUID]
    assert meta.ImplementationClassUID == uid(ident["Implementation Class UID"])
    assert f"`{meta.ImplementationVersionName}`" == ident["Implementation Version Name"]
    assert meta.SourceApplicationEntityTitle == "MODALITY"


def rejection(row: dict[str, str]) -> tuple[int, int, int]:
    return tuple(int(row[k].split()[0]) for k in ("Result", "Source", "Reason/Diag."))  # type: ignore[return-value]


def test_receive_rejects_an_unknown_calling_ae_as_documented(daemon: Appliance) -> None:
    row = next(r for r in doc_table("scp-rejections") if "receive.callers" in r["When"])
    assoc = associate(daemon.port, [(Verification, [ImplicitVRLittleEndian])], calling="STRANGER")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == rejection(row)


def test_receive_rejects_one_association_past_the_limit_as_documented(
        appliance_factory: Callable[..., Appliance]) -> None:
    row = next(r for r in doc_table("scp-rejections") if "max_associations" in r["When"])
    # The start-up probe's bare TCP connection holds the one slot until its ACSE timeout.
    app = appliance_factory(max_associations=1, acse_timeout_s=1)

    def established() -> Any:
        assoc = associate(app.port, [(Verification, [ImplicitVRLittleEndian])])
        return assoc if assoc.is_established else None

    first = wait_for(established, timeout=60, what="the first association", poll=0.5)
    try:
        second = associate(app.port, [(Verification, [ImplicitVRLittleEndian])])
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == rejection(row)
    finally:
        first.release()


# --- the Forward AE, as a PACS meets it ----------------------------------------------------


class RecordingPACS:
    """A pynetdicom Storage SCP that keeps what each association request said."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()
        ae = AE("PACS")
        ae.add_supported_context(CTImageStorage, [str(codec.CODECS["jpeg2000"][0]),
                                                  ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, lambda event: 0x0000)])

    def _requested(self, event: Any) -> None:
        with self.lock:
            self.requests.append(event.assoc.requestor)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[RecordingPACS]:
    p = RecordingPACS()
    yield p
    p.close()


def send_one_j2k_ct(tmp_path: Path, pacs: RecordingPACS, **dest: Any) -> None:
    """One J2K lossless CT instance in a bundle, sent by the dicom transport."""
    key = X25519PrivateKey.generate()
    raw = J2K_CT.read_bytes()
    ds = dcmread(J2K_CT, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    bundle = tmp_path / "one.bundle"
    with bundle.open("wb") as f:
        w = BundleWriter(f, "b1", [key.public_key()], "study")
        w.begin_instance(InstanceInfo(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID),
            transfer_syntax=ts, received_transfer_syntax=ts, received_size=len(raw),
            received_sha256=hashlib.sha256(raw).hexdigest(), action="passthrough"))
        w.write(raw)
        w.end_instance()
        w.close()
    t = DicomTransport(Destination(name="pacs", transport="dicom", host="127.0.0.1", port=pacs.port,
                                   ae_title="PACS", plaintext=True, timeout_s=10, **dest), key)
    try:
        t.send("b1", bundle, lambda n: None)
    finally:
        t.close()


def test_forward_identifies_itself_and_its_max_pdu_as_documented(
        tmp_path: Path, pacs: RecordingPACS) -> None:
    ident = {r["AE"]: r for r in doc_table("implementation")}
    row = ident["Forward AE (SCU) and its commitment listener"]
    fixed = {r["What it sets"]: r["Default"] for r in doc_table("scu-settings")}
    send_one_j2k_ct(tmp_path, pacs)
    (rq,) = pacs.requests
    assert rq.implementation_class_uid == uid(row["Implementation Class UID"])
    assert f"`{rq.implementation_version_name}`" == row["Implementation Version Name"]
    assert f"`{rq.maximum_length}` bytes" == fixed["maximum PDU length the Forward AE receives"]
    assert rq.ae_title == "EDGE"  # receive.ae_title, the documented default calling AE title


def proposed(rq: Any) -> list[tuple[str, list[str]]]:
    return [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
            for cx in rq.requested_contexts]


def test_forward_proposes_the_documented_contexts(tmp_path: Path, pacs: RecordingPACS) -> None:
    rows = doc_table("scu-contexts")
    pair = [uid(m) for m in re.findall(r"`[0-9.]+`", rows[1]["Transfer Syntaxes"])]
    send_one_j2k_ct(tmp_path, pacs)
    (rq,) = pacs.requests
    j2k = str(codec.CODECS["jpeg2000"][0])
    assert proposed(rq) == [(CTImageStorage, [j2k]), (CTImageStorage, pair)]


def test_forward_proposes_the_documented_commitment_context(tmp_path: Path, pacs: RecordingPACS) -> None:
    row = doc_table("scu-contexts")[2]
    commitment = uid(re.findall(r"`[0-9.]+`", row["Abstract Syntax"])[0])
    syntaxes = [uid(m) for m in re.findall(r"`[0-9.]+`", row["Transfer Syntaxes"])]
    with pytest.raises(Permanent, match="Storage Commitment"):  # this PACS does not take it
        send_one_j2k_ct(tmp_path, pacs, storage_commitment=True, commitment_timeout_s=5)
    (rq,) = pacs.requests
    assert proposed(rq)[-1] == (commitment, syntaxes)


# --- TLS: what section 7.1 says about versions, peers and suites --------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> config.TLSClient:
    """A self-signed RSA certificate and its key (0600), standing in for cert and CA."""
    root = tmp_path_factory.mktemp("tls")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (root / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    (root / "k.pem").chmod(0o600)
    return config.TLSClient(cert=root / "c.pem", key=root / "k.pem", ca=root / "c.pem")


def tls_contexts(tls: config.TLSClient) -> dict[str, ssl.SSLContext]:
    from appliance.forward.dicom.tls import client_context, server_context
    from appliance.receive.scp import tls_server_context

    return {"receive": tls_server_context(str(tls.cert), str(tls.key), str(tls.ca), True),
            "forward": client_context(tls, check_hostname=True),
            "commitment listener": server_context(tls)}


def test_tls_is_1_2_or_newer_with_the_peer_certificate_required(tls_files: config.TLSClient) -> None:
    for where, ctx in tls_contexts(tls_files).items():
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2, where
        assert ctx.verify_mode == ssl.CERT_REQUIRED, where


def test_tls_suites_include_bcp195s_and_nothing_weak(tls_files: config.TLSClient) -> None:
    for where, ctx in tls_contexts(tls_files).items():
        tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"} <= set(tls12), where
        for name in tls12:
            assert name.startswith(("ECDHE-", "DHE-")), (where, name)
            assert ("AES" in name or "CHACHA20" in name) and not name.endswith("-SHA"), (where, name)


# --- pack: which syntaxes are compressed, into what ---------------------------------------


def image(ts: str) -> bytes:
    """A 64x64 12-bit image (a ramp with noise, so that deflate does not beat J2K) as a
    Part-10 file in syntax `ts`.

    Native syntaxes are encoded as they say; any other gets an Explicit VR LE data set
    under its file meta, which is all that pack looks at before it decides."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    noise = np.random.default_rng(7).integers(0, 16, (64, 64))
    ds.PixelData = (np.add.outer(np.arange(64), np.arange(64)) * 16 + noise).astype("<u2").tobytes()
    buf = DicomBytesIO()
    buf.is_little_endian = ts != ExplicitVRBigEndian
    buf.is_implicit_VR = ts == ImplicitVRLittleEndian
    if ts == ExplicitVRBigEndian:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    write_dataset(buf, ds)
    body = buf.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = z.compress(body) + z.flush()
    return part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ts, "TEST") + body


def test_pack_compresses_or_keeps_each_syntax_as_documented() -> None:
    rows = doc_table("scp-transfer-syntaxes")
    rows = [{**r, "UID": r["UID"] if r["UID"] == "(any)" else uid(r["UID"])} for r in rows]
    for r in rows:
        ts = PRIVATE_SYNTAX if r["UID"] == "(any)" else r["UID"]
        result = codec.compress(image(ts), "jpeg2000", verify=True)
        expected = "compressed" if r["Kept in the bundle"].startswith("compressed") else "passthrough"
        assert result.action == expected, (r["Transfer Syntax"], result.reason)


def test_each_codec_produces_the_documented_syntax() -> None:
    for r in doc_table("codecs"):
        name = r["pack.codec"].strip("`")
        result = codec.compress(image(ExplicitVRLittleEndian), name, verify=True)
        if name == "none":
            assert result.action == "passthrough" and r["UID"] == ""
        else:
            assert (result.action, result.transfer_syntax) == ("compressed", uid(r["UID"]))
