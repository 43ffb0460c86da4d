"""DICOM TLS on the receive side: mutual authentication against the configured CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.peers import Appliance, free_port, storescu, wait_for
from tests.receive_support import held_config, port_open

ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"

Factory = Callable[..., Appliance]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the appliance trusts (and the client trusts for the server)
    server_cert: Path
    server_key: Path
    client_cert: Path  # issued by `ca`
    client_key: Path
    rogue_cert: Path  # issued by another CA with the same names
    rogue_key: Path


def _key() -> rsa.RSAPrivateKey:
    # RSA: DCMTK's default BCP 195 profile offers ECDHE-RSA suites.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, server: bool
          ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(dirpath: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    crt, pem = dirpath / f"{name}.crt", dirpath / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # key files must be private
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("Test Reading Network CA")
    rogue_ca, rogue_ca_key = _ca("Test Reading Network CA")  # same name, other key
    ca_path = d / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = _write(d, "server", *_leaf("localhost", ca, ca_key, server=True))
    client = _write(d, "client", *_leaf("MODALITY", ca, ca_key, server=False))
    rogue = _write(d, "rogue", *_leaf("MODALITY", rogue_ca, rogue_ca_key, server=False))
    return Pki(ca_path, *server, *client, *rogue)


@dataclass(frozen=True)
class TlsAppliance:
    daemon: Appliance
    tls_port: int

    @property
    def port(self) -> int:  # the plain listener
        return self.daemon.port

    def spooled(self) -> dict[str, bytes]:
        return self.daemon.spooled()

    def status(self) -> dict[str, Any]:
        return self.daemon.status()


@pytest.fixture
def app(appliance_factory: Factory, tmp_path: Path, pki: Pki) -> TlsAppliance:
    """The daemon with a plain listener and a TLS listener that trusts `pki.ca`."""
    root = tmp_path / "appliance"
    tls_port = free_port()
    cfg = held_config(root, free_port(), tls={"port": tls_port, "cert": str(pki.server_cert),
                                               "key": str(pki.server_key), "ca": str(pki.ca)})
    a = appliance_factory(cfg, root=root)
    wait_for(lambda: port_open(tls_port), what="the TLS listener")
    return TlsAppliance(a, tls_port)


def tls_store(app: TlsAppliance, samples: Path, tls: list[str], timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
    return storescu(app.tls_port, [samples / ONE_CT], extra=tls, timeout=timeout)


def test_tls_client_with_certificate_from_the_ca_stores(app: TlsAppliance, pki: Pki, samples: Path) -> None:
    """storescu with a client certificate issued by the configured CA, verifying the
    server against the same CA, stores over TLS and the instance is spooled."""
    r = tls_store(app, samples, ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)])
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert len(app.spooled()) == 1
    st = app.status()
    assert st["receive"]["instances_received"] == 1
    assert any(lst["tls"] and lst["port"] == app.tls_port for lst in st["listening"])


@pytest.mark.parametrize("client", ["no-certificate", "certificate-from-another-ca", "plain-tcp"])
def test_tls_port_refuses_clients_without_a_trusted_certificate(
        app: TlsAppliance, pki: Pki, samples: Path, client: str) -> None:
    """A client without a certificate, with one from another CA (same CA name), or
    without TLS at all, cannot store on the TLS port; nothing is spooled."""
    tls = {
        "no-certificate": ["+tla", "+cf", str(pki.ca)],  # anonymous TLS, still verifies us
        "certificate-from-another-ca": ["+tls", str(pki.rogue_key), str(pki.rogue_cert),
                                        "+cf", str(pki.ca)],
        "plain-tcp": [],
    }[client]
    r = tls_store(app, samples, tls)
    assert r.returncode != 0 or "Store Failed" in r.stderr, r.stderr
    assert "Received Store Response" not in r.stderr
    assert app.spooled() == {}
    assert app.status()["receive"]["instances_received"] == 0
    # the handshake failed in the listener, and was counted there (DCMTK may try twice)
    wait_for(lambda: set(app.status()["receive"]["connections_refused"]) == {"tls_failed"},
             what="the refusal counted", detail=lambda: str(app.status()["receive"]))


def test_plain_port_works_beside_tls(app: TlsAppliance, samples: Path) -> None:
    """Turning on the TLS listener keeps the plain listener serving."""
    r = storescu(app.port, [samples / ONE_CT])
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert len(app.spooled()) == 1


def test_stalled_tls_handshake_does_not_block_other_clients(
        app: TlsAppliance, pki: Pki, samples: Path) -> None:
    """A client that connects to the TLS port and stops mid-handshake must not hold up
    the next scanner: the handshake runs on the association's thread, not the accept
    loop. The next TLS store completes well within storescu's 30 s ACSE timeout."""
    staller = socket.create_connection(("127.0.0.1", app.tls_port))
    try:
        # The first bytes of a TLS ClientHello record that announces 512 bytes, then silence.
        staller.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        t0 = time.monotonic()
        r = tls_store(app, samples, ["+tls", str(pki.client_key), str(pki.client_cert),
                                     "+cf", str(pki.ca)], timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        staller.close()
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert elapsed < 20, f"the store took {elapsed:.1f}s behind a stalled handshake"
    assert len(app.spooled()) == 1


def test_stalled_tls_handshake_is_closed_after_the_acse_timeout(
        appliance_factory: Factory, tmp_path: Path, pki: Pki) -> None:
    """A client that starts a TLS handshake and stalls is closed by the daemon once
    receive.acse_timeout_s (2 s) has passed since it connected; counted as a handshake
    timeout."""
    root = tmp_path / "appliance"
    tls_port = free_port()
    cfg = held_config(root, free_port(), acse_timeout_s=2,
                      tls={"port": tls_port, "cert": str(pki.server_cert), "key": str(pki.server_key),
                           "ca": str(pki.ca)})
    a = appliance_factory(cfg, root=root)
    wait_for(lambda: port_open(tls_port), what="the TLS listener")
    with socket.create_connection(("127.0.0.1", tls_port)) as staller:
        staller.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        t0 = time.monotonic()
        staller.settimeout(30)
        try:
            eof = staller.recv(1) == b""
        except OSError:
            eof = True
        elapsed = time.monotonic() - t0
    assert eof
    assert 1.5 < elapsed < 2 + 5, f"closed after {elapsed:.1f} s"
    refused = a.status()["receive"]["connections_refused"]
    assert refused.get("handshake_timeout") == 1, refused
