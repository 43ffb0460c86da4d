"""The encrypted bundle format: one file carrying the instances of (part of) one study.

This module is the format's public face: it re-exports bundle/wire.py (constants, keys,
header, manifest), bundle/writer.py (BundleWriter) and bundle/reader.py (read_header,
read_manifest, iter_instances, InstanceStream, VerifiedBundle, extract).

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

from appliance.bundle.reader import (
    InstanceStream,
    VerifiedBundle,
    _open,
    _unwrap,
    extract,
    iter_instances,
    read_manifest,
)
from appliance.bundle.wire import (
    _PAYLOAD_INFO,
    ACTIONS,
    FORMAT_VERSION,
    MAGIC,
    MANIFEST_VERSION,
    MAX_BUNDLE_ID,
    MAX_CHUNK,
    MAX_HEADER,
    MAX_MANIFEST,
    MAX_RECIPIENTS,
    MIN_CHUNK,
    REC_DATA,
    REC_END,
    REC_MANIFEST,
    SUITE_MLKEM768_X25519,
    SUITE_NAMES,
    SUITE_X25519,
    Header,
    HybridPrivateKey,
    HybridPublicKey,
    InstanceInfo,
    Manifest,
    ManifestEntry,
    PrivateKey,
    PublicKey,
    RecipientEntry,
    _encode_header,
    payload_key,
    read_header,
    recipient_key_id,
    wrap_info,
)
from appliance.bundle.writer import (
    BundleWriter,
    _start,
)

__all__ = [
    "ACTIONS",
    "BundleWriter",
    "FORMAT_VERSION",
    "Header",
    "HybridPrivateKey",
    "HybridPublicKey",
    "InstanceInfo",
    "InstanceStream",
    "MAGIC",
    "MANIFEST_VERSION",
    "MAX_BUNDLE_ID",
    "MAX_CHUNK",
    "MAX_HEADER",
    "MAX_MANIFEST",
    "MAX_RECIPIENTS",
    "MIN_CHUNK",
    "Manifest",
    "ManifestEntry",
    "PrivateKey",
    "PublicKey",
    "REC_DATA",
    "REC_END",
    "REC_MANIFEST",
    "RecipientEntry",
    "SUITE_MLKEM768_X25519",
    "SUITE_NAMES",
    "SUITE_X25519",
    "VerifiedBundle",
    "_PAYLOAD_INFO",
    "_encode_header",
    "_open",
    "_start",
    "_unwrap",
    "extract",
    "iter_instances",
    "payload_key",
    "read_header",
    "read_manifest",
    "recipient_key_id",
    "wrap_info",
]
