"""The encrypted bundle format: one file carrying the instances of (part of) one study.

What this module owns on the wire and on disk (the full spec is docs/bundle-format.md):

- A bundle is `header || STREAM body`. The cleartext header (magic `APBUNDL1`, format
  version, bundle id, creation time, chunk size, HPKE suite, and per recipient a key id
  and the HPKE-wrapped data key) is the associated data of every body chunk, so changing
  any header byte makes the body fail to authenticate.
- A fresh random 32-byte data key per bundle; the body is sealed with
  `crypto.stream_seal_chunks` (AES-256-GCM, counter nonces with a last-chunk flag) under a
  payload key derived from it with HKDF. The data key is wrapped for each recipient with
  HPKE (RFC 9180, base mode): suite 1 is DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 +
  AES-256-GCM; suite 2 swaps in the ML-KEM-768+X25519 hybrid KEM.
- The body plaintext is a sequence of records `type || be64(length) || bytes`: DATA
  pieces of the current instance, END closing it, and one MANIFEST (UTF-8 JSON) last.
- `extract` writes `<index>.dcm` files (mode 0600; opaque names, never UIDs) into the
  directory it is given, and only once the whole bundle has verified.

The writer streams: memory stays at a few chunks whatever the instance sizes. Nothing here
logs; no error message contains a UID or other patient data (instances are named by
their index in the bundle).

How it fails: every problem with a bundle being read (wrong key, tampering, truncation,
trailing or reordered data, a body that breaks the record grammar, a manifest that does
not match the data) raises `IntegrityError` with a message saying which; no plaintext of
an unverified bundle is left on disk or handed to a caller. Misuse of `BundleWriter`
(bad arguments, calls out of order) raises `ValueError` / `RuntimeError`; after any
exception from the writer its output is unusable and must be discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from appliance.core import crypto, durable
from appliance.core.errors import IntegrityError, UsageError

MAGIC: Final = b"APBUNDL1"
FORMAT_VERSION: Final = 1
MANIFEST_VERSION: Final = 1

SUITE_X25519: Final = 1  # HPKE DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM
SUITE_MLKEM768_X25519: Final = 2  # HPKE MLKEM768-X25519 (X-Wing), HKDF-SHA256, AES-256-GCM
SUITE_NAMES: Final = {SUITE_X25519: "X25519", SUITE_MLKEM768_X25519: "ML-KEM-768+X25519"}
_WRAPPED_LEN: Final = {SUITE_X25519: 32 + 32 + 16, SUITE_MLKEM768_X25519: 1120 + 32 + 16}

REC_DATA: Final = 0x01
REC_END: Final = 0x02
REC_MANIFEST: Final = 0x03

MIN_CHUNK: Final = 64
MAX_CHUNK: Final = crypto.MAX_CHUNK
MAX_BUNDLE_ID: Final = 64
MAX_RECIPIENTS: Final = 255
MAX_HEADER: Final = 1 << 20
MAX_MANIFEST: Final = 64 << 20
ACTIONS: Final = ("compressed", "passthrough")

_PREFIX = struct.Struct(">8sHI")  # magic, format version, header length
_FIELDS = struct.Struct(">QIHB")  # created, chunk size, suite, recipient count
_REC = struct.Struct(">BQ")  # record type, length
_WRAP_INFO = b"APBUNDL1 data key\x00"
_PAYLOAD_INFO = b"APBUNDL1 payload key v1"
_BUNDLE_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Events of the body scanner.
_BEGIN, _DATA, _END = 0, 1, 2


# --- keys ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HybridPublicKey:
    """An ML-KEM-768 + X25519 recipient public key (suite 2)."""

    mlkem: MLKEM768PublicKey
    x25519: X25519PublicKey

    def raw(self) -> bytes:
        """The X-Wing encoding: ML-KEM-768 public key (1184 bytes) || X25519 (32 bytes)."""
        return self.mlkem.public_bytes_raw() + self.x25519.public_bytes_raw()


@dataclass(frozen=True)
class HybridPrivateKey:
    """An ML-KEM-768 + X25519 recipient private key (suite 2). No key-file format yet."""

    mlkem: MLKEM768PrivateKey
    x25519: X25519PrivateKey

    @classmethod
    def generate(cls) -> HybridPrivateKey:
        return cls(MLKEM768PrivateKey.generate(), X25519PrivateKey.generate())

    def public_key(self) -> HybridPublicKey:
        return HybridPublicKey(self.mlkem.public_key(), self.x25519.public_key())


PublicKey = X25519PublicKey | HybridPublicKey
PrivateKey = X25519PrivateKey | HybridPrivateKey


def recipient_key_id(public_key: PublicKey) -> bytes:
    """8-byte recipient key id: the first 8 bytes of SHA-256 of the raw public key."""
    raw = public_key.raw() if isinstance(public_key, HybridPublicKey) else public_key.public_bytes_raw()
    return hashlib.sha256(raw).digest()[:8]


def _suite_of(key: PublicKey | PrivateKey) -> int:
    if isinstance(key, HybridPublicKey | HybridPrivateKey):
        return SUITE_MLKEM768_X25519
    return SUITE_X25519


def _hpke_suite(suite: int) -> hpke.Suite:
    kem = hpke.KEM.X25519 if suite == SUITE_X25519 else hpke.KEM.MLKEM768_X25519
    return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def wrap_info(bundle_id: str, suite: int, version: int = FORMAT_VERSION) -> bytes:
    """The HPKE `info` for wrapping a bundle's data key: binds format, suite and bundle id."""
    bid = bundle_id.encode("ascii")
    return _WRAP_INFO + struct.pack(">HHB", version, suite, len(bid)) + bid


def payload_key(data_key: bytes) -> bytes:
    """The STREAM key of the body: HKDF-SHA256(data key, empty salt, fixed info)."""
    return crypto.derive(data_key, b"", _PAYLOAD_INFO)


def _wrap(suite: int, data_key: bytes, recipient: PublicKey, info: bytes) -> bytes:
    if isinstance(recipient, HybridPublicKey):
        pub = hpke.MLKEM768X25519PublicKey(recipient.mlkem, recipient.x25519)
        return _hpke_suite(suite).encrypt(data_key, pub, info=info)
    return _hpke_suite(suite).encrypt(data_key, recipient, info=info)


# --- header -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientEntry:
    key_id: bytes
    wrapped_key: bytes


@dataclass(frozen=True)
class Header:
    """The cleartext, authenticated header of a bundle. `raw` is its exact bytes."""

    version: int
    bundle_id: str
    created: int
    chunk_size: int
    suite: int
    recipients: tuple[RecipientEntry, ...]
    raw: bytes

    @property
    def suite_name(self) -> str:
        return SUITE_NAMES.get(self.suite, f"unknown ({self.suite})")


def _check_bundle_id(bundle_id: str) -> None:
    if not isinstance(bundle_id, str) or not _BUNDLE_ID_RE.fullmatch(bundle_id):
        raise ValueError("bundle id must be 1 to 64 visible ASCII characters (0x21-0x7E)")


def _encode_header(
    bundle_id: str, created: int, chunk_size: int, suite: int, recipients: Sequence[RecipientEntry]
) -> bytes:
    bid = bundle_id.encode("ascii")
    body = bytearray()
    body += struct.pack(">B", len(bid)) + bid
    body += _FIELDS.pack(created, chunk_size, suite, len(recipients))
    for r in recipients:
        body += r.key_id + struct.pack(">H", len(r.wrapped_key)) + r.wrapped_key
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, _PREFIX.size + len(body)) + bytes(body)


def read_header(src: BinaryIO) -> Header:
    """Read and check the header; leaves `src` at the start of the body. Needs no key."""
    prefix = crypto._read_full(src, _PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise IntegrityError("bundle is truncated (no complete header)")
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise IntegrityError("not a bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"unsupported bundle format version {version}")
    if not _PREFIX.size < length <= MAX_HEADER:
        raise IntegrityError("bundle header has an invalid length")
    rest = crypto._read_full(src, length - _PREFIX.size)
    if len(rest) < length - _PREFIX.size:
        raise IntegrityError("bundle is truncated (no complete header)")
    raw = prefix + rest
    try:
        return _parse_header(raw)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise IntegrityError("bundle header is malformed") from None


def _parse_header(raw: bytes) -> Header:
    pos = _PREFIX.size
    n = raw[pos]
    pos += 1
    bundle_id = raw[pos : pos + n].decode("ascii")
    pos += n
    if len(bundle_id) != n or not _BUNDLE_ID_RE.fullmatch(bundle_id):
        raise IntegrityError("bundle header is malformed (bad bundle id)")
    created, chunk_size, suite, count = _FIELDS.unpack_from(raw, pos)
    pos += _FIELDS.size
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise IntegrityError("bundle header has an invalid chunk size")
    if suite not in SUITE_NAMES:
        raise IntegrityError(f"bundle uses an unsupported key-wrapping suite ({suite})")
    if count == 0:
        raise IntegrityError("bundle header lists no recipients")
    entries = []
    for _ in range(count):
        kid = raw[pos : pos + 8]
        (wlen,) = struct.unpack_from(">H", raw, pos + 8)
        pos += 10
        wrapped = raw[pos : pos + wlen]
        pos += wlen
        if len(kid) != 8 or len(wrapped) != wlen or wlen != _WRAPPED_LEN[suite]:
            raise IntegrityError("bundle header is malformed (bad recipient entry)")
        entries.append(RecipientEntry(kid, wrapped))
    if pos != len(raw):
        raise IntegrityError("bundle header is malformed (length does not match its fields)")
    if len({e.key_id for e in entries}) != len(entries):
        raise IntegrityError("bundle header lists a recipient key twice")
    return Header(FORMAT_VERSION, bundle_id, created, chunk_size, suite, tuple(entries), raw)


# --- manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceInfo:
    """What the packer knows about an instance before writing its transmitted bytes."""

    sop_instance_uid: str
    sop_class: str
    transfer_syntax: str  # as transmitted
    received_transfer_syntax: str
    received_size: int
    received_sha256: str  # lowercase hex
    action: str  # "compressed" | "passthrough"
    reason: str | None = None


@dataclass(frozen=True)
class ManifestEntry:
    index: int
    sop_instance_uid: str
    sop_class: str
    transfer_syntax: str
    received_transfer_syntax: str
    received_size: int
    received_sha256: str
    size: int  # transmitted bytes in the bundle
    sha256: str  # of the transmitted bytes, lowercase hex
    action: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class": self.sop_class,
            "transfer_syntax": self.transfer_syntax,
            "received_transfer_syntax": self.received_transfer_syntax,
            "received_size": self.received_size,
            "received_sha256": self.received_sha256,
            "size": self.size,
            "sha256": self.sha256,
            "action": self.action,
        }
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class Manifest:
    version: int
    bundle_id: str
    study_key: str
    instances: tuple[ManifestEntry, ...]

    def to_json_bytes(self) -> bytes:
        doc = {
            "version": self.version,
            "bundle_id": self.bundle_id,
            "study_key": self.study_key,
            "instances": [e.to_json() for e in self.instances],
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _check_info(info: InstanceInfo) -> None:
    for name in ("sop_instance_uid", "sop_class", "transfer_syntax", "received_transfer_syntax"):
        if not isinstance(getattr(info, name), str):
            raise ValueError(f"{name} must be a string")
    if not _is_size(info.received_size):
        raise ValueError("received_size must be a non-negative integer")
    if not isinstance(info.received_sha256, str) or not _SHA256_RE.fullmatch(info.received_sha256):
        raise ValueError("received_sha256 must be 64 lowercase hex digits")
    if info.action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    if info.reason is not None and not isinstance(info.reason, str):
        raise ValueError("reason must be a string or None")


_INFO_FIELDS = frozenset(f.name for f in fields(InstanceInfo))


def _info_from_mapping(m: Mapping[str, Any]) -> InstanceInfo:
    unknown = set(m) - _INFO_FIELDS
    if unknown:
        raise ValueError(f"unknown instance field(s): {', '.join(sorted(unknown))}")
    try:
        return InstanceInfo(**m)
    except TypeError:
        missing = sorted(_INFO_FIELDS - set(m) - {"reason"})
        raise ValueError(f"missing instance field(s): {', '.join(missing)}") from None


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _parse_manifest(raw: bytes) -> Manifest:
    bad = IntegrityError("bundle manifest is not valid")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError:  # includes UnicodeDecodeError and json.JSONDecodeError
        raise bad from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise bad
    bundle_id, study_key, items = doc.get("bundle_id"), doc.get("study_key"), doc.get("instances")
    if not isinstance(bundle_id, str) or not isinstance(study_key, str) or not isinstance(items, list):
        raise bad
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad
        try:
            entry = ManifestEntry(
                index=item["index"],
                sop_instance_uid=item["sop_instance_uid"],
                sop_class=item["sop_class"],
                transfer_syntax=item["transfer_syntax"],
                received_transfer_syntax=item["received_transfer_syntax"],
                received_size=item["received_size"],
                received_sha256=item["received_sha256"],
                size=item["size"],
                sha256=item["sha256"],
                action=item["action"],
                reason=item.get("reason"),
            )
            _check_info(_info_of(entry))
        except (KeyError, ValueError):
            raise IntegrityError(f"bundle manifest entry {i} is not valid") from None
        if (
            not _is_size(entry.index)
            or entry.index != i
            or not _is_size(entry.size)
            or not isinstance(entry.sha256, str)
            or not (_SHA256_RE.fullmatch(entry.sha256))
        ):
            raise IntegrityError(f"bundle manifest entry {i} is not valid")
        entries.append(entry)
    return Manifest(MANIFEST_VERSION, bundle_id, study_key, tuple(entries))


def _info_of(e: ManifestEntry) -> InstanceInfo:
    return InstanceInfo(
        e.sop_instance_uid,
        e.sop_class,
        e.transfer_syntax,
        e.received_transfer_syntax,
        e.received_size,
        e.received_sha256,
        e.action,
        e.reason,
    )


# --- writer -------------------------------------------------------------------------


class _Feed:
    """A push-fed iterator for `crypto.stream_seal_chunks`, which pulls one chunk ahead.

    The writer only advances the sealer when the chunk it will pull is already queued,
    so the sealer never sees an empty feed before `closed` (which ends the stream).
    """

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.closed = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> bytes:
        if self.queue:
            return self.queue.popleft()
        if self.closed:
            raise StopIteration
        raise RuntimeError("bundle writer: sealer ran ahead of its input")


def _start(
    dst: BinaryIO, bundle_id: str, recipients: Sequence[PublicKey], chunk_size: int, created: int
) -> tuple[bytes, bytes]:
    """Draw a data key, wrap it, write the header. Returns (header bytes, payload key)."""
    _check_bundle_id(bundle_id)
    if not recipients:
        raise ValueError("a bundle needs at least one recipient")
    if not all(isinstance(r, X25519PublicKey | HybridPublicKey) for r in recipients):
        raise TypeError("recipients must be X25519PublicKey or HybridPublicKey objects")
    if not isinstance(chunk_size, int) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be between {MIN_CHUNK} and {MAX_CHUNK}")
    if not _is_size(created) or created >= 1 << 64:
        raise ValueError("created must be a non-negative unix time")
    suites = {_suite_of(r) for r in recipients}
    if len(suites) != 1:
        raise ValueError("all recipients of a bundle must use the same key type")
    (suite,) = suites
    unique: dict[bytes, PublicKey] = {}
    for r in recipients:
        unique.setdefault(recipient_key_id(r), r)  # a key listed twice gets one entry
    key_ids, recipients = list(unique), list(unique.values())
    if len(recipients) > MAX_RECIPIENTS:
        raise ValueError(f"a bundle can have at most {MAX_RECIPIENTS} recipients")
    data_key = os.urandom(crypto.KEY_LEN)
    info = wrap_info(bundle_id, suite)
    entries = [
        RecipientEntry(k, _wrap(suite, data_key, r, info)) for k, r in zip(key_ids, recipients, strict=True)
    ]
    header = _encode_header(bundle_id, created, chunk_size, suite, entries)
    dst.write(header)
    return header, payload_key(data_key)


class BundleWriter:
    """Write one bundle to `dst`, streaming.

    Usage: `begin_instance(info)`, any number of `write(data)`, `end_instance()`, repeated
    per instance; then `close()`, which writes the manifest and the final chunk and returns
    the manifest. The header is written by the constructor. `dst` receives bytes as they
    are sealed, so write to a temp file and keep it only after `close()` returned.
    """

    def __init__(
        self,
        dst: BinaryIO,
        bundle_id: str,
        recipients: Sequence[PublicKey],
        study_key: str,
        chunk_size: int = crypto.DEFAULT_CHUNK,
        *,
        created: int | None = None,
    ) -> None:
        if not isinstance(study_key, str):
            raise ValueError("study key must be a string")
        when = int(time.time()) if created is None else created
        self._header, key = _start(dst, bundle_id, recipients, chunk_size, when)
        self._dst = dst
        self._bundle_id = bundle_id
        self._study_key = study_key
        self._chunk = chunk_size
        self._buf = bytearray()
        self._feed = _Feed()
        self._sealer = crypto.stream_seal_chunks(key, self._header, self._feed)
        self._started = False
        self._entries: list[ManifestEntry] = []
        self._current: InstanceInfo | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._closed = False

    @property
    def header(self) -> bytes:
        return self._header

    def begin_instance(self, info: InstanceInfo | Mapping[str, Any]) -> None:
        """Start the next instance. `info` is an InstanceInfo or a mapping of its fields."""
        self._check_open()
        if self._current is not None:
            raise RuntimeError("begin_instance: the previous instance was not ended")
        if not isinstance(info, InstanceInfo):
            info = _info_from_mapping(info)
        _check_info(info)
        self._current = info
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to the current instance (one DATA record per non-empty call)."""
        self._check_open()
        if self._current is None:
            raise RuntimeError("write: no instance begun")
        n = len(memoryview(data).cast("B"))
        if n == 0:
            return
        self._emit(_REC.pack(REC_DATA, n))
        self._emit(data)
        self._hash.update(data)
        self._size += n

    def end_instance(self) -> ManifestEntry:
        self._check_open()
        info = self._current
        if info is None:
            raise RuntimeError("end_instance: no instance begun")
        self._emit(_REC.pack(REC_END, 0))
        entry = ManifestEntry(
            index=len(self._entries),
            sop_instance_uid=info.sop_instance_uid,
            sop_class=info.sop_class,
            transfer_syntax=info.transfer_syntax,
            received_transfer_syntax=info.received_transfer_syntax,
            received_size=info.received_size,
            received_sha256=info.received_sha256,
            size=self._size,
            sha256=self._hash.hexdigest(),
            action=info.action,
            reason=info.reason,
        )
        self._entries.append(entry)
        self._current = None
        return entry

    def close(self) -> Manifest:
        """Write the manifest record and the final chunk. Does not close `dst`."""
        self._check_open()
        if self._current is not None:
            raise RuntimeError("close: the current instance was not ended")
        self._closed = True
        manifest = Manifest(MANIFEST_VERSION, self._bundle_id, self._study_key, tuple(self._entries))
        raw = manifest.to_json_bytes()
        if len(raw) > MAX_MANIFEST:
            raise ValueError("manifest too large")
        self._emit(_REC.pack(REC_MANIFEST, len(raw)))
        self._emit(raw)
        self._feed.queue.append(bytes(self._buf))
        self._buf.clear()
        self._feed.closed = True
        for ct in self._sealer:
            self._dst.write(ct)
        return manifest

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("bundle writer is closed")

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        # A chunk is handed to the sealer only once a later byte exists, so the final
        # chunk is never empty and is at most chunk_size (the same split as read_chunks).
        mv = memoryview(data).cast("B")
        pos, n = 0, len(mv)
        while pos < n:
            if len(self._buf) == self._chunk:
                self._push(bytes(self._buf))
                self._buf.clear()
            take = min(self._chunk - len(self._buf), n - pos)
            self._buf += mv[pos : pos + take]
            pos += take

    def _push(self, chunk: bytes) -> None:
        self._feed.queue.append(chunk)
        # The first next() pulls two chunks (one of look-ahead), later ones one each.
        if len(self._feed.queue) >= (1 if self._started else 2):
            self._dst.write(next(self._sealer))
            self._started = True


# --- reader -------------------------------------------------------------------------


def _unwrap(header: Header, private_key: PrivateKey) -> bytes:
    kind = _suite_of(private_key)
    if kind != header.suite:
        raise IntegrityError(
            f"this is a {SUITE_NAMES[kind]} key but the bundle's keys are wrapped with {header.suite_name}"
        )
    kid = recipient_key_id(private_key.public_key())
    entry = next((r for r in header.recipients if r.key_id == kid), None)
    if entry is None:
        raise IntegrityError(
            f"no recipient entry for this key (key id {kid.hex()}): the bundle was sealed"
            " for other keys, or its header was altered"
        )
    info = wrap_info(header.bundle_id, header.suite, header.version)
    try:
        if isinstance(private_key, HybridPrivateKey):
            hk = hpke.MLKEM768X25519PrivateKey(private_key.mlkem, private_key.x25519)
            data_key = _hpke_suite(header.suite).decrypt(entry.wrapped_key, hk, info=info)
        else:
            data_key = _hpke_suite(header.suite).decrypt(entry.wrapped_key, private_key, info=info)
    except (InvalidTag, ValueError):
        data_key = b""
    if len(data_key) != crypto.KEY_LEN:
        raise IntegrityError("key does not unwrap the data key: the wrapped key or the header was altered")
    return data_key


def _open(src: BinaryIO, private_key: PrivateKey) -> tuple[Header, Iterator[bytes]]:
    header = read_header(src)
    key = payload_key(_unwrap(header, private_key))
    return header, crypto.stream_open(key, header.raw, src, header.chunk_size)


class _Scanner:
    """Parse verified body plaintext into instance events and check it against the manifest.

    `events` yields (_BEGIN, empty), (_DATA, piece) and (_END, empty); `index` is the
    current instance. When `events` is exhausted without error, the STREAM has verified
    to its last chunk and `manifest` is set and matches every instance's size and sha256.
    A DATA piece is a view into the current chunk: use it before the next event.
    """

    def __init__(self, header: Header) -> None:
        self.header = header
        self.index = -1
        self.manifest: Manifest | None = None
        self._sizes: list[int] = []
        self._digests: list[str] = []

    def events(self, plain: Iterator[bytes]) -> Iterator[tuple[int, memoryview]]:
        empty = memoryview(b"")
        rec = bytearray()
        rtype = 0
        remaining = 0
        in_instance = False
        manifest_buf = bytearray()
        hasher = hashlib.sha256()
        size = 0
        for chunk in plain:
            mv = memoryview(chunk)
            pos, n = 0, len(mv)
            while pos < n:
                if self.manifest is not None:
                    raise IntegrityError("bundle has data after its manifest")
                if remaining:
                    take = min(remaining, n - pos)
                    piece = mv[pos : pos + take]
                    pos += take
                    remaining -= take
                    if rtype == REC_DATA:
                        hasher.update(piece)
                        size += take
                        yield _DATA, piece
                    else:
                        manifest_buf += piece
                        if not remaining:
                            self._finish(bytes(manifest_buf))
                    continue
                take = min(_REC.size - len(rec), n - pos)
                rec += mv[pos : pos + take]
                pos += take
                if len(rec) < _REC.size:
                    continue
                rtype, length = _REC.unpack(rec)
                rec.clear()
                if rtype in (REC_DATA, REC_END):
                    if not in_instance:
                        in_instance = True
                        self.index += 1
                        hasher, size = hashlib.sha256(), 0
                        yield _BEGIN, empty
                    if rtype == REC_DATA:
                        remaining = length
                        continue
                    if length:
                        raise IntegrityError(f"bundle instance {self.index}: END record has a length")
                    in_instance = False
                    self._sizes.append(size)
                    self._digests.append(hasher.hexdigest())
                    yield _END, empty
                elif rtype == REC_MANIFEST:
                    if in_instance:
                        raise IntegrityError(f"bundle instance {self.index} is not ended before the manifest")
                    if length > MAX_MANIFEST:
                        raise IntegrityError("bundle manifest is too large")
                    remaining = length
                    if not remaining:
                        self._finish(b"")
                else:
                    raise IntegrityError(f"bundle has an unknown record type 0x{rtype:02x}")
        if self.manifest is None:
            if rec or remaining:
                raise IntegrityError("bundle body ends inside a record")
            raise IntegrityError("bundle has no manifest")

    def _finish(self, raw: bytes) -> None:
        m = _parse_manifest(raw)
        if m.bundle_id != self.header.bundle_id:
            raise IntegrityError("bundle manifest names a different bundle id than the header")
        if len(m.instances) != len(self._sizes):
            raise IntegrityError(
                f"bundle manifest lists {len(m.instances)} instances but the body holds {len(self._sizes)}"
            )
        for e, size, digest in zip(m.instances, self._sizes, self._digests, strict=True):
            if e.size != size or e.sha256 != digest:
                raise IntegrityError(f"bundle instance {e.index} does not match its manifest entry")
        self.manifest = m


def _scan_all(src: BinaryIO, private_key: PrivateKey) -> tuple[Header, Manifest]:
    header, plain = _open(src, private_key)
    scanner = _Scanner(header)
    for _ in scanner.events(plain):
        pass
    assert scanner.manifest is not None
    return header, scanner.manifest


def read_manifest(src: BinaryIO, private_key: PrivateKey) -> Manifest:
    """Verify the whole bundle (reading it to the end) and return its manifest. Writes nothing."""
    return _scan_all(src, private_key)[1]


def iter_instances(src: BinaryIO, private_key: PrivateKey) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Yield (manifest entry, transmitted bytes) per instance, in bundle order.

    For a forwarder that keeps plaintext off the disk: holds one instance in memory. `src`
    must be seekable: a first pass verifies the whole bundle before anything is yielded;
    the second pass decrypts again and checks each instance's size and sha256 against the
    verified manifest before yielding it (`VerifiedBundle`, each stream read whole).
    """
    for entry, stream in VerifiedBundle(src, private_key).streams():
        yield entry, stream.read()


class InstanceStream:
    """One instance of a verified bundle, read piece by piece (the bundle's second pass).

    `read(n)` returns up to `n` bytes (`n` < 0: the rest, returned only once verified). It
    returns b"" (the end) only after the bytes read matched the verified manifest entry's
    size and SHA-256, and raises `IntegrityError` instead when they did not (the file
    changed between the passes: truncated, replaced). The bytes before the end come from
    chunks that opened, but the *instance* is proven whole and unaltered only at the end:
    a consumer that streams them onward must hold back its last piece until `read`
    returned b"" (the dicom transport sends the final P-DATA fragment only then) and
    otherwise abandon what it passed on.
    """

    def __init__(self, entry: ManifestEntry, pieces: Iterator[memoryview]) -> None:
        self.entry = entry
        self.size = entry.size
        self._pieces = pieces
        self._cur = memoryview(b"")
        self._pos = 0
        self._seen = 0
        self._hasher = hashlib.sha256()
        self._eof = False
        self._failed: IntegrityError | None = None

    def _pull(self) -> bool:
        """Load the next piece; False at the (verified) end. Once it raised, it raises
        again on every call: a failed stream never reports a clean end."""
        if self._failed is not None:
            raise IntegrityError(str(self._failed))
        if self._eof:
            return False
        try:
            return self._next_piece()
        except IntegrityError as e:
            self._failed = e
            self._cur, self._pos = memoryview(b""), 0
            raise

    def _next_piece(self) -> bool:
        for piece in self._pieces:
            if not piece:
                continue
            self._seen += len(piece)
            if self._seen > self.entry.size:
                raise IntegrityError("bundle changed while it was being read")
            self._hasher.update(piece)
            self._cur, self._pos = piece, 0
            return True
        if self._seen != self.entry.size or self._hasher.hexdigest() != self.entry.sha256:
            raise IntegrityError("bundle changed while it was being read")
        self._eof = True
        self._cur, self._pos = memoryview(b""), 0
        return False

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = bytearray(self._cur[self._pos :])
            self._pos = len(self._cur)
            while self._pull():
                out += self._cur
                self._pos = len(self._cur)
            return bytes(out)
        if n == 0:
            return b""
        if self._pos >= len(self._cur) and not self._pull():
            return b""
        piece = self._cur[self._pos : self._pos + n]
        self._pos += len(piece)
        return bytes(piece)

    def drain(self) -> None:
        """Read (and verify) whatever the consumer left."""
        self._pos = len(self._cur)
        while self._pull():
            self._pos = len(self._cur)


class VerifiedBundle:
    """A bundle verified by a full first pass, whose instances are then read again.

    `VerifiedBundle(src, key)` runs every check of `read_manifest` (and raises
    `IntegrityError` like it); `manifest` is then the verified manifest. `streams()`
    decrypts the bundle a second time and yields `(entry, InstanceStream)` per instance
    in order, for a forwarder that must neither put plaintext on disk nor hold a large
    instance in memory: memory stays at a few bundle chunks. A stream must be used
    before the next is requested (unread bytes are then read and verified). `src` must be
    seekable and stay open while the streams are read.
    """

    def __init__(self, src: BinaryIO, private_key: PrivateKey) -> None:
        self._src = src
        self._key = private_key
        self._start = src.tell()
        self._header, self.manifest = _scan_all(src, private_key)

    def streams(self) -> Iterator[tuple[ManifestEntry, InstanceStream]]:
        changed = "bundle changed while it was being read"
        self._src.seek(self._start)
        header, plain = _open(self._src, self._key)
        if header.raw != self._header.raw:
            raise IntegrityError(changed)
        scanner = _Scanner(header)
        events = scanner.events(plain)

        def pieces() -> Iterator[memoryview]:
            for kind, piece in events:
                if kind == _DATA:
                    yield piece
                elif kind == _END:
                    return
                else:
                    raise IntegrityError(changed)

        instances = self.manifest.instances
        for kind, _ in events:
            if kind != _BEGIN or scanner.index >= len(instances):
                raise IntegrityError(changed)
            entry = instances[scanner.index]
            stream = InstanceStream(entry, pieces())
            yield entry, stream
            stream.drain()
        if scanner.index + 1 != len(instances):
            raise IntegrityError(changed)


def extract(src: BinaryIO, private_key: PrivateKey, out_dir: Path) -> Manifest:
    """Verify the bundle and write instance i to `out_dir/<i>.dcm` (mode 0600).

    Instances go to `out_dir/.tmp-*` while the bundle is read and are renamed only after
    the whole bundle has verified (every chunk, the end of the stream, the manifest and
    each instance's size and sha256); on any failure the temps are removed and nothing is
    left. `out_dir` is created if missing; an existing `<i>.dcm` is never overwritten
    (`UsageError`).
    """
    header, plain = _open(src, private_key)
    durable.make_dirs(out_dir)
    temps: list[Path] = []
    done: list[Path] = []
    f: BinaryIO | None = None
    try:
        scanner = _Scanner(header)
        for kind, piece in scanner.events(plain):
            if kind == _BEGIN:
                tmp = out_dir / f"{durable.TEMP_PREFIX}{secrets.token_hex(8)}"
                f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                temps.append(tmp)
            elif kind == _DATA:
                assert f is not None
                f.write(piece)
            else:
                assert f is not None
                durable.fsync_file(f)
                f.close()
                f = None
        manifest = scanner.manifest
        assert manifest is not None
        targets = [out_dir / f"{i}.dcm" for i in range(len(temps))]
        for t in targets:
            if t.exists() or t.is_symlink():
                raise UsageError(f"{t} already exists; extract into an empty directory")
        for tmp, t in zip(temps, targets, strict=True):
            os.rename(tmp, t)
            done.append(t)
        durable.fsync_dir(out_dir)
        return manifest
    except BaseException:
        if f is not None:
            f.close()
        for p in temps + done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
