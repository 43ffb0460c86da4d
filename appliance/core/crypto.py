"""Cryptography for the appliance: the STREAM chunked AEAD, spool sealing, key files.

Everything is built from `cryptography` primitives (AES-256-GCM, HKDF-SHA256, X25519,
HPKE); nothing here invents a cipher. What this module owns:

- The STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015) over AES-256-GCM:
  the plaintext is cut into fixed-size chunks; chunk i is sealed with the nonce
  `0^7 || be32(i) || last_flag` and the authenticated header as associated data. So a
  reader detects reordered, dropped, duplicated or truncated chunks and any change of the
  header, and a stream never needs to fit in memory. A stream key must encrypt exactly
  one stream: every caller derives or draws a fresh key per stream.
- Spool sealing: each received instance is one stream under a per-file key derived with
  HKDF from the spool key and a random salt; the spool record id is bound in as
  associated data so that two sealed files cannot be swapped under each other's names.
- Key files: the spool key (32 random bytes, base64 in a one-line text file) and X25519
  key pairs (PEM). Private key files must be mode 0600 (no group/other bits) and owned by
  the user running the appliance; anything else is refused with `KeyFileError`.

How it fails: authentication failures raise `IntegrityError` and no plaintext of a
failing chunk is ever returned; callers that write plaintext to disk write it to a temp
file and keep it only once the whole stream has verified.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.core import durable
from appliance.core.errors import IntegrityError, KeyFileError

KEY_LEN = 32
TAG_LEN = 16
DEFAULT_CHUNK = 1 << 20  # 1 MiB: GCM runs ~9 GB/s here; the per-chunk overhead is noise.
MAX_CHUNK = 1 << 26

SPOOL_MAGIC = b"APSPOOL1"
_SPOOL_HEADER = struct.Struct(">8s8s16sI")  # magic, key id, salt, chunk size
SPOOL_KEY_PREFIX = "appliance-spool-key-v1:"


# --- STREAM -------------------------------------------------------------------------


def _nonce(counter: int, last: bool) -> bytes:
    if counter >= 1 << 32:
        raise ValueError("stream too long for a 32-bit chunk counter")
    return b"\x00" * 7 + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def stream_seal_chunks(key: bytes, aad: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Seal an iterator of plaintext chunks; yields ciphertext chunks.

    All chunks but the last must have the same length (the stream's chunk size); the last
    may be shorter or empty. One chunk of look-ahead tells which chunk is last.
    """
    aead = AESGCM(key)
    counter = 0
    pending: bytes | None = None
    for chunk in chunks:
        if pending is not None:
            yield aead.encrypt(_nonce(counter, False), pending, aad)
            counter += 1
        pending = chunk
    yield aead.encrypt(_nonce(counter, True), pending or b"", aad)


def _read_full(src: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        b = src.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def read_chunks(src: BinaryIO, size: int) -> Iterator[bytes]:
    """Yield `src` in chunks of exactly `size` bytes (the last may be shorter)."""
    while True:
        b = _read_full(src, size)
        if not b:
            return
        yield b
        if len(b) < size:
            return


def stream_seal(key: bytes, aad: bytes, src: BinaryIO, dst: BinaryIO, chunk_size: int) -> int:
    """Seal all of `src` into `dst`; returns the plaintext length."""
    return _seal_into(key, aad, read_chunks(src, chunk_size), dst)


def _seal_into(key: bytes, aad: bytes, chunks: Iterable[bytes], dst: BinaryIO) -> int:
    """Seal exact-size `chunks` into `dst`; returns the plaintext length."""
    total = 0

    def counted() -> Iterator[bytes]:
        nonlocal total
        for c in chunks:
            total += len(c)
            yield c

    for ct in stream_seal_chunks(key, aad, counted()):
        dst.write(ct)
    return total


def stream_open(key: bytes, aad: bytes, src: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """Yield verified plaintext chunks of a sealed stream read from `src`.

    Raises IntegrityError on the first chunk that fails, before yielding it. A consumer
    that must not act on a prefix (extract, forward) collects into a temp file first.
    """
    aead = AESGCM(key)
    size = chunk_size + TAG_LEN
    counter = 0
    cur = _read_full(src, size)
    while True:
        nxt = _read_full(src, size) if len(cur) == size else b""
        last = not nxt
        try:
            yield aead.decrypt(_nonce(counter, last), cur, aad)
        except InvalidTag:
            raise IntegrityError(
                f"authentication failed at chunk {counter}: wrong key, tampered or truncated"
            ) from None
        if last:
            return
        counter += 1
        cur = nxt


# --- spool sealing ------------------------------------------------------------------


def key_id(key: bytes) -> bytes:
    """An 8-byte public fingerprint of a symmetric key, to tell 'wrong key' from tampering."""
    return hashlib.sha256(b"appliance key id\x00" + key).digest()[:8]


def derive(key: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


@dataclass(frozen=True)
class SpoolKey:
    """The local symmetric key that seals the spool, and the keys derived from it."""

    key: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.key)

    def index_key(self) -> bytes:
        """Key for keyed hashes stored in the index (study keys, content digests)."""
        return derive(self.key, b"", b"appliance index hmac v1")

    def audit_key(self) -> bytes:
        """Key that seals the audit trail's records (appliance.audit): patient IDs at rest
        are as unreadable on a stolen disk as the spool."""
        return derive(self.key, b"", b"appliance audit record v1")


def seal_record(key: bytes, aad: bytes, data: bytes) -> bytes:
    """One small record under AES-256-GCM: a random 96-bit nonce, then the ciphertext."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, data, aad)


def open_record(key: bytes, aad: bytes, sealed: bytes) -> bytes:
    """`seal_record`'s inverse; cryptography's InvalidTag when altered or another key."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def seal_spool_file(
    spool_key: SpoolKey, record_id: str, src: BinaryIO, dst: BinaryIO, chunk_size: int = DEFAULT_CHUNK
) -> int:
    """Write header + sealed stream of `src` to `dst`. Returns the plaintext length."""
    return seal_spool_parts(spool_key, record_id, read_chunks(src, chunk_size), dst, chunk_size)


def seal_spool_parts(spool_key: SpoolKey, record_id: str, parts: Iterable[bytes | memoryview],
                     dst: BinaryIO, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Like `seal_spool_file`, from buffers of any sizes (the receiver's in-memory path).

    Buffers are cut and joined into exact chunks with one copy per chunk: on a 0.5 MB CT
    slice the copies of a file-like reader cost ~30x the AES-GCM itself.
    """
    salt = os.urandom(16)
    header = _SPOOL_HEADER.pack(SPOOL_MAGIC, spool_key.id, salt, chunk_size)
    dst.write(header)
    file_key = derive(spool_key.key, salt, b"appliance spool file v1")
    return _seal_into(file_key, header + record_id.encode(), rechunk(parts, chunk_size), dst)


def rechunk(parts: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """Yield the concatenation of `parts` in chunks of exactly `size` (the last shorter)."""
    pending: list[memoryview] = []
    have = 0
    for p in parts:
        mv = memoryview(p).cast("B")
        while len(mv):
            take = min(size - have, len(mv))
            pending.append(mv[:take])
            have += take
            mv = mv[take:]
            if have == size:
                yield b"".join(pending)
                pending, have = [], 0
    if pending:
        yield b"".join(pending)


class SpoolSealer:
    """Seal a spool file as its plaintext arrives: `write` pieces of any size, then `finish`.

    Writes exactly what `seal_spool_parts` writes for the concatenation of the pieces (the
    receiver uses it for instances too large to hold in memory). Holds at most one chunk
    plus one piece of plaintext.
    """

    def __init__(self, spool_key: SpoolKey, record_id: str, dst: BinaryIO,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        salt = os.urandom(16)
        header = _SPOOL_HEADER.pack(SPOOL_MAGIC, spool_key.id, salt, chunk_size)
        dst.write(header)
        self._aead = AESGCM(derive(spool_key.key, salt, b"appliance spool file v1"))
        self._aad = header + record_id.encode()
        self._dst = dst
        self._chunk = chunk_size
        self._buf = bytearray()
        self._counter = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        self._buf += data
        # Keep the last full chunk back: only `finish` knows whether it is the last one.
        while len(self._buf) > self._chunk:
            self._seal(bytes(self._buf[: self._chunk]), last=False)
            del self._buf[: self._chunk]

    def finish(self) -> None:
        self._seal(bytes(self._buf), last=True)
        self._buf = bytearray()

    def _seal(self, chunk: bytes, last: bool) -> None:
        self._dst.write(self._aead.encrypt(_nonce(self._counter, last), chunk, self._aad))
        self._counter += 1


def open_spool_file(spool_key: SpoolKey, record_id: str, src: BinaryIO) -> Iterator[bytes]:
    """Yield the verified plaintext chunks of a sealed spool file."""
    raw = _read_full(src, _SPOOL_HEADER.size)
    if len(raw) != _SPOOL_HEADER.size:
        raise IntegrityError("sealed spool file is truncated (no complete header)")
    magic, kid, salt, chunk_size = _SPOOL_HEADER.unpack(raw)
    if magic != SPOOL_MAGIC:
        if magic[:7] == SPOOL_MAGIC[:7] and magic[7:].isdigit():  # APSPOOL<n>: another release's
            raise IntegrityError(f"sealed spool file of format {magic[7:].decode()}, which this"
                                 f" version does not read (it reads {SPOOL_MAGIC[7:].decode()})")
        raise IntegrityError("not a sealed spool file (bad magic)")
    if kid != spool_key.id:
        raise IntegrityError("sealed under a different spool key")
    if not 0 < chunk_size <= MAX_CHUNK:
        raise IntegrityError("sealed spool file has an invalid chunk size")
    file_key = derive(spool_key.key, salt, b"appliance spool file v1")
    return stream_open(file_key, raw + record_id.encode(), src, chunk_size)


# --- key files ----------------------------------------------------------------------


def check_private_key_file(path: Path) -> None:
    """Refuse a private key file that others could read or that someone else owns."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"key file {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        raise KeyFileError(f"key file {path} is owned by uid {st.st_uid}, not by the service user"
                           f" (uid {os.geteuid()})")


def load_spool_key(path: Path) -> SpoolKey:
    if not path.exists():
        raise KeyFileError(f"key file {path} does not exist (create it with 'appliance keys init')")
    check_private_key_file(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text.startswith(SPOOL_KEY_PREFIX):
        raise KeyFileError(f"key file {path} is not an appliance spool key")
    try:
        key = base64.b64decode(text[len(SPOOL_KEY_PREFIX):], validate=True)
    except ValueError:
        raise KeyFileError(f"key file {path} is damaged (bad base64)") from None
    if len(key) != KEY_LEN:
        raise KeyFileError(f"key file {path} is damaged (wrong key length)")
    return SpoolKey(key)


def create_spool_key(path: Path) -> SpoolKey:
    """Create a new spool key file (0600). Never overwrites an existing file."""
    key = os.urandom(KEY_LEN)
    _create_exclusive(path, (SPOOL_KEY_PREFIX + base64.b64encode(key).decode() + "\n").encode())
    return SpoolKey(key)


def _create_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    durable.make_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        durable.fsync_file(f)
    durable.fsync_dir(path.parent)


def create_private_file(path: Path, data: bytes) -> None:
    """A new private key file (0600, fsynced with its directory); never overwrites one."""
    _create_exclusive(path, data)


def create_keypair(private_path: Path, public_path: Path) -> X25519PublicKey:
    """Create an X25519 key pair: PKCS#8 PEM private key (0600) and SPKI PEM public key."""
    priv = X25519PrivateKey.generate()
    _create_exclusive(
        private_path,
        priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    pub = priv.public_key()
    _create_exclusive(
        public_path,
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        mode=0o644,
    )
    return pub


def load_private_key_of(path: Path, kind: type, what: str) -> Any:
    """A PEM private key of type `kind` ("X25519", "Ed25519": `what`), from a file that
    passes `check_private_key_file`; KeyFileError naming the file otherwise. (Typed Any:
    the key classes are abstract, so callers annotate what they get.)"""
    check_private_key_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"key file {path} is not a PEM private key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"key file {path} is not an {what} private key")
    return key


def load_public_key_of(path: Path, kind: type, what: str) -> Any:
    """A PEM public key of type `kind`; KeyFileError naming the file otherwise."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"public key file {path} does not exist") from None
    except ValueError:
        raise KeyFileError(f"key file {path} is not a PEM public key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"key file {path} is not an {what} public key")
    return key


def load_private_key(path: Path) -> X25519PrivateKey:
    key: X25519PrivateKey = load_private_key_of(path, X25519PrivateKey, "X25519")
    return key


def load_public_key(path: Path) -> X25519PublicKey:
    key: X25519PublicKey = load_public_key_of(path, X25519PublicKey, "X25519")
    return key
