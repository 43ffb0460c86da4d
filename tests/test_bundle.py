"""The encrypted bundle format (appliance/bundle.py, docs/bundle-format.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import stat
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from appliance.bundle import format as bundle
from appliance.bundle.format import BundleWriter, InstanceInfo
from appliance.core import crypto
from appliance.core.errors import IntegrityError, UsageError

VECTORS = Path(__file__).parent / "vectors"
CHUNK = 64
TAG = crypto.TAG_LEN
BID = "bundle-0001"

KEY_A = X25519PrivateKey.generate()
KEY_B = X25519PrivateKey.generate()


def info(i: int = 0, **kw: object) -> InstanceInfo:
    fields: dict[str, object] = {
        "sop_instance_uid": f"1.2.3.4.{i}",
        "sop_class": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax": "1.2.840.10008.1.2.4.90",
        "received_transfer_syntax": "1.2.840.10008.1.2.1",
        "received_size": 1000 + i,
        "received_sha256": hashlib.sha256(b"%d" % i).hexdigest(),
        "action": "compressed",
    }
    fields.update(kw)
    return InstanceInfo(**fields)  # type: ignore[arg-type]


def make(
    instances: list[list[bytes]],
    recipients: list[X25519PrivateKey] | None = None,
    chunk_size: int = CHUNK,
) -> bytes:
    """A bundle whose instance i is written with one write() per piece of instances[i]."""
    out = io.BytesIO()
    keys = [KEY_A] if recipients is None else recipients
    w = BundleWriter(out, BID, [k.public_key() for k in keys], "study-1", chunk_size, created=1700000000)
    for i, pieces in enumerate(instances):
        w.begin_instance(info(i))
        for p in pieces:
            w.write(p)
        w.end_instance()
    w.close()
    return out.getvalue()


def header_len(blob: bytes) -> int:
    return len(bundle.read_header(io.BytesIO(blob)).raw)


def extract_fails(blob: bytes, out: Path, key: X25519PrivateKey = KEY_A) -> str:
    """Extract must raise IntegrityError and leave `out` empty; returns the message."""
    with pytest.raises(IntegrityError) as e:
        bundle.extract(io.BytesIO(blob), key, out)
    assert not out.exists() or list(out.iterdir()) == []
    assert str(e.value)
    return str(e.value)


# A small bundle for the exhaustive tamper/truncate loops: two recipients, two instances,
# a few chunks. Opened with KEY_A.
SMALL = make([[b"x" * 70], [b"y" * 5, b"z" * 3]], recipients=[KEY_A, KEY_B])


# --- round trips --------------------------------------------------------------------


def test_round_trip_writes_each_instance_as_index_dcm(tmp_path: Path) -> None:
    data = [b"first instance " * 10, b"second"]
    m = bundle.extract(io.BytesIO(make([[d] for d in data])), KEY_A, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.dcm", "1.dcm"]
    assert [(tmp_path / f"{i}.dcm").read_bytes() for i in range(2)] == data
    assert [e.sop_instance_uid for e in m.instances] == ["1.2.3.4.0", "1.2.3.4.1"]


def test_manifest_records_transmitted_size_and_sha256(tmp_path: Path) -> None:
    m = bundle.extract(io.BytesIO(make([[b"abc", b"def"]])), KEY_A, tmp_path)
    (e,) = m.instances
    assert (e.index, e.size, e.sha256) == (0, 6, hashlib.sha256(b"abcdef").hexdigest())
    assert (e.received_size, e.received_sha256, e.action) == (1000, info(0).received_sha256, "compressed")
    assert (m.version, m.bundle_id, m.study_key) == (1, BID, "study-1")


@pytest.mark.parametrize("which", [0, 1])
def test_each_of_two_recipients_can_open_alone(tmp_path: Path, which: int) -> None:
    blob = make([[b"payload"]], recipients=[KEY_A, KEY_B])
    bundle.extract(io.BytesIO(blob), [KEY_A, KEY_B][which], tmp_path)
    assert (tmp_path / "0.dcm").read_bytes() == b"payload"


@pytest.mark.parametrize(
    "sizes",
    [[1] * 200, [63, 1, 64, 65, 0, 200], [64] * 5, [9], [1000], [55]],
    ids=["bytewise", "mixed", "chunk-sized", "record-header-sized", "one-large", "fills-first-chunk"],
)
def test_instance_written_in_many_pieces_across_chunks(tmp_path: Path, sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    pieces, pos = [], 0
    for n in sizes:
        pieces.append(data[pos : pos + n])
        pos += n
    bundle.extract(io.BytesIO(make([pieces, [b"next"]])), KEY_A, tmp_path)
    assert (tmp_path / "0.dcm").read_bytes() == data
    assert (tmp_path / "1.dcm").read_bytes() == b"next"


def test_zero_length_instance_round_trips(tmp_path: Path) -> None:
    m = bundle.extract(io.BytesIO(make([[]])), KEY_A, tmp_path)
    assert (tmp_path / "0.dcm").read_bytes() == b""
    assert m.instances[0].sha256 == hashlib.sha256(b"").hexdigest()


def test_empty_bundle_is_valid_and_extracts_nothing(tmp_path: Path) -> None:
    m = bundle.extract(io.BytesIO(make([])), KEY_A, tmp_path)
    assert m.instances == ()
    assert list(tmp_path.iterdir()) == []


def test_reason_is_kept_in_the_manifest() -> None:
    out = io.BytesIO()
    w = BundleWriter(out, BID, [KEY_A.public_key()], "s", CHUNK)
    w.begin_instance(info(0, action="passthrough", reason="already compressed"))
    w.end_instance()
    w.close()
    (e,) = bundle.read_manifest(io.BytesIO(out.getvalue()), KEY_A).instances
    assert (e.action, e.reason) == ("passthrough", "already compressed")


def test_read_header_needs_no_key() -> None:
    blob = make([[b"x"]], recipients=[KEY_A, KEY_B])
    h = bundle.read_header(io.BytesIO(blob))
    assert (h.version, h.bundle_id, h.created, h.chunk_size, h.suite) == (1, BID, 1700000000, CHUNK, 1)
    assert [r.key_id for r in h.recipients] == [
        bundle.recipient_key_id(KEY_A.public_key()),
        bundle.recipient_key_id(KEY_B.public_key()),
    ]
    assert all(len(r.wrapped_key) == 80 for r in h.recipients)


def test_recipient_key_id_is_sha256_of_raw_public_key() -> None:
    pub = KEY_A.public_key()
    assert bundle.recipient_key_id(pub) == hashlib.sha256(pub.public_bytes_raw()).digest()[:8]


def test_read_manifest_verifies_and_returns_manifest() -> None:
    out = io.BytesIO()
    w = BundleWriter(out, BID, [KEY_A.public_key()], "s", CHUNK)
    w.begin_instance(info(0))
    w.write(b"data")
    w.end_instance()
    written = w.close()
    assert bundle.read_manifest(io.BytesIO(out.getvalue()), KEY_A) == written


def test_iter_instances_yields_entries_and_bytes_in_order() -> None:
    data = [b"a" * 100, b"", b"c" * 7]
    got = list(bundle.iter_instances(io.BytesIO(make([[d] for d in data])), KEY_A))
    assert [e.index for e, _ in got] == [0, 1, 2]
    assert [d for _, d in got] == data


def test_iter_instances_verifies_whole_bundle_before_yielding_anything() -> None:
    blob = bytearray(make([[b"a" * 100], [b"b"]]))
    blob[-1] ^= 1  # the last chunk
    it = bundle.iter_instances(io.BytesIO(bytes(blob)), KEY_A)
    with pytest.raises(IntegrityError):
        next(it)


def test_bundle_bytes_hide_uids_and_content() -> None:
    blob = make([[b"SECRET-PIXELS" * 4]])
    for needle in (b"1.2.3.4.0", b"SECRET-PIXELS", b"study-1", b"1.2.840.10008"):
        assert needle not in blob


def test_body_is_chunked_with_a_non_empty_final_chunk() -> None:
    blob = make([[b"q" * 500]])
    body = len(blob) - header_len(blob)
    # plaintext = 9 + 500 + 9 (END) + 9 + manifest; chunks of 64 plus a 16-byte tag each.
    n_chunks = -(-body // (CHUNK + TAG))
    assert body - n_chunks * TAG > (n_chunks - 1) * CHUNK


# --- integrity ----------------------------------------------------------------------


@pytest.mark.parametrize("region", ["header-fields", "recipient-entries", "body"])
def test_flipping_any_single_byte_fails_and_writes_nothing(tmp_path: Path, region: str) -> None:
    h = bundle.read_header(io.BytesIO(SMALL))
    entries_start = len(h.raw) - sum(10 + len(r.wrapped_key) for r in h.recipients)
    span = {
        "header-fields": range(0, entries_start),
        "recipient-entries": range(entries_start, len(h.raw)),
        "body": range(len(h.raw), len(SMALL)),
    }[region]
    out = tmp_path / "out"
    # Header bytes get a low- and a high-bit flip (length fields); body bytes one flip.
    masks = (0x01,) if region == "body" else (0x01, 0x80)
    for pos in span:
        for mask in masks:
            bad = bytearray(SMALL)
            bad[pos] ^= mask
            extract_fails(bytes(bad), out)


def test_truncation_at_every_position_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for n in range(len(SMALL)):
        extract_fails(SMALL[:n], out)


def test_truncation_at_a_chunk_boundary_names_authentication(tmp_path: Path) -> None:
    cut = len(SMALL) - ((len(SMALL) - header_len(SMALL)) % (CHUNK + TAG) or CHUNK + TAG)
    assert "authentication failed" in extract_fails(SMALL[:cut], tmp_path / "out")


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    n = header_len(blob)
    body = blob[n:]
    return blob[:n], [body[i : i + CHUNK + TAG] for i in range(0, len(body), CHUNK + TAG)]


def test_swapping_two_chunks_fails(tmp_path: Path) -> None:
    head, chunks = _chunks(SMALL)
    assert len(chunks) >= 3
    chunks[0], chunks[1] = chunks[1], chunks[0]
    extract_fails(head + b"".join(chunks), tmp_path / "out")


def test_dropping_a_middle_chunk_fails(tmp_path: Path) -> None:
    head, chunks = _chunks(SMALL)
    del chunks[1]
    extract_fails(head + b"".join(chunks), tmp_path / "out")


def test_chunk_from_another_bundle_under_same_key_fails(tmp_path: Path) -> None:
    other = make([[b"x" * 70], [b"y" * 5, b"z" * 3]], recipients=[KEY_A, KEY_B])
    head, chunks = _chunks(SMALL)
    _, other_chunks = _chunks(other)
    chunks[0] = other_chunks[0]
    extract_fails(head + b"".join(chunks), tmp_path / "out")


@pytest.mark.parametrize(
    "extra", [b"\x00", b"\x00" * TAG, b"\x00" * (CHUNK + TAG)], ids=["1", "tag", "chunk"]
)
def test_appended_bytes_fail(tmp_path: Path, extra: bytes) -> None:
    extract_fails(SMALL + extra, tmp_path / "out")


def test_appending_a_copy_of_the_last_chunk_fails(tmp_path: Path) -> None:
    _, chunks = _chunks(SMALL)
    extract_fails(SMALL + chunks[-1], tmp_path / "out")


def test_wrong_key_says_no_recipient_entry(tmp_path: Path) -> None:
    msg = extract_fails(SMALL, tmp_path / "out", key=X25519PrivateKey.generate())
    assert "no recipient entry for this key" in msg


def test_altered_wrapped_key_says_key_does_not_unwrap(tmp_path: Path) -> None:
    h = bundle.read_header(io.BytesIO(SMALL))
    bad = bytearray(SMALL)
    bad[len(h.raw) - 1 - (10 + 80)] ^= 1  # last byte of KEY_A's wrapped key (entry 0 of 2)
    assert "key does not unwrap the data key" in extract_fails(bytes(bad), tmp_path / "out")


def test_not_a_bundle(tmp_path: Path) -> None:
    assert "bad magic" in extract_fails(b"PK\x03\x04" + bytes(100), tmp_path / "out")


def test_read_header_rejects_truncated_header() -> None:
    with pytest.raises(IntegrityError, match="truncated"):
        bundle.read_header(io.BytesIO(SMALL[:20]))


# Bodies that authenticate (sealed with the right key) but break the record grammar or
# disagree with their manifest: only a writer holding the data key can produce them.


def _rec(t: int, payload: bytes, length: int | None = None) -> bytes:
    return bytes([t]) + (len(payload) if length is None else length).to_bytes(8, "big") + payload


def _manifest(datas: list[bytes], bundle_id: str = BID, **patch: object) -> bytes:
    entries = []
    for i, d in enumerate(datas):
        e = {
            "index": i,
            "sop_instance_uid": f"1.2.3.{i}",
            "sop_class": "1.2.3",
            "transfer_syntax": "1.2.840.10008.1.2.1",
            "received_transfer_syntax": "1.2.840.10008.1.2.1",
            "received_size": len(d),
            "received_sha256": hashlib.sha256(d).hexdigest(),
            "size": len(d),
            "sha256": hashlib.sha256(d).hexdigest(),
            "action": "passthrough",
        }
        e.update(patch)
        entries.append(e)
    doc = {"version": 1, "bundle_id": bundle_id, "study_key": "s", "instances": entries}
    return _rec(bundle.REC_MANIFEST, json.dumps(doc).encode())


def _seal(body: bytes) -> bytes:
    out = io.BytesIO()
    header, key = bundle._start(out, BID, [KEY_A.public_key()], CHUNK, 1700000000)
    crypto.stream_seal(key, header, io.BytesIO(body), out, CHUNK)
    return out.getvalue()


D, E = bundle.REC_DATA, bundle.REC_END
GRAMMAR_CASES = {
    "valid (control)": (_rec(D, b"abc") + _rec(E, b"") + _manifest([b"abc"]), None),
    "no manifest": (_rec(D, b"abc") + _rec(E, b""), "no manifest"),
    "empty body": (b"", "no manifest"),
    "data after manifest": (_manifest([]) + _rec(D, b"x"), "after its manifest"),
    "two manifests": (_manifest([]) + _manifest([]), "after its manifest"),
    "unknown record type": (_rec(0x04, b"") + _manifest([]), "unknown record type 0x04"),
    "END with a length": (_rec(D, b"a") + _rec(E, b"z") + _manifest([b"a"]), "END record has a length"),
    "manifest inside an instance": (_rec(D, b"abc") + _manifest([b"abc"]), "not ended before the manifest"),
    "body ends inside a record header": (b"\x01\x00\x00", "ends inside a record"),
    "body ends inside DATA": (_rec(D, b"abc", length=10), "ends inside a record"),
    "fewer manifest entries": (_rec(D, b"a") + _rec(E, b"") + _manifest([]), "lists 0 instances but"),
    "more manifest entries": (_manifest([b"a"]), "lists 1 instances but"),
    "sha256 mismatch": (_rec(D, b"a") + _rec(E, b"") + _manifest([b"b"]), "does not match its manifest"),
    "size mismatch": (
        _rec(D, b"a") + _rec(E, b"") + _manifest([b"a"], size=2),
        "does not match its manifest",
    ),
    "other bundle id": (_manifest([], bundle_id="other"), "different bundle id"),
    "manifest not JSON": (_rec(bundle.REC_MANIFEST, b"{nope"), "manifest is not valid"),
    "empty manifest record": (_rec(bundle.REC_MANIFEST, b""), "manifest is not valid"),
    "duplicate JSON key": (
        _rec(
            bundle.REC_MANIFEST, b'{"version":1,"version":1,"bundle_id":"x","study_key":"s","instances":[]}'
        ),
        "manifest is not valid",
    ),
    "bad manifest version": (
        _rec(
            bundle.REC_MANIFEST,
            json.dumps({"version": 2, "bundle_id": BID, "study_key": "s", "instances": []}).encode(),
        ),
        "manifest is not valid",
    ),
    "entry index out of order": (
        _rec(D, b"a") + _rec(E, b"") + _manifest([b"a"], index=1),
        "entry 0 is not valid",
    ),
    "entry with bad action": (
        _rec(D, b"a") + _rec(E, b"") + _manifest([b"a"], action="x"),
        "entry 0 is not valid",
    ),
    "entry missing a field": (_rec(D, b"a") + _rec(E, b"") + _manifest([b"a"], sop_class=None), "entry 0"),
}


@pytest.mark.parametrize("case", list(GRAMMAR_CASES))
def test_body_grammar_and_manifest_rules(tmp_path: Path, case: str) -> None:
    body, error = GRAMMAR_CASES[case]
    blob = _seal(body)
    if error is None:
        bundle.extract(io.BytesIO(blob), KEY_A, tmp_path)
        assert (tmp_path / "0.dcm").read_bytes() == b"abc"
    else:
        assert error in extract_fails(blob, tmp_path / "out")


# --- extract's output ---------------------------------------------------------------


def test_extract_output_is_private_and_leaves_no_temps(tmp_path: Path) -> None:
    bundle.extract(io.BytesIO(make([[b"a"], [b"b"]])), KEY_A, tmp_path / "new" / "dir")
    files = list((tmp_path / "new" / "dir").iterdir())
    assert sorted(p.name for p in files) == ["0.dcm", "1.dcm"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_extract_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "1.dcm").write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        bundle.extract(io.BytesIO(make([[b"a"], [b"b"]])), KEY_A, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["1.dcm"]
    assert (tmp_path / "1.dcm").read_bytes() == b"keep"


# --- writer -------------------------------------------------------------------------


def _writer() -> BundleWriter:
    return BundleWriter(io.BytesIO(), BID, [KEY_A.public_key()], "s", CHUNK)


def test_writer_write_without_instance_is_refused() -> None:
    with pytest.raises(RuntimeError):
        _writer().write(b"x")


def test_writer_close_with_open_instance_is_refused() -> None:
    w = _writer()
    w.begin_instance(info())
    with pytest.raises(RuntimeError):
        w.close()


def test_writer_begin_twice_is_refused() -> None:
    w = _writer()
    w.begin_instance(info())
    with pytest.raises(RuntimeError):
        w.begin_instance(info())


def test_writer_use_after_close_is_refused() -> None:
    w = _writer()
    w.close()
    with pytest.raises(RuntimeError):
        w.begin_instance(info())


@pytest.mark.parametrize("bad_id", ["", "x" * 65, "has space", "caf\u00e9", "tab\t"])
def test_writer_rejects_bad_bundle_id(bad_id: str) -> None:
    with pytest.raises(ValueError, match="bundle id"):
        BundleWriter(io.BytesIO(), bad_id, [KEY_A.public_key()], "s", CHUNK)


def test_writer_lists_a_duplicated_recipient_once() -> None:
    blob = make([[b"x"]], recipients=[KEY_A, KEY_B, KEY_A])
    assert len(bundle.read_header(io.BytesIO(blob)).recipients) == 2


def test_writer_accepts_instance_info_as_a_mapping() -> None:
    out = io.BytesIO()
    w = BundleWriter(out, BID, [KEY_A.public_key()], "s", CHUNK)
    w.begin_instance(dataclasses.asdict(info(3)))
    w.end_instance()
    w.close()
    (e,) = bundle.read_manifest(io.BytesIO(out.getvalue()), KEY_A).instances
    assert e.sop_instance_uid == info(3).sop_instance_uid


@pytest.mark.parametrize(
    ("recipients", "chunk"),
    [([], CHUNK), ([KEY_A.public_key()], 63), ([KEY_A.public_key()], crypto.MAX_CHUNK + 1)],
    ids=["no recipients", "chunk too small", "chunk too large"],
)
def test_writer_rejects_bad_arguments(recipients: list[object], chunk: int) -> None:
    with pytest.raises(ValueError):
        BundleWriter(io.BytesIO(), BID, recipients, "s", chunk)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [{"action": "zipped"}, {"received_sha256": "ABC"}, {"received_size": -1}, {"received_size": True}]
)
def test_writer_rejects_bad_instance_info(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _writer().begin_instance(info(0, **bad))


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_writer_rejects_mapping_with_missing_or_unknown_fields(change: str) -> None:
    d = dataclasses.asdict(info(0))
    if change == "missing":
        del d["sop_class"]
    else:
        d["patient_name"] = "x"
    with pytest.raises(ValueError, match=change):
        _writer().begin_instance(d)


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        n = len(memoryview(b))  # type: ignore[arg-type]
        self.n += n
        return n


def test_writer_memory_is_bounded_by_a_few_chunks() -> None:
    chunk = 64 * 1024
    piece = os.urandom(1 << 20)
    sink = _Sink()
    tracemalloc.start()
    try:
        w = BundleWriter(sink, BID, [KEY_A.public_key()], "s", chunk)  # type: ignore[arg-type]
        w.begin_instance(info())
        for _ in range(16):  # a 16 MiB instance
            w.write(piece)
        w.end_instance()
        w.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.n > 16 << 20
    assert peak < 8 * chunk


def test_extract_memory_is_bounded_by_a_few_chunks(tmp_path: Path) -> None:
    chunk = 64 * 1024
    src = tmp_path / "b.bundle"
    with src.open("wb") as f:
        w = BundleWriter(f, BID, [KEY_A.public_key()], "s", chunk)
        w.begin_instance(info())
        piece = os.urandom(1 << 20)
        for _ in range(16):
            w.write(piece)
        w.end_instance()
        w.close()
    del piece
    tracemalloc.start()
    try:
        with src.open("rb") as f:
            bundle.extract(f, KEY_A, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "out" / "0.dcm").stat().st_size == 16 << 20
    assert peak < 8 * chunk


# --- hybrid suite -------------------------------------------------------------------


def _hybrid_available() -> bool:
    try:
        bundle.HybridPrivateKey.generate()
    except Exception:
        return False
    return True


needs_mlkem = pytest.mark.skipif(not _hybrid_available(), reason="this OpenSSL has no ML-KEM")


@needs_mlkem
def test_hybrid_suite_round_trip(tmp_path: Path) -> None:
    k1, k2 = bundle.HybridPrivateKey.generate(), bundle.HybridPrivateKey.generate()
    out = io.BytesIO()
    w = BundleWriter(out, BID, [k1.public_key(), k2.public_key()], "s", CHUNK)
    w.begin_instance(info())
    w.write(b"post-quantum")
    w.end_instance()
    w.close()
    h = bundle.read_header(io.BytesIO(out.getvalue()))
    assert h.suite == bundle.SUITE_MLKEM768_X25519
    assert [len(r.wrapped_key) for r in h.recipients] == [1168, 1168]
    bundle.extract(io.BytesIO(out.getvalue()), k2, tmp_path)
    assert (tmp_path / "0.dcm").read_bytes() == b"post-quantum"


@needs_mlkem
def test_hybrid_key_on_x25519_bundle_names_the_suites(tmp_path: Path) -> None:
    msg = extract_fails(SMALL, tmp_path / "out", key=bundle.HybridPrivateKey.generate())  # type: ignore[arg-type]
    assert "ML-KEM-768+X25519 key" in msg and "X25519" in msg


@needs_mlkem
def test_writer_rejects_mixed_key_types() -> None:
    with pytest.raises(ValueError, match="same key type"):
        BundleWriter(
            io.BytesIO(), BID, [KEY_A.public_key(), bundle.HybridPrivateKey.generate().public_key()], "s"
        )


# --- fixed test vectors -------------------------------------------------------------


def test_stream_vector_is_reproduced_exactly() -> None:
    v = json.loads((VECTORS / "stream-v1.json").read_text())
    key = bundle.payload_key(bytes.fromhex(v["data_key"]))
    assert key.hex() == v["payload_key"]
    out = io.BytesIO()
    crypto.stream_seal(
        key, bytes.fromhex(v["header"]), io.BytesIO(bytes.fromhex(v["plaintext"])), out, v["chunk_size"]
    )
    assert out.getvalue().hex() == v["ciphertext"]
    assert "".join(c["ciphertext"] for c in v["chunks"]) == v["ciphertext"]
    assert [c["nonce"] for c in v["chunks"]][-1].endswith("01")


def test_stream_vector_header_parses_as_a_bundle_header() -> None:
    v = json.loads((VECTORS / "stream-v1.json").read_text())
    h = bundle.read_header(io.BytesIO(bytes.fromhex(v["header"])))
    assert (h.bundle_id, h.chunk_size, h.suite) == ("vector-stream-0001", v["chunk_size"], 1)


def _vector_key() -> X25519PrivateKey:
    key = serialization.load_pem_private_key(
        (VECTORS / "bundle-v1-recipient.pem").read_bytes(), password=None
    )
    assert isinstance(key, X25519PrivateKey)
    return key


def test_bundle_vector_opens_to_expected_manifest_and_bytes(tmp_path: Path) -> None:
    v = json.loads((VECTORS / "bundle-v1.json").read_text())
    blob = (VECTORS / "bundle-v1.bin").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == v["file_sha256"]
    m = bundle.extract(io.BytesIO(blob), _vector_key(), tmp_path)
    assert json.loads(m.to_json_bytes()) == v["manifest"]
    for i, data in enumerate(v["instances"]):
        assert (tmp_path / f"{i}.dcm").read_bytes().hex() == data


def test_bundle_vector_layers_check_out_one_by_one() -> None:
    v = json.loads((VECTORS / "bundle-v1.json").read_text())
    blob = (VECTORS / "bundle-v1.bin").read_bytes()
    key = _vector_key()
    header = bytes.fromhex(v["header"])
    assert blob.startswith(header)
    assert key.public_key().public_bytes_raw().hex() == v["recipient_public_key_raw"]
    assert hashlib.sha256(key.public_key().public_bytes_raw()).digest()[:8].hex() == v["recipient_key_id"]
    # HPKE, called directly with the documented parameters and info string.
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info_ = (
        b"APBUNDL1 data key\x00"
        + (1).to_bytes(2, "big")
        + (1).to_bytes(2, "big")
        + bytes([18])
        + b"vector-bundle-0001"
    )
    assert info_.hex() == v["hpke_info"]
    data_key = suite.decrypt(bytes.fromhex(v["wrapped_key"]), key, info=info_)
    assert data_key.hex() == v["data_key"]
    # The body is the deterministic STREAM encryption of the published plaintext.
    payload = crypto.derive(data_key, b"", b"APBUNDL1 payload key v1")
    assert payload.hex() == v["payload_key"]
    out = io.BytesIO()
    crypto.stream_seal(payload, header, io.BytesIO(bytes.fromhex(v["body_plaintext"])), out, v["chunk_size"])
    assert header + out.getvalue() == blob


def _rfc9180_open_x25519(sk: X25519PrivateKey, enc_ct: bytes, info_: bytes) -> bytes:
    """HPKE base-mode Open for DHKEM(X25519, HKDF-SHA256)/HKDF-SHA256/AES-256-GCM, written
    out from RFC 9180 sections 4, 4.1, 5.1 and 5.2 (independent of the library's HPKE)."""

    def extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
        return hmac.new(salt, b"HPKE-v1" + suite_id + label + ikm, hashlib.sha256).digest()

    def expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, n: int) -> bytes:
        labeled = n.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info
        return HKDFExpand(hashes.SHA256(), n, labeled).derive(prk)

    kem_id, suite_id = b"KEM\x00\x20", b"HPKE\x00\x20\x00\x01\x00\x02"
    enc, ct = enc_ct[:32], enc_ct[32:]
    dh = sk.exchange(X25519PublicKey.from_public_bytes(enc))
    kem_context = enc + sk.public_key().public_bytes_raw()
    shared = expand(kem_id, extract(kem_id, b"", b"eae_prk", dh), b"shared_secret", kem_context, 32)
    context = (
        b"\x00" + extract(suite_id, b"", b"psk_id_hash", b"") + extract(suite_id, b"", b"info_hash", info_)
    )
    secret = extract(suite_id, shared, b"secret", b"")
    key = expand(suite_id, secret, b"key", context, 32)
    nonce = expand(suite_id, secret, b"base_nonce", context, 12)
    return AESGCM(key).decrypt(nonce, ct, b"")


def test_bundle_vector_wrapped_key_is_plain_rfc9180_hpke() -> None:
    v = json.loads((VECTORS / "bundle-v1.json").read_text())
    got = _rfc9180_open_x25519(_vector_key(), bytes.fromhex(v["wrapped_key"]), bytes.fromhex(v["hpke_info"]))
    assert got.hex() == v["data_key"]
