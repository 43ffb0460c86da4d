"""Certificates of the ops link: the box's key and CSR, the fleet CA, and their checks.

Enrollment never moves a private key: `appliance keys init` makes the box's MQTT key
(EC P-256, 0600) and a CSR whose CN is `[appliance] name`; the operations center signs
the CSR with its fleet CA (`appliance fleet ca init DIR`, `appliance fleet sign BOX.csr`)
and sends back the certificate. The broker (config/ops-center/mosquitto.conf) takes the
CN as the MQTT user name and client id, so the CN is the box's identity: the same name
rule as the config (`OPS_NAME_RE`) is enforced at signing, and `ops-center` and every
`ops-center-*` name are reserved for the operations center's own client certificates.

The operations center has one client certificate per kind of client (CENTER_CNS), so
that they never share a client id (the broker would disconnect the older session):
`ops-center` signs nothing but may write commands and desired config (`fleet send`,
`fleet config push`); `ops-center-serve` (`fleet serve`) and `ops-center-status`
(`fleet status`) may only read the boxes' `online`, `state` and `events`
(config/ops-center/acl, rabbitmq/fleet-definitions). `fleet ca init` issues all of
them; `fleet ca center` issues those missing in a CA made before.

The CA folder keeps a roster of the boxes it signed (ROSTER, one line per signature:
name, serial, not-after; like OpenSSL's index.txt), written by `fleet sign`: the fleet
view subscribes to each known box's topics by name, because a broker may send retained
messages only to a subscription of the topic itself (RabbitMQ 3.x, rabbitmq-server
issue 8824). `fleet crl --revoke` takes a revoked certificate's line out of the roster: it
becomes a comment `# revoked NAME SERIAL NOT-AFTER` (REVOKED_PREFIX; a reader of the older
format skips it like any comment), so a box whose every certificate is revoked leaves the
roster, and the fleet view knows to leave it out (revoked_boxes) even though the broker
still holds its retained messages.

Everything here uses the `cryptography` library (X.509 building and verification); it
fails with KeyFileError / ConfigError naming the file, never with a library's text.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.core import crypto, durable
from appliance.core.config import OPS_NAME_RE
from appliance.core.errors import KeyFileError, UsageError

OPS_CENTER_CN = "ops-center"  # reads every box, writes commands and desired config
SERVE_CN = "ops-center-serve"  # `fleet serve`: reads online, state, events
STATUS_CN = "ops-center-status"  # `fleet status`: reads online, state, events
CENTER_CNS = (OPS_CENTER_CN, SERVE_CN, STATUS_CN)
CENTER_FILES = tuple(f"{cn}.{ext}" for cn in CENTER_CNS for ext in ("key", "pem"))
CA_FILES = ("ca.key", "ca.pem", "crl.pem", "broker.key", "broker.pem", *CENTER_FILES)
ROSTER = "roster"  # the boxes `fleet sign` signed, in the CA folder
ROSTER_HEADER = b"# boxes signed by this fleet CA (appliance fleet sign): name serial not-after\n"
REVOKED_PREFIX = "# revoked "  # a roster line whose certificate `fleet crl --revoke` revoked
CA_DAYS = 3650
BOX_DAYS = 825
CRL_DAYS = 365
EXPIRY_WARN_DAYS = 30


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new P-256 key written exclusively (0600); never overwrites a file."""
    key = ec.generate_private_key(ec.SECP256R1())
    crypto.create_private_file(path, _key_pem(key))
    return key


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key: ec.EllipticCurvePrivateKey = crypto.load_private_key_of(path, ec.EllipticCurvePrivateKey, "EC")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"certificate {path} does not exist") from None
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM certificate") from None


def common_name(subject: x509.Name) -> str | None:
    attrs = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


def box_key_and_csr(name: str, key_path: Path, csr_path: Path) -> list[str]:
    """`keys init` for the ops link: the key if missing, the CSR if missing; lines to print."""
    out = []
    if key_path.exists():
        key = load_key(key_path)
        out.append(f"mqtt key: {key_path} exists, kept")
    else:
        key = new_key(key_path)
        out.append(f"mqtt key: {key_path} created")
    if csr_path.exists():
        out.append(f"mqtt csr: {csr_path} exists, kept")
        return out
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    durable.make_dirs(csr_path.parent)
    durable.atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    out.append(f"mqtt csr: {csr_path} created (CN={name}); have the operations center sign it"
               " with 'appliance fleet sign', then install the certificate")
    return out


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate | None, cn: str,
           public_key: ec.EllipticCurvePublicKey, days: int, *, ca: bool = False,
           server_names: tuple[str, ...] = ()) -> x509.Certificate:
    now = _now()
    issuer = ca_cert.subject if ca_cert else _name(cn)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer)
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                            critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                            critical=True)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if ca_cert is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
    if server_names:
        sans: list[x509.GeneralName] = []
        for h in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class FleetCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    roster: Path | None = None  # where `sign_csr` enrols a box (ROSTER in the CA folder)


def ca_init(directory: Path, broker_hosts: tuple[str, ...]) -> list[str]:
    """A new fleet CA in `directory` (CA_FILES): CA key and certificate, an empty CRL, the
    broker's server certificate for `broker_hosts`, and the operations center's client
    certificate. Refuses a directory that already holds any of them."""
    there = [f for f in CA_FILES if (directory / f).exists()]
    if there:
        raise UsageError(f"{directory} already holds a fleet CA ({', '.join(there)}); never overwritten")
    durable.make_dirs(directory)
    ca_key = new_key(directory / "ca.key")
    ca_cert = _issue(ca_key, None, "appliance fleet CA", ca_key.public_key(), CA_DAYS, ca=True)
    durable.atomic_write(directory / "ca.pem", _cert_pem(ca_cert), mode=0o644)
    ca = FleetCA(ca_key, ca_cert, directory / ROSTER)
    write_crl(ca, directory / "crl.pem")
    _issue_into(ca, directory, "broker", broker_hosts)
    for cn in CENTER_CNS:
        _issue_into(ca, directory, cn)
    return [f"fleet CA: {directory}/ca.pem (key ca.key), CRL crl.pem, broker certificate broker.pem"
            f" for {', '.join(broker_hosts)}, operations-center client certificates"
            f" {', '.join(f'{cn}.pem' for cn in CENTER_CNS)}"]


def _issue_into(ca: FleetCA, directory: Path, cn: str, hosts: tuple[str, ...] = ()) -> None:
    k = new_key(directory / f"{cn}.key")
    cert = _issue(ca.key, ca.cert, cn, k.public_key(), BOX_DAYS, server_names=hosts)
    durable.atomic_write(directory / f"{cn}.pem", _cert_pem(cert), mode=0o644)


def center_init(directory: Path) -> list[str]:
    """`fleet ca center`: the operations center's client certificates (CENTER_CNS) that
    the CA in `directory` does not hold yet (a CA made before they existed); never
    overwrites one. The broker's ACL must name them (config/ops-center/acl)."""
    ca = load_ca(directory)
    out = []
    for cn in CENTER_CNS:
        if (directory / f"{cn}.key").exists() or (directory / f"{cn}.pem").exists():
            out.append(f"{cn}: {directory}/{cn}.pem exists, kept")
            continue
        _issue_into(ca, directory, cn)
        out.append(f"{cn}: {directory}/{cn}.pem created")
    return out


def load_ca(directory: Path) -> FleetCA:
    return FleetCA(load_key(directory / "ca.key"), load_cert(directory / "ca.pem"), directory / ROSTER)


def reserved(cn: str) -> bool:
    """A name only the operations center's own certificates carry."""
    return cn == OPS_CENTER_CN or cn.startswith(OPS_CENTER_CN + "-")


def _box_name(line: str) -> str | None:
    name = line.split(" ", 1)[0]
    return name if OPS_NAME_RE.match(name) and not reserved(name) else None


def _roster_text(directory: Path) -> str:
    try:
        return (directory / ROSTER).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def read_roster(directory: Path) -> list[str]:
    """The box names in the CA folder's roster, each once, in the order first signed;
    a line that is not `name ...` with a box name is skipped (the file is the center's
    own, but a hand edit must not put a wildcard into a subscription), and so is a
    revoked line (REVOKED_PREFIX)."""
    names: dict[str, None] = {}
    for line in _roster_text(directory).splitlines():
        if (name := _box_name(line)) is not None:
            names.setdefault(name)
    return list(names)


def revoked_boxes(directory: Path) -> list[str]:
    """The boxes that left the roster: every certificate of theirs in it was revoked
    (REVOKED_PREFIX lines) and none is left; sorted."""
    text = _roster_text(directory)
    revoked = {n for line in text.splitlines() if line.startswith(REVOKED_PREFIX)
               and (n := _box_name(line[len(REVOKED_PREFIX):])) is not None}
    return sorted(revoked - set(read_roster(directory)))


def _serial(line: str) -> int | None:
    """The serial of a roster line `name serial ...` (hex); None for a line without one
    (a name alone, added by hand for a box signed before the roster existed)."""
    parts = line.split(" ")
    try:
        return int(parts[1], 16) if len(parts) > 1 else None
    except ValueError:
        return None


def prune_roster(directory: Path, revoked: set[int]) -> list[str]:
    """Turn each roster line whose serial is in `revoked` into a REVOKED_PREFIX comment
    (rewritten atomically, only when a line changed); the boxes that thereby left the
    roster (no certificate of theirs left in it), sorted. A line without a serial is kept:
    nothing says which certificate it stands for."""
    text = _roster_text(directory)
    lines, changed = [], False
    for line in text.splitlines(keepends=True):
        if _box_name(line) is not None and _serial(line) in revoked:
            line, changed = REVOKED_PREFIX + line, True
        lines.append(line)
    if not changed:
        return []
    before = set(read_roster(directory))
    durable.atomic_write(directory / ROSTER, "".join(lines).encode(), mode=0o644)
    return sorted(before - set(read_roster(directory)))


def _enrol(roster: Path, cn: str, cert: x509.Certificate) -> None:
    """One line for a signed certificate at the end of the roster (rewritten atomically)."""
    try:
        old = roster.read_bytes()
    except FileNotFoundError:
        old = ROSTER_HEADER
    line = f"{cn} {cert.serial_number:x} {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}\n"
    durable.atomic_write(roster, old + line.encode(), mode=0o644)


def write_crl(ca: FleetCA, path: Path, revoked: tuple[x509.RevokedCertificate, ...] = ()) -> None:
    """A CRL valid CRL_DAYS: the broker refuses every client once it is out of date, so
    `appliance fleet crl` must re-issue it within the year (docs/operations.md)."""
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CRL_DAYS)))
    for r in revoked:
        b = b.add_revoked_certificate(r)
    durable.atomic_write(path, b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
                         mode=0o644)


def reissue_crl(directory: Path, revoke: tuple[Path, ...] = ()) -> list[str]:
    """`fleet crl`: the CRL again, valid CRL_DAYS from now, with what it revoked before and
    the certificates in `revoke` (each must be one the fleet CA issued)."""
    ca = load_ca(directory)
    try:
        old = x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())
        kept = {r.serial_number: r for r in old}
    except (FileNotFoundError, ValueError):
        kept = {}
    out, names = [], []
    for p in revoke:
        cert = load_cert(p)
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise UsageError(f"{p} was not issued by the fleet CA in {directory}") from None
        kept.setdefault(cert.serial_number, x509.RevokedCertificateBuilder()
                        .serial_number(cert.serial_number).revocation_date(_now()).build())
        out.append(f"revoked: {common_name(cert.subject)} (serial {cert.serial_number:x})")
        names.append(common_name(cert.subject))
    write_crl(ca, directory / "crl.pem", tuple(kept.values()))
    out.append(f"CRL: {directory}/crl.pem, {len(kept)} revoked, valid {CRL_DAYS} days;"
               " the broker reads it at start: restart it")
    try:
        left = prune_roster(directory, set(kept))  # the CRL's serials: also those revoked before
        staying = [n for n in read_roster(directory) if n in names]
    except OSError as e:  # the CRL is written: `fleet crl` again prunes what it revokes
        return [*out, f"roster: cannot update {directory / ROSTER} ({type(e).__name__}):"
                " the revoked boxes stay in the fleet view; run `fleet crl` again"]
    return [*out,
            *(f"left the roster: {name} (no unrevoked certificate; the fleet view drops it)"
              for name in left),
            *(f"stays in the roster: {name} (a certificate of it is not revoked)" for name in staying)]


def sign_csr(ca: FleetCA, csr_path: Path, out: Path, days: int = BOX_DAYS) -> str:
    """Sign a box's CSR into a client certificate at `out`, enrol it in the roster; the
    box's name (its CN)."""
    try:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{csr_path} does not exist") from None
    except ValueError:
        raise UsageError(f"{csr_path} is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise UsageError(f"{csr_path}: the request's signature is not valid")
    cn = common_name(csr.subject)
    if cn is None or not OPS_NAME_RE.match(cn) or reserved(cn):
        raise UsageError(f"{csr_path}: CN must be one box name (lowercase a-z, 0-9, '.', '_', '-',"
                         f" not {OPS_CENTER_CN!r} nor {OPS_CENTER_CN}-*)")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise UsageError(f"{csr_path}: the request's key is not an EC key")
    cert = _issue(ca.key, ca.cert, cn, pub, days)
    durable.atomic_write(out, _cert_pem(cert), mode=0o644)
    if ca.roster is not None:
        _enrol(ca.roster, cn, cert)
    return cn


def cert_problems(cert_path: Path, name: str, ca_path: Path,
                  now: dt.datetime | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the box's MQTT certificate, for `config check`."""
    now = now or _now()
    try:
        cert, ca = load_cert(cert_path), load_cert(ca_path)
    except KeyFileError as e:
        return [str(e)], []
    errors, warnings = [], []
    cn = common_name(cert.subject)
    if cn != name:
        errors.append(f"{cert_path}: its CN is {cn!r}, not this box's name {name!r}"
                      " ([appliance] name): the broker would file it under another box")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        errors.append(f"{cert_path} is not signed by the fleet CA {ca_path}")
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(0):
        errors.append(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    elif left <= dt.timedelta(days=EXPIRY_WARN_DAYS):
        warnings.append(f"{cert_path} expires on {cert.not_valid_after_utc:%Y-%m-%d}"
                        f" ({left.days} days): have the operations center sign a new CSR")
    return errors, warnings
