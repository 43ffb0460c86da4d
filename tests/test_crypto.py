"""The STREAM construction, spool sealing and key files (appliance/crypto.py).

Pure tests with bytes in memory, plus key files in a temp dir. What they pin down: every
change to a sealed stream is detected, and no plaintext of a chunk that fails is ever
handed out; key files are created private and refused when they are not.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance.core import crypto
from appliance.core.errors import IntegrityError, KeyFileError

CHUNK = 64  # small chunks so that a few hundred bytes make a multi-chunk stream
SEALED = CHUNK + crypto.TAG_LEN
KEY = bytes(range(32))
AAD = b"header v1"


def seal(data: bytes, key: bytes = KEY, aad: bytes = AAD, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    assert crypto.stream_seal(key, aad, io.BytesIO(data), out, chunk) == len(data)
    return out.getvalue()


def open_all(sealed: bytes, key: bytes = KEY, aad: bytes = AAD, chunk: int = CHUNK) -> bytes:
    return b"".join(crypto.stream_open(key, aad, io.BytesIO(sealed), chunk))


def chunks_of(sealed: bytes) -> list[bytes]:
    return [sealed[i:i + SEALED] for i in range(0, len(sealed), SEALED)]


def opened_until_failure(sealed: bytes, aad: bytes = AAD) -> list[bytes]:
    """The chunks a reader receives before IntegrityError (which must be raised)."""
    got: list[bytes] = []
    with pytest.raises(IntegrityError):
        for c in crypto.stream_open(KEY, aad, io.BytesIO(sealed), CHUNK):
            got.append(c)
    return got


PLAIN = os.urandom(3 * CHUNK)


# --- STREAM ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_stream_round_trip(size: int) -> None:
    """Sealing then opening gives back exactly the plaintext, for sizes around chunk edges."""
    data = os.urandom(size)
    sealed = seal(data)
    n_chunks = max(1, -(-size // CHUNK))
    assert len(sealed) == size + n_chunks * crypto.TAG_LEN
    assert open_all(sealed) == data


def test_stream_round_trip_default_chunk_size() -> None:
    """The production chunk size (1 MiB) round-trips a stream of a bit more than 2 chunks."""
    data = os.urandom(2 * crypto.DEFAULT_CHUNK + 3)
    sealed = seal(data, chunk=crypto.DEFAULT_CHUNK)
    assert open_all(sealed, chunk=crypto.DEFAULT_CHUNK) == data


def test_stream_seal_chunks_matches_stream_seal() -> None:
    """The iterator form seals the same plaintext to a stream the reader accepts."""
    parts: Iterator[bytes] = iter([PLAIN[:CHUNK], PLAIN[CHUNK:2 * CHUNK], PLAIN[2 * CHUNK:]])
    sealed = b"".join(crypto.stream_seal_chunks(KEY, AAD, parts))
    assert open_all(sealed) == PLAIN


@pytest.mark.parametrize("pos", range(0, 3 * SEALED, 7))
def test_tampering_any_byte_fails_without_plaintext_of_that_chunk(pos: int) -> None:
    """Flipping any byte fails; the reader gets only the chunks before the damaged one."""
    sealed = bytearray(seal(PLAIN))
    sealed[pos] ^= 0x01
    got = opened_until_failure(bytes(sealed))
    damaged = pos // SEALED
    assert got == [PLAIN[i * CHUNK:(i + 1) * CHUNK] for i in range(damaged)]


def test_tampering_every_byte_position_fails() -> None:
    """Exhaustively: a one-bit change anywhere in a short two-chunk stream is detected."""
    sealed = seal(PLAIN[:CHUNK + 10])
    for pos in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[pos] ^= 0x80
        with pytest.raises(IntegrityError):
            open_all(bytes(damaged))


@pytest.mark.parametrize("keep", [1, 2])
def test_truncation_at_chunk_boundary_fails(keep: int) -> None:
    """Cutting a stream after a whole chunk is detected: that chunk was not sealed as last."""
    sealed = seal(PLAIN)
    got = opened_until_failure(sealed[:keep * SEALED])
    assert got == [PLAIN[i * CHUNK:(i + 1) * CHUNK] for i in range(keep - 1)]


def test_truncation_of_exact_multiple_stream_fails() -> None:
    """A stream of exactly 3 full chunks cut to 2 full chunks is detected."""
    sealed = seal(PLAIN)
    assert len(sealed) == 3 * SEALED
    with pytest.raises(IntegrityError):
        open_all(sealed[:2 * SEALED])


@pytest.mark.parametrize("cut", [1, crypto.TAG_LEN, SEALED - 1])
def test_truncation_inside_a_chunk_fails(cut: int) -> None:
    sealed = seal(PLAIN)
    with pytest.raises(IntegrityError):
        open_all(sealed[:-cut])


def test_empty_input_is_not_a_valid_stream() -> None:
    """Zero bytes are not the seal of an empty plaintext (that has one tag)."""
    with pytest.raises(IntegrityError):
        open_all(b"")


@pytest.mark.parametrize("reorder", [
    pytest.param([0, 2], id="drop-middle"),
    pytest.param([1, 2], id="drop-first"),
    pytest.param([1, 0, 2], id="swap-first-two"),
    pytest.param([0, 0, 1, 2], id="duplicate-first"),
    pytest.param([0, 1, 1, 2], id="duplicate-middle"),
    pytest.param([0, 1, 2, 2], id="duplicate-last"),
    pytest.param([0, 2, 1], id="swap-last-two"),
])
def test_dropping_reordering_duplicating_chunks_fails(reorder: list[int]) -> None:
    parts = chunks_of(seal(PLAIN))  # three full chunks: every rearrangement is well-formed
    assert len(parts) == 3
    with pytest.raises(IntegrityError):
        open_all(b"".join(parts[i] for i in reorder))


@pytest.mark.parametrize("extra", [b"\x00", os.urandom(crypto.TAG_LEN), os.urandom(SEALED),
                                   os.urandom(SEALED + 3)], ids=["1-byte", "tag", "chunk", "chunk+3"])
@pytest.mark.parametrize("size", [3 * CHUNK, 3 * CHUNK - 5])
def test_appended_bytes_fail(extra: bytes, size: int) -> None:
    sealed = seal(PLAIN[:size])
    with pytest.raises(IntegrityError):
        open_all(sealed + extra)


def test_appending_a_valid_sealed_last_chunk_fails() -> None:
    """Even a correctly sealed extra chunk is refused: the real last chunk says 'last'."""
    sealed = seal(PLAIN)
    with pytest.raises(IntegrityError):
        open_all(sealed + seal(b"more"))


@pytest.mark.parametrize("aad", [b"", b"header v2", AAD + b"\x00"], ids=["empty", "other", "longer"])
def test_different_aad_fails(aad: bytes) -> None:
    sealed = seal(PLAIN)
    assert opened_until_failure(sealed, aad=aad) == []


def test_wrong_key_fails() -> None:
    with pytest.raises(IntegrityError):
        open_all(seal(PLAIN), key=bytes(32))


def test_wrong_chunk_size_fails() -> None:
    with pytest.raises(IntegrityError):
        open_all(seal(PLAIN), chunk=CHUNK * 2)


def test_integrity_message_names_the_chunk_not_the_data() -> None:
    sealed = bytearray(seal(PLAIN))
    sealed[SEALED + 3] ^= 1
    with pytest.raises(IntegrityError, match="at chunk 1"):
        open_all(bytes(sealed))


# --- spool files ----------------------------------------------------------------------


def spool_seal(key: crypto.SpoolKey, record: str, data: bytes) -> bytes:
    out = io.BytesIO()
    assert crypto.seal_spool_file(key, record, io.BytesIO(data), out, chunk_size=CHUNK) == len(data)
    return out.getvalue()


def spool_open(key: crypto.SpoolKey, record: str, sealed: bytes) -> bytes:
    return b"".join(crypto.open_spool_file(key, record, io.BytesIO(sealed)))


SPOOL_KEY = crypto.SpoolKey(os.urandom(32))


@pytest.mark.parametrize("size", [0, 1, CHUNK, 5 * CHUNK + 1])
def test_spool_file_round_trip(size: int) -> None:
    data = os.urandom(size)
    assert spool_open(SPOOL_KEY, "rec1", spool_seal(SPOOL_KEY, "rec1", data)) == data


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 7])
@pytest.mark.parametrize("piece", [1, 7, CHUNK, 3 * CHUNK + 5])
def test_incremental_sealer_writes_what_seal_spool_parts_writes(size: int, piece: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver seals a large instance piece by piece as it arrives: whatever the piece
    sizes, the file is byte for byte what sealing the whole would give (same salt)."""
    data = os.urandom(size)
    salt = os.urandom(16)
    monkeypatch.setattr(crypto.os, "urandom", lambda n: salt)
    whole = io.BytesIO()
    crypto.seal_spool_parts(SPOOL_KEY, "rec1", [data], whole, chunk_size=CHUNK)
    inc = io.BytesIO()
    sealer = crypto.SpoolSealer(SPOOL_KEY, "rec1", inc, chunk_size=CHUNK)
    for i in range(0, size, piece):
        sealer.write(data[i:i + piece])
    sealer.finish()
    assert sealer.size == size
    assert inc.getvalue() == whole.getvalue()
    assert spool_open(SPOOL_KEY, "rec1", inc.getvalue()) == data


def test_spool_file_is_not_plaintext() -> None:
    data = b"DICM" + b"PATIENT^NAME" * 20
    sealed = spool_seal(SPOOL_KEY, "rec1", data)
    assert b"PATIENT" not in sealed and b"DICM" not in sealed


def test_spool_files_of_same_content_differ() -> None:
    """A fresh salt per file: equal images do not give equal ciphertext."""
    data = os.urandom(100)
    assert spool_seal(SPOOL_KEY, "r", data) != spool_seal(SPOOL_KEY, "r", data)


def test_spool_file_under_other_spool_key_is_named_as_such() -> None:
    sealed = spool_seal(SPOOL_KEY, "rec1", b"x" * 100)
    other = crypto.SpoolKey(os.urandom(32))
    with pytest.raises(IntegrityError, match="sealed under a different spool key"):
        spool_open(other, "rec1", sealed)


def test_spool_file_under_another_record_id_fails() -> None:
    """Two sealed files swapped under each other's names are detected."""
    a = spool_seal(SPOOL_KEY, "rec-a", b"a" * 100)
    with pytest.raises(IntegrityError):
        spool_open(SPOOL_KEY, "rec-b", a)


def test_spool_file_bad_magic_fails() -> None:
    sealed = bytearray(spool_seal(SPOOL_KEY, "rec1", b"x" * 100))
    sealed[0:8] = b"NOTSPOOL"
    with pytest.raises(IntegrityError, match="bad magic"):
        spool_open(SPOOL_KEY, "rec1", bytes(sealed))


def test_spool_file_short_header_fails() -> None:
    sealed = spool_seal(SPOOL_KEY, "rec1", b"x")
    with pytest.raises(IntegrityError, match="truncated"):
        spool_open(SPOOL_KEY, "rec1", sealed[:10])


def test_spool_file_tampered_header_fails() -> None:
    """The header (salt, chunk size) is authenticated as well as used."""
    sealed = bytearray(spool_seal(SPOOL_KEY, "rec1", b"x" * 100))
    sealed[20] ^= 1  # inside the salt
    with pytest.raises(IntegrityError):
        spool_open(SPOOL_KEY, "rec1", bytes(sealed))


@pytest.mark.parametrize("chunk", [0, crypto.MAX_CHUNK + 1])
def test_spool_file_invalid_chunk_size_refused(chunk: int) -> None:
    sealed = bytearray(spool_seal(SPOOL_KEY, "rec1", b"x" * 100))
    sealed[32:36] = chunk.to_bytes(4, "big")
    with pytest.raises(IntegrityError, match="chunk size"):
        spool_open(SPOOL_KEY, "rec1", bytes(sealed))


def test_spool_file_chunks_cannot_be_spliced_between_files() -> None:
    """Each spool file has its own derived key: a chunk from another file never fits,
    even at the same position and under the same record id."""
    a = spool_seal(SPOOL_KEY, "rec1", os.urandom(3 * CHUNK))
    b = spool_seal(SPOOL_KEY, "rec1", os.urandom(3 * CHUNK))
    header = len(a) - 3 * SEALED
    spliced = a[:header + SEALED] + b[header + SEALED:header + 2 * SEALED] + a[header + 2 * SEALED:]
    with pytest.raises(IntegrityError, match="chunk 1"):
        spool_open(SPOOL_KEY, "rec1", spliced)


def test_spool_key_id_is_not_the_key() -> None:
    assert len(SPOOL_KEY.id) == 8 and SPOOL_KEY.id not in SPOOL_KEY.key
    assert SPOOL_KEY.index_key() != SPOOL_KEY.key


# --- key files ------------------------------------------------------------------------


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_spool_key_is_private_and_loads(tmp_path: Path) -> None:
    p = tmp_path / "keys" / "spool.key"
    key = crypto.create_spool_key(p)
    assert mode(p) == 0o600
    assert p.read_text().startswith(crypto.SPOOL_KEY_PREFIX)
    assert crypto.load_spool_key(p) == key


def test_create_spool_key_never_overwrites(tmp_path: Path) -> None:
    p = tmp_path / "spool.key"
    crypto.create_spool_key(p)
    before = p.read_bytes()
    with pytest.raises((FileExistsError, KeyFileError)):
        crypto.create_spool_key(p)
    assert p.read_bytes() == before


@pytest.mark.parametrize("bad_mode", [0o640, 0o644, 0o604, 0o660])
def test_load_refuses_open_mode(tmp_path: Path, bad_mode: int) -> None:
    p = tmp_path / "spool.key"
    crypto.create_spool_key(p)
    p.chmod(bad_mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.load_spool_key(p)


def test_load_accepts_0400(tmp_path: Path) -> None:
    p = tmp_path / "spool.key"
    key = crypto.create_spool_key(p)
    p.chmod(0o400)
    assert crypto.load_spool_key(p) == key


def test_load_refuses_file_of_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    p = tmp_path / "spool.key"
    crypto.create_spool_key(p)
    os.chown(p, 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        crypto.load_spool_key(p)


def test_root_uses_the_service_users_key_in_the_service_users_folder(tmp_path: Path) -> None:
    """The update units run as root and count the spool's authentication failures with
    the daemon's key, which the service user owns."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    p = folder / "spool.key"
    key = crypto.create_spool_key(p)
    os.chown(p, 65534, -1)
    os.chown(folder, 65534, -1)
    assert crypto.load_spool_key(p) == key


def test_root_refuses_the_service_users_key_in_a_folder_others_may_write(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    folder = tmp_path / "keys"
    folder.mkdir()
    p = folder / "spool.key"
    crypto.create_spool_key(p)
    os.chown(p, 65534, -1)
    os.chown(folder, 65534, -1)
    folder.chmod(0o775)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        crypto.load_spool_key(p)


def test_load_refuses_missing_file_with_hint(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="appliance keys init"):
        crypto.load_spool_key(tmp_path / "nope.key")


def test_load_refuses_directory(tmp_path: Path) -> None:
    d = tmp_path / "spool.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        crypto.load_spool_key(d)


def write_private(p: Path, text: str) -> Path:
    p.write_text(text)
    p.chmod(0o600)
    return p


@pytest.mark.parametrize("body", [
    pytest.param("!!!not base64!!!", id="bad-chars"),
    pytest.param("AAAA*AAA", id="bad-char-inside"),
    pytest.param("QUJD", id="too-short"),
    pytest.param(base64.b64encode(bytes(33)).decode(), id="too-long"),
    pytest.param(base64.b64encode(bytes(32)).decode()[:-2], id="cut"),
])
def test_load_refuses_damaged_key(tmp_path: Path, body: str) -> None:
    p = write_private(tmp_path / "spool.key", crypto.SPOOL_KEY_PREFIX + body + "\n")
    with pytest.raises(KeyFileError, match="damaged"):
        crypto.load_spool_key(p)


def test_load_refuses_file_that_is_not_a_spool_key(tmp_path: Path) -> None:
    p = write_private(tmp_path / "spool.key", base64.b64encode(bytes(32)).decode())
    with pytest.raises(KeyFileError, match="not an appliance spool key"):
        crypto.load_spool_key(p)


def test_create_keypair_writes_private_pem_0600_and_loadable_public(tmp_path: Path) -> None:
    priv_p, pub_p = tmp_path / "k" / "appliance.key", tmp_path / "k" / "appliance.pub"
    pub = crypto.create_keypair(priv_p, pub_p)
    assert mode(priv_p) == 0o600
    assert priv_p.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_p.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    priv = crypto.load_private_key(priv_p)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert priv.public_key().public_bytes(*raw) == pub.public_bytes(*raw)
    assert crypto.load_public_key(pub_p).public_bytes(*raw) == pub.public_bytes(*raw)


def test_create_keypair_never_overwrites(tmp_path: Path) -> None:
    priv_p, pub_p = tmp_path / "appliance.key", tmp_path / "appliance.pub"
    crypto.create_keypair(priv_p, pub_p)
    before = priv_p.read_bytes()
    with pytest.raises((FileExistsError, KeyFileError)):
        crypto.create_keypair(priv_p, tmp_path / "other.pub")
    assert priv_p.read_bytes() == before


def test_load_private_key_refuses_open_mode(tmp_path: Path) -> None:
    priv_p = tmp_path / "appliance.key"
    crypto.create_keypair(priv_p, tmp_path / "appliance.pub")
    priv_p.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        crypto.load_private_key(priv_p)


def test_load_private_key_refuses_non_pem(tmp_path: Path) -> None:
    p = write_private(tmp_path / "appliance.key", "garbage\n")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        crypto.load_private_key(p)


def test_load_public_key_refuses_missing_and_non_pem(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        crypto.load_public_key(tmp_path / "nope.pub")
    (tmp_path / "bad.pub").write_text("garbage\n")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        crypto.load_public_key(tmp_path / "bad.pub")


def test_load_public_key_refuses_private_key_file(tmp_path: Path) -> None:
    """Naming the private key where a public key belongs is refused, not half-used."""
    priv_p = tmp_path / "appliance.key"
    crypto.create_keypair(priv_p, tmp_path / "appliance.pub")
    with pytest.raises(KeyFileError):
        crypto.load_public_key(priv_p)
