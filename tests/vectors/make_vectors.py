"""Generate the bundle format test vectors in this directory (see docs/bundle-format.md).

    .venv/bin/python tests/vectors/make_vectors.py            # stream vector only
    .venv/bin/python tests/vectors/make_vectors.py --bundle   # also a NEW bundle vector

- `stream-v1.json` is deterministic (fixed data key, header and plaintext): running this
  again rewrites it byte for byte the same.
- `bundle-v1.bin` + `bundle-v1.json` + `bundle-v1-recipient.pem` are a complete bundle and
  the private key that opens it. The key is fixed, but HPKE draws a fresh ephemeral key on
  every run, so `--bundle` produces a different (equally valid) bundle; it is written only
  when asked, and the committed one is what other implementations check against.

All content is synthetic: no patient data, made-up UIDs under 1.2.3.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from appliance.bundle import format as bundle  # noqa: E402
from appliance.core import crypto  # noqa: E402

CHUNK = 64
CREATED = 1700000000


def _records(instances: list[list[bytes]], manifest: bytes) -> bytes:
    out = bytearray()
    for pieces in instances:
        for p in pieces:
            out += bytes([bundle.REC_DATA]) + len(p).to_bytes(8, "big") + p
        out += bytes([bundle.REC_END]) + bytes(8)
    out += bytes([bundle.REC_MANIFEST]) + len(manifest).to_bytes(8, "big") + manifest
    return bytes(out)


def _chunks(key: bytes, aad: bytes, plaintext: bytes, chunk: int) -> list[dict[str, object]]:
    pieces = list(crypto.read_chunks(io.BytesIO(plaintext), chunk))
    sealed = list(crypto.stream_seal_chunks(key, aad, iter(pieces)))
    return [
        {
            "index": i,
            "last": i == len(pieces) - 1,
            "nonce": crypto._nonce(i, i == len(pieces) - 1).hex(),
            "plaintext": p.hex(),
            "ciphertext": c.hex(),
        }
        for i, (p, c) in enumerate(zip(pieces, sealed, strict=True))
    ]


def stream_vector() -> dict[str, object]:
    data_key = bytes(range(32))
    bundle_id = "vector-stream-0001"
    # A fixed header: one recipient entry whose key id and wrapped key are placeholders
    # (the STREAM layer only uses the header as associated data).
    header = bundle._encode_header(
        bundle_id, CREATED, CHUNK, bundle.SUITE_X25519, [bundle.RecipientEntry(bytes(8), bytes(80))]
    )
    pieces = [b"A" * 70, b"B" * 10]
    data = b"".join(pieces)
    entry = bundle.ManifestEntry(
        index=0,
        sop_instance_uid="1.2.3.9",
        sop_class="1.2.840.10008.5.1.4.1.1.7",
        transfer_syntax="1.2.840.10008.1.2.1",
        received_transfer_syntax="1.2.840.10008.1.2.1",
        received_size=len(data),
        received_sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        action="passthrough",
    )
    manifest = bundle.Manifest(1, bundle_id, "s", (entry,)).to_json_bytes()
    plaintext = _records([pieces], manifest)
    key = bundle.payload_key(data_key)
    ct = io.BytesIO()
    crypto.stream_seal(key, header, io.BytesIO(plaintext), ct, CHUNK)
    return {
        "description": "STREAM layer of a bundle body: AES-256-GCM, nonce 0^7||be32(i)||last, AAD = header",
        "data_key": data_key.hex(),
        "payload_key_info": bundle._PAYLOAD_INFO.decode(),
        "payload_key": key.hex(),
        "chunk_size": CHUNK,
        "header": header.hex(),
        "plaintext": plaintext.hex(),
        "ciphertext": ct.getvalue().hex(),
        "chunks": _chunks(key, header, plaintext, CHUNK),
    }


def recipient_key() -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(b"APBUNDL1 test vector recipient").digest())


INSTANCES = [
    # (info, pieces written with separate write() calls)
    (
        bundle.InstanceInfo(
            sop_instance_uid="1.2.3.4.5.6.7.1",
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.4.90",
            received_transfer_syntax="1.2.840.10008.1.2.1",
            received_size=300,
            received_sha256=hashlib.sha256(b"received 0").hexdigest(),
            action="compressed",
        ),
        [b"synthetic instance 0, piece A; " * 2, b"piece B;", b"synthetic instance 0, piece C." * 3],
    ),
    (
        bundle.InstanceInfo(
            sop_instance_uid="1.2.3.4.5.6.7.2",
            sop_class="1.2.840.10008.5.1.4.1.1.7",
            transfer_syntax="1.2.840.10008.1.2.4.50",
            received_transfer_syntax="1.2.840.10008.1.2.4.50",
            received_size=41,
            received_sha256=hashlib.sha256(b"synthetic instance 1, already lossy JPEG").hexdigest(),
            action="passthrough",
            reason="already compressed",
        ),
        [b"synthetic instance 1, already lossy JPEG"],
    ),
]


def bundle_vector() -> tuple[bytes, bytes, dict[str, object]]:
    key = recipient_key()
    out = io.BytesIO()
    w = bundle.BundleWriter(
        out, "vector-bundle-0001", [key.public_key()], "study-key-0001", chunk_size=CHUNK, created=CREATED
    )
    for info, pieces in INSTANCES:
        w.begin_instance(info)
        for p in pieces:
            w.write(p)
        w.end_instance()
    manifest = w.close()
    blob = out.getvalue()
    header = bundle.read_header(io.BytesIO(blob))
    data_key = bundle._unwrap(header, key)
    body_plain = _records([pieces for _, pieces in INSTANCES], manifest.to_json_bytes())
    pub_raw = key.public_key().public_bytes_raw()
    doc: dict[str, object] = {
        "description": "a complete bundle (bundle-v1.bin) and the X25519 key that opens it",
        "file_sha256": hashlib.sha256(blob).hexdigest(),
        "recipient_private_key_raw": key.private_bytes_raw().hex(),
        "recipient_public_key_raw": pub_raw.hex(),
        "recipient_key_id": hashlib.sha256(pub_raw).digest()[:8].hex(),
        "bundle_id": header.bundle_id,
        "created": header.created,
        "chunk_size": header.chunk_size,
        "suite": header.suite,
        "header": header.raw.hex(),
        "hpke_info": bundle.wrap_info(header.bundle_id, header.suite).hex(),
        "wrapped_key": header.recipients[0].wrapped_key.hex(),
        "data_key": data_key.hex(),
        "payload_key": bundle.payload_key(data_key).hex(),
        "body_plaintext": body_plain.hex(),
        "manifest": json.loads(manifest.to_json_bytes()),
        "instances": [b"".join(pieces).hex() for _, pieces in INSTANCES],
    }
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return blob, pem, doc


def _write_json(path: Path, doc: dict[str, object]) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="store_true", help="also write a new bundle vector")
    args = ap.parse_args()
    _write_json(HERE / "stream-v1.json", stream_vector())
    if args.bundle:
        blob, pem, doc = bundle_vector()
        (HERE / "bundle-v1.bin").write_bytes(blob)
        (HERE / "bundle-v1-recipient.pem").write_bytes(pem)
        _write_json(HERE / "bundle-v1.json", doc)


if __name__ == "__main__":
    main()
