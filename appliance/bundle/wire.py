"""The bundle format's wire constants, its key wrapping (HPKE), its cleartext header and
its manifest: what the writer (bundle/writer.py) and the reader (bundle/reader.py) share.
The format is described in bundle/format.py, which re-exports the public names, and in
docs/bundle-format.md."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, BinaryIO, Final

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from appliance.core import crypto
from appliance.core.errors import IntegrityError

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
