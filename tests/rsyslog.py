"""A real rsyslog as the hospital's audit record repository: syslog over TLS (RFC 5425,
imtcp with the gtls stream driver, Debian's rsyslog + rsyslog-gnutls), on a free loopback
port in a temp dir, with a test CA and server certificate made here (`Pki`), never the
system's config. Each message received is written to `received.log` as the fields rsyslog
parsed (PRI, MSGID, APP-NAME, HOSTNAME, MSG), one line each; `messages()` reads them back.

`Rsyslog.start()` / `stop()` by PID (SIGTERM, then SIGKILL of its process group).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.peers import free_port, wait_for

RSYSLOGD = "/usr/sbin/rsyslogd"
GTLS = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
SEP = "\x1f"  # between the fields of a line of received.log (the XML has none)


def available() -> bool:
    return os.access(RSYSLOGD, os.X_OK) and GTLS.exists()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # the appliance's, signed by the same CA
    client_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(where: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pki:
    """A CA and a server certificate naming `names` (IP addresses or DNS names)."""
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    pki = Pki(where / "ca.pem", where / "server.pem", where / "server.key", where / "client.pem",
              where / "client.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _leaf(pki.server_cert, pki.server_key, names, ca, ca_key, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    _leaf(pki.client_cert, pki.client_key, ("box-1",), ca, ca_key, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    return pki


def _leaf(cert_path: Path, key_path: Path, names: tuple[str, ...], ca: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, usage: x509.ObjectIdentifier) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)


@dataclass(frozen=True)
class Received:
    pri: int
    msgid: str
    app: str
    hostname: str
    msg: bytes  # MSG as rsyslog kept it (after the BOM, if it kept one)


class Rsyslog:
    """`client_certs`: the repository asks for the appliance's certificate (gtls
    authMode x509/certvalid: signed by the CA) and drops a session without one."""

    def __init__(self, root: Path, pki: Pki, port: int | None = None, client_certs: bool = False) -> None:
        self.root, self.pki = root, pki
        self.port = port or free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "work").mkdir(exist_ok=True)
        self.out = root / "received.log"
        self.log = root / "rsyslogd.log"
        self.pidfile = root / "rsyslogd.pid"
        self.conf = root / "rsyslog.conf"
        fields = SEP.join(["%pri%", "%msgid%", "%app-name%", "%hostname%", "%msg%"])
        self.conf.write_text(f"""
global(workDirectory="{root / 'work'}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{pki.ca}"
       defaultNetstreamDriverCertFile="{pki.server_cert}"
       defaultNetstreamDriverKeyFile="{pki.server_key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="{'x509/certvalid' if client_certs else 'anon'}")
input(type="imtcp" address="127.0.0.1" port="{self.port}")
template(name="fields" type="string" string="{fields}\\n")
*.* action(type="omfile" file="{self.out}" template="fields")
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._listening, 30, "rsyslogd listening", detail=self.log_text)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"rsyslogd exited {self.proc.returncode}:\n{self.log_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def messages(self) -> list[Received]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().splitlines():
            pri, msgid, app, host, msg = line.split(SEP.encode(), 4)
            out.append(Received(int(pri), msgid.decode(), app.decode(), host.decode(),
                                msg.removeprefix(b"\xef\xbb\xbf")))
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def __enter__(self) -> Rsyslog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
