"""Receipts: what the reading center says it did with one bundle (docs/ingest.md).

Shared by both sides: the center builds, signs and writes a receipt (`build`, `sign`,
`write`); the appliance reads one back (`parse`, which checks the signature against the
center's Ed25519 public key(s) it trusts) to mark a bundle "stored at center".

On disk: `<drop_dir>/receipts/<bundle id>.receipt.json`, UTF-8 JSON, written atomically
(`durable.atomic_write`: temp file, fsync, rename, fsync of the folder), mode 0644 so
that the SFTP account the appliance logs in with can read it. A later receipt for the
same bundle id (a duplicate) replaces the earlier one.

What a receipt holds: the bundle id (the appliance's opaque id), the SHA-256 of the bundle
file as received, the center's name, the time, the verdict (stored | partial | failed |
duplicate) and one outcome per instance, named by its index in the bundle manifest
(stored, or failed with a status class and a reason). Never a UID, name or other patient
data: the receipt lies beside the encrypted bundles on a server other people log into.

Signature: Ed25519 over the canonical encoding of the receipt without its `signature`
member (`canonical`: JSON, keys sorted, no whitespace, ASCII only), so the bytes signed
do not depend on how the file was pretty-printed. `signature.key_id` is the first 8 bytes
of SHA-256 of the raw public key, hex; it only picks the key, the trust is in the key.

How it fails: `parse` raises `ReceiptError` (an IntegrityError) naming what is wrong;
nothing in a message comes from the receipt's text fields. Pure except `write` and the
key file helpers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.core import crypto, durable
from appliance.core.errors import IntegrityError

FORMAT: Final = "appliance-ingest-receipt"
VERSION: Final = 1
VERDICTS: Final = ("stored", "partial", "failed", "duplicate")
OUTCOMES: Final = ("stored", "failed")
# Status classes of a failed instance (forward's contract): refused for good by the PACS,
# or not attempted because the bundle itself failed.
CLASSES: Final = ("permanent", "not-sent")
MAX_RECEIPT: Final = 16 << 20  # bytes; a bundle of 100 000 instances fits
MAX_REASON: Final = 500
SUFFIX: Final = ".receipt.json"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


class ReceiptError(IntegrityError):
    """A receipt is malformed or its signature does not verify."""


@dataclass(frozen=True)
class InstanceOutcome:
    index: int
    outcome: str  # stored | failed
    status_class: str | None = None  # failed: permanent | not-sent
    reason: str | None = None  # failed: why, naming instances by index only

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "outcome": self.outcome}
        if self.status_class is not None:
            d["class"] = self.status_class
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class Receipt:
    bundle_id: str
    bundle_sha256: str
    center: str
    time: str  # ISO 8601 UTC, "...Z"
    verdict: str
    instances: tuple[InstanceOutcome, ...]
    reason: str | None = None  # failed / partial: the bundle-level reason
    key_id: str | None = None  # of the key that signed it (parsed receipts)

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "bundle_id": self.bundle_id,
            "bundle_sha256": self.bundle_sha256, "center": self.center, "time": self.time,
            "verdict": self.verdict, "instances": [i.to_json() for i in self.instances],
        }
        if self.reason is not None:
            d["reason"] = self.reason
        return d

    @property
    def stored(self) -> tuple[int, ...]:
        return tuple(i.index for i in self.instances if i.outcome == "stored")


def valid_bundle_id(name: str) -> bool:
    """Bundle ids the center takes from a file name: safe as a file name, opaque."""
    return bool(_ID_RE.fullmatch(name))


def verdict_of(outcomes: Sequence[InstanceOutcome]) -> str:
    """stored (all), partial (some), failed (none, or no instances)."""
    stored = sum(o.outcome == "stored" for o in outcomes)
    if outcomes and stored == len(outcomes):
        return "stored"
    return "partial" if stored else "failed"


def short_reason(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key.public_bytes_raw()).digest()[:8].hex()


def sign(receipt: Receipt, key: Ed25519PrivateKey) -> bytes:
    """The receipt file's bytes: its body and an Ed25519 signature over `canonical(body)`."""
    body = receipt.body()
    sig = key.sign(canonical(body))
    doc = {**body, "signature": {"alg": "Ed25519", "key_id": key_id(key.public_key()),
                                 "value": base64.b64encode(sig).decode("ascii")}}
    return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def path_for(drop_dir: Path, bundle_id: str) -> Path:
    return drop_dir / "receipts" / f"{bundle_id}{SUFFIX}"


def write(drop_dir: Path, bundle_id: str, data: bytes) -> Path:
    """Write a signed receipt atomically and durably (tmp, fsync, rename, fsync dir)."""
    target = path_for(drop_dir, bundle_id)
    durable.make_dirs(target.parent, mode=0o755)
    # Readable by the appliances' SFTP accounts whatever the process umask (0077 here).
    with contextlib.suppress(PermissionError):  # a folder the SFTP admin made and owns
        os.chmod(target.parent, 0o755)  # noqa: S103 - receipts are for the SFTP accounts; no PHI
    with durable.atomic_file(target, mode=0o644) as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(data)
    return target


# --- reading (the appliance side) -------------------------------------------------------------


def parse(data: bytes, trusted: Iterable[Ed25519PublicKey]) -> Receipt:
    """Check and return a receipt: size, JSON, every field, and an Ed25519 signature by
    one of the `trusted` center keys. Raises ReceiptError otherwise.

    The site side calls this with the bytes it fetched from `<drop>/receipts/<id>.receipt.json`
    and the center public key(s) from its config, then checks that `bundle_id` and
    `bundle_sha256` are those of the bundle it sent before trusting the verdict.
    """
    if len(data) > MAX_RECEIPT:
        raise ReceiptError(f"receipt is larger than {MAX_RECEIPT} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ReceiptError("receipt is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ReceiptError("receipt is not a JSON object")
    sig = doc.pop("signature", None)
    body = doc
    _check_signature(body, sig, trusted)
    return _from_body(body, str(sig["key_id"]) if isinstance(sig, dict) else None)


def _check_signature(body: dict[str, Any], sig: Any, trusted: Iterable[Ed25519PublicKey]) -> None:
    if not isinstance(sig, dict) or sig.get("alg") != "Ed25519":
        raise ReceiptError("receipt is not signed (Ed25519)")
    kid, value = sig.get("key_id"), sig.get("value")
    if not isinstance(kid, str) or not isinstance(value, str):
        raise ReceiptError("receipt signature is malformed")
    keys = [k for k in trusted if key_id(k) == kid]
    if not keys:
        raise ReceiptError("receipt is signed by a key that is not trusted")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ReceiptError("receipt signature is malformed") from None
    try:
        keys[0].verify(raw, canonical(body))
    except InvalidSignature:
        raise ReceiptError("receipt signature does not verify") from None


def _from_body(b: dict[str, Any], kid: str | None) -> Receipt:
    def need(name: str, ok: Any) -> Any:
        v = b.get(name)
        if not ok(v):
            raise ReceiptError(f"receipt field {name} is missing or invalid")
        return v

    if b.get("format") != FORMAT or b.get("version") != VERSION:
        raise ReceiptError("not a receipt of a version this appliance reads")
    allowed = {"format", "version", "bundle_id", "bundle_sha256", "center", "time", "verdict",
               "instances", "reason"}
    if set(b) - allowed:
        raise ReceiptError("receipt has unknown fields")
    reason = b.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ReceiptError("receipt field reason is invalid")
    return Receipt(
        bundle_id=need("bundle_id", lambda v: isinstance(v, str) and valid_bundle_id(v)),
        bundle_sha256=need("bundle_sha256", lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v)),
        center=need("center", lambda v: isinstance(v, str) and 0 < len(v) <= 63),
        time=need("time", lambda v: isinstance(v, str) and _TIME_RE.fullmatch(v)),
        verdict=need("verdict", lambda v: v in VERDICTS),
        instances=tuple(_outcome(i) for i in need("instances", lambda v: isinstance(v, list))),
        reason=reason, key_id=kid)


def _outcome(v: Any) -> InstanceOutcome:
    if not isinstance(v, dict) or set(v) - {"index", "outcome", "class", "reason"}:
        raise ReceiptError("receipt instance entry is invalid")
    index, outcome = v.get("index"), v.get("outcome")
    cls, reason = v.get("class"), v.get("reason")
    if (isinstance(index, bool) or not isinstance(index, int) or index < 0
            or outcome not in OUTCOMES
            or (outcome == "failed") != (cls in CLASSES)
            or (outcome == "stored" and cls is not None)
            or (reason is not None and not isinstance(reason, str))):
        raise ReceiptError("receipt instance entry is invalid")
    return InstanceOutcome(index, outcome, cls, reason)


# --- the center's signing key ----------------------------------------------------------------


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key: Ed25519PrivateKey = crypto.load_private_key_of(path, Ed25519PrivateKey, "Ed25519")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    key: Ed25519PublicKey = crypto.load_public_key_of(path, Ed25519PublicKey, "Ed25519")
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
