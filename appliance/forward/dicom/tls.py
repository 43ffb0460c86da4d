"""TLS for the dicom transport: the error classification (pure), the client and server
contexts, and pynetdicom sockets that remember why a connection or handshake failed and
watch their link (keep-alives, and `link_silent` from TCP_INFO: see "Dead peers and slow
links" in the package docstring).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import AddressInformation, AssociationSocket

from appliance.core import pynetdicom_compat as compat
from appliance.core.config import TLSClient
from appliance.forward import Retryable
from appliance.forward.bandwidth import Cap
from appliance.forward.netlink import watch_link

# OpenSSL reasons meaning "the peer does not accept our certificate" or "we cannot agree".
_CERT_REJECTED = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
    "TLSV1_ALERT_DECRYPT_ERROR": "decrypt error (wrong key for the certificate?)",
}
_NO_AGREEMENT = {
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version",
    "UNSUPPORTED_PROTOCOL": "no common TLS version",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure (no common cipher or version?)",
    "NO_SHARED_CIPHER": "no common cipher",
    "NO_CIPHERS_AVAILABLE": "no common cipher",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "insufficient security",
}


def classify_tls_error(exc: BaseException) -> tuple[bool, str]:
    """(permanent, reason text) for an error of our TLS client."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or exc.reason or "verification failed"
        return True, f"the PACS's TLS certificate was not accepted: {what}"
    reason = getattr(exc, "reason", None) or ""
    if reason in _CERT_REJECTED:
        return True, ("the PACS rejected this appliance's TLS client certificate "
                      f"({_CERT_REJECTED[reason]}): is tls.cert signed by a CA the PACS trusts?")
    if reason in _NO_AGREEMENT:
        return True, f"TLS handshake with the PACS failed: {_NO_AGREEMENT[reason]}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False, ("the PACS closed the TLS connection during set-up (if this persists: does "
                       "the PACS trust this appliance's certificate, and does it speak TLS on this port?)")
    return False, f"TLS connection to the PACS failed ({reason or type(exc).__name__})"



# --- I/O: sockets that remember why they failed ----------------------------------------


class Probe:
    """What one association's socket saw: the first connect / TLS error, last activity."""

    def __init__(self) -> None:
        self.connect_error: OSError | None = None
        self.tls_errors: list[ssl.SSLError] = []
        self.activity = time.monotonic()
        # A write timed out (the I/O timeout): the peer stopped reading. pynetdicom only
        # sees a closed connection.
        self.write_timed_out = False
        # The link went silent: `link_silent` said so, or the kernel gave up on the
        # connection (ETIMEDOUT: keep-alives unanswered).
        self.link_silent = False
        # The bound on the TCP connect alone (`link_timeout_s`): the SYN is answered by the
        # server's kernel, not by the PACS, so a silent link shows in seconds. pynetdicom's
        # connection_timeout (`timeout_s`) still bounds the TLS handshake after it.
        self.connect_timeout: float | None = None
        self.connect_timed_out = False  # the TCP connect itself got no answer in time

    def bounded_connect(self, sock: socket.socket, connect: Callable[[], None]) -> None:
        """Run `connect` (the TCP connect of `sock`) within `connect_timeout` when that is
        shorter than the socket's own timeout; the socket's timeout is restored after."""
        limit, whole = self.connect_timeout, sock.gettimeout()
        if limit is None or (whole is not None and whole <= limit):
            connect()
            return
        sock.settimeout(limit)
        try:
            connect()
        except TimeoutError:
            self.connect_timed_out = True
            raise
        finally:
            sock.settimeout(whole)

    def note_timeout(self, e: TimeoutError) -> None:
        """A time-out on the socket: the kernel's (the link is silent) or our I/O one."""
        if e.errno == errno.ETIMEDOUT:
            self.link_silent = True
        else:
            self.write_timed_out = True

    def note(self, e: OSError) -> None:
        if isinstance(e, ssl.SSLError):
            self.tls_errors.append(e)
        elif self.connect_error is None:
            self.connect_error = e

    @property
    def tls_error(self) -> ssl.SSLError | None:
        """The most telling TLS error seen: one that says why (a certificate, a version)
        rather than just that the connection closed, which may come first."""
        errors = list(self.tls_errors)
        for e in errors:
            if classify_tls_error(e)[0]:
                return e
        return errors[0] if errors else None


class _TCPSocket(socket.socket):
    probe: Probe | None = None

    def connect(self, address: Any) -> None:
        try:
            if self.probe is None:
                super().connect(address)
            else:
                self.probe.bounded_connect(self, lambda: super(_TCPSocket, self).connect(address))
        except OSError as e:
            if self.probe is not None:
                self.probe.note(e)
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except TimeoutError as e:
            if self.probe is not None:
                self.probe.note_timeout(e)
            raise

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags)
        except TimeoutError as e:
            if self.probe is not None and e.errno == errno.ETIMEDOUT:
                self.probe.link_silent = True
            raise


class _RecordingSSLSocket(ssl.SSLSocket):
    """Notes TLS errors (handshake, and alerts read later: in TLS 1.3 the server's
    verdict on our certificate arrives with the first read) in the context's probe."""

    def _note(self, e: OSError) -> None:
        probe = getattr(self.context, "probe", None)
        if isinstance(probe, Probe):
            probe.note(e)

    def connect(self, addr: Any) -> None:
        probe = getattr(self.context, "probe", None)
        try:
            # typeshed does not declare SSLSocket's do_handshake_on_connect attribute
            handshake = bool(getattr(self, "do_handshake_on_connect", False))
            if not isinstance(probe, Probe) or not handshake:
                super().connect(addr)
                return
            # The TCP connect within the probe's bound, then the handshake within the
            # socket's own timeout.
            setattr(self, "do_handshake_on_connect", False)  # noqa: B010 - see above
            try:
                probe.bounded_connect(self, lambda: super(_RecordingSSLSocket, self).connect(addr))
            finally:
                setattr(self, "do_handshake_on_connect", True)  # noqa: B010
            self.do_handshake()
        except OSError as e:
            self._note(e)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - ssl's signature
        try:
            return super().read(len, buffer)
        except ssl.SSLError as e:
            self._note(e)
            raise
        except TimeoutError as e:
            probe = getattr(self.context, "probe", None)
            if isinstance(probe, Probe) and e.errno == errno.ETIMEDOUT:
                probe.link_silent = True
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except ssl.SSLError as e:
            self._note(e)
            raise
        except TimeoutError as e:
            probe = getattr(self.context, "probe", None)
            if isinstance(probe, Probe):
                probe.note_timeout(e)
            raise


class ClientContext(ssl.SSLContext):
    sslsocket_class = _RecordingSSLSocket
    probe: Probe | None = None


class ProbedSocket(compat.ClientSocket):
    """pynetdicom's socket plus: error capture, TCP_NODELAY, an I/O timeout, keep-alives
    (`watch_link`), activity."""

    def __init__(self, assoc: Any, address: AddressInformation, probe: Probe,
                 io_timeout: float, cap: Cap | None = None,
                 link_timeout: float | None = None) -> None:
        self.probe = probe
        self._io_timeout = io_timeout
        self._link_timeout = min(link_timeout or io_timeout, io_timeout)
        probe.connect_timeout = self._link_timeout
        self._cap = cap
        super().__init__(assoc, address=address)

    def new_os_socket(self, family: socket.AddressFamily) -> socket.socket:
        sock = _TCPSocket(family, socket.SOCK_STREAM)
        sock.probe = self.probe
        return sock

    def connect(self, primitive: Any) -> None:
        super().connect(primitive)
        sock = self.socket
        if sock is not None and self._is_connected:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # pynetdicom leaves the connected socket blocking forever: a write to a
                # peer that stopped reading would never return.
                sock.settimeout(self._io_timeout)
                watch_link(sock, self._link_timeout)

    def _shutdown_socket(self) -> None:
        """Shut down and close. pynetdicom 3.0 closes only if `shutdown` succeeded, and
        on a socket that never connected it fails (ENOTCONN): every refused connection
        left an open socket for the garbage collector."""
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def send(self, bytestream: bytes) -> None:
        if self._cap is not None:  # the destination's bandwidth cap, per PDU
            self._cap.take(len(bytestream))
        super().send(bytestream)
        self.probe.activity = time.monotonic()

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        if data:
            self.probe.activity = time.monotonic()
        return data


class ProbedAE(compat.ClientAE):
    def __init__(self, ae_title: str, io_timeout: float, cap: Cap | None = None,
                 link_timeout: float | None = None) -> None:
        super().__init__(ae_title=ae_title)
        self._io_timeout = io_timeout
        self._link_timeout = link_timeout
        self._cap = cap

    def new_socket(self, assoc: Any, address: AddressInformation,
                   tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        probe = Probe()
        if tls_args is not None and isinstance(tls_args[0], ClientContext):
            tls_args[0].probe = probe  # one association at a time per transport
        sock = ProbedSocket(assoc, address, probe, self._io_timeout, self._cap, self._link_timeout)
        sock.tls_args = tls_args
        return sock



def err_text(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__


def is_ip(host: str) -> bool:
    """An IP address rather than a name: rarely in a certificate, so the host name is not
    checked and `tls.ca` (the reading center's own CA) is the trust anchor."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_context(tls: TLSClient, check_hostname: bool,
                   cls: type[ssl.SSLContext] = ClientContext) -> Any:
    """The client context for one bundle (files read again each time: renewed certificates
    are used without a restart); Retryable when the files cannot be loaded. `cls`: the
    dicom transport's ClientContext (records socket errors), or a plain SSLContext (the
    dicomweb transport's HTTPS)."""
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = check_hostname
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise Retryable(f"cannot load the TLS client certificate {tls.cert} / key {tls.key}: "
                        f"{err_text(e)}") from None
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as e:
        raise Retryable(f"cannot load the TLS CA file {tls.ca}: {err_text(e)}") from None
    return ctx


def server_context(tls: TLSClient) -> ssl.SSLContext:
    """The storage commitment listener's context: client certificates verified against `tls.ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
