"""The box's identity as a technician reads it: its name, software version and slot, the
fingerprints of its public keys, and the ops-center CSR that `appliance keys init` made.

Shown by `appliance keys show`, on the console (`/etc/issue.d`, in the image), in
`appliance status` and in the `appliance-result.txt` that `appliance config import` writes
back to the APPLCONFIG stick. Only public material is read (the public key file, the
CSR): nothing here needs or prints a secret. A key or CSR that is missing or unreadable
is a line saying so, never an error: the identity is shown to find out what is wrong.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import __version__
from appliance.core import config, crypto
from appliance.core.errors import KeyFileError
from appliance.ops import cli as ops_cli

CMDLINE = Path("/proc/cmdline")
CSR_MAX = 16 << 10  # a P-256 CSR in PEM is ~500 bytes


def fingerprint(spki_der: bytes) -> str:
    """SHA-256 of a public key (DER SubjectPublicKeyInfo), in groups of 4 hex digits
    (as `openssl pkey -pubin -outform DER | sha256sum` prints it, easier to read aloud)."""
    h = hashlib.sha256(spki_der).hexdigest()
    return " ".join(h[i:i + 4] for i in range(0, len(h), 4))


def slot() -> str:
    """The root slot this boot runs from: `rauc.slot=` on the kernel command line."""
    try:
        words = CMDLINE.read_text()[:4096].split()
    except OSError:
        return "unknown"
    for w in words:
        if w.startswith("rauc.slot="):
            return w.removeprefix("rauc.slot=")[:16] or "unknown"
    return "unknown (no rauc.slot= on the kernel command line)"


def csr_pem(cfg: config.Config) -> bytes | None:
    """The ops-center CSR `keys init` made for this config, or None (no [operations], or
    not made yet)."""
    if cfg.operations is None:
        return None
    try:
        data = ops_cli.csr_path(cfg.operations).read_bytes()[:CSR_MAX]
        x509.load_pem_x509_csr(data)
    except (OSError, ValueError):
        return None
    return data


def lines(cfg: config.Config) -> list[str]:
    """`name: value` lines, one per fact."""
    out = [f"box name: {cfg.appliance.name}", f"software version: {__version__}",
           f"slot: {slot()}"]
    pub = cfg.encryption.appliance_public_key
    try:
        key = crypto.load_public_key(pub)
        der = key.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        out.append(f"appliance key (X25519) sha256: {fingerprint(der)}")
    except KeyFileError:
        out.append(f"appliance key: none yet ({pub}; 'appliance keys init' makes it)")
    if cfg.operations is None:
        out.append("ops link: not configured (no [operations])")
        return out
    csr = csr_pem(cfg)
    if csr is None:
        out.append("ops link key: no CSR yet ('appliance keys init' makes it)")
        return out
    req = x509.load_pem_x509_csr(csr)
    der = req.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    out.append(f"ops link key (P-256) sha256: {fingerprint(der)}")
    signed = "installed" if cfg.operations.cert.is_file() else "not installed yet"
    out.append(f"ops link certificate: {signed} (the CSR: {ops_cli.csr_path(cfg.operations)})")
    return out
