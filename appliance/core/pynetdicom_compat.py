"""Every use of pynetdicom's internals, in one place.

pynetdicom has no public hook for several things the appliance needs, so we reach into
it: module attributes replaced, private methods overridden in subclasses, private
attributes read and set. All of that happens here and nowhere else; the rest of the
package calls the small functions and classes below. tests/test_pynetdicom_compat.py
fails when one of the internals we rely on changes shape, so that an upgrade of
pynetdicom is checked here rather than discovered on a scanner, and `check_version`
refuses to start the daemon with a pynetdicom outside `TESTED` (the pin in
pyproject.toml).

What we rely on, and who uses it:
- the reactors' `time` module (`pynetdicom.association.time`, `pynetdicom.dul.time`):
  replaced by a stand-in whose `sleep` is shorter while images arrive
  (`replace_reactor_sleep`; receive.scp decides how long);
- the chunked C-STORE receive (`_config.STORE_RECV_CHUNKED_DATASET` and the names
  `NamedTemporaryFile`, `create_file_meta`, `write_file_meta_info` in
  `pynetdicom.dimse_messages`): routed into our own buffer (`route_chunked_store`;
  receive.intake owns the buffer);
- the server's `get_request` (TCP_NODELAY, and the TLS handshake off the accept loop) and
  `BaseServer.shutdown` instead of pynetdicom's override (`NodelayServer`, `close_server`);
- `AE._create_socket` and `AssociationSocket._create_socket` (`ClientAE`, `ClientSocket`:
  forward.dicom builds its own sockets through public hooks on them);
- the association reactor's pause (`Association._reactor_checkpoint`, `_is_paused`):
  `pause_reactor`, `release_while_paused` (forward.dicom.link).

How it fails: `check_version` raises DependencyError naming the tested range; the other
functions raise whatever pynetdicom raises; nothing here swallows an error.
"""

from __future__ import annotations

import re
import socket
import socketserver
import ssl
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from appliance.core.errors import DependencyError

# The pynetdicom releases these patches were written and tested against: [low, high).
TESTED = ((3, 0, 1), (3, 1, 0))


def version_problem(version: str) -> str | None:
    """Why pynetdicom `version` cannot be used, or None if it is in the tested range."""
    low, high = (".".join(map(str, v)) for v in TESTED)
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if m and TESTED[0] <= tuple(int(x) for x in m.groups()) < TESTED[1]:
        return None
    return (f"pynetdicom {version} is installed, but this appliance is tested only with "
            f"pynetdicom >= {low}, < {high} (it relies on pynetdicom internals: see "
            f"appliance/core/pynetdicom_compat.py); install a version in that range")


def check_version() -> None:
    """Refuse to run on a pynetdicom outside the tested range (DependencyError)."""
    problem = version_problem(pynetdicom.__version__)
    if problem:
        raise DependencyError(problem)


# --- process-wide settings -----------------------------------------------------------


def configure_scp() -> None:
    """Accept every storage SOP class (pynetdicom's unrestricted storage service), and keep
    pynetdicom's own log handlers (which print UIDs) out of the way."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"


# --- the reactors' sleeps --------------------------------------------------------------


def replace_reactor_sleep(clock: Any) -> None:
    """Make the association and DUL reactors use `clock` (a stand-in for the `time` module)
    for their polling sleeps. Process-wide: the forwarder's associations use it too."""
    import pynetdicom.association as association_module
    import pynetdicom.dul as dul_module

    association_module.time = clock  # type: ignore[attr-defined]
    dul_module.time = clock  # type: ignore[attr-defined]


# --- chunked C-STORE data sets -----------------------------------------------------------


def route_chunked_store(new_buffer: Callable[..., Any], command_facts: Callable[..., Any],
                        begin: Callable[..., Any]) -> None:
    """Have pynetdicom write every C-STORE data set it receives into `new_buffer()`
    instead of a NamedTemporaryFile. pynetdicom calls `command_facts(**kw)` where it would
    build the file meta from the command set, and `begin(buffer, facts)` where it would
    write that file meta into the buffer."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = new_buffer  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = command_facts  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = begin  # type: ignore[attr-defined]


# --- servers ------------------------------------------------------------------------------


class NodelayServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY and the TLS handshake moved off the accept loop.

    pynetdicom wraps the socket (and so runs the whole TLS handshake) in `get_request`,
    on the single accepting thread: one slow or malicious client would stall every other
    scanner. We wrap without handshaking; OpenSSL then completes the handshake on the
    association's own thread at its first read.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        # DIMSE sends small command PDUs before data: without NODELAY, Nagle + delayed
        # ACK stall each C-STORE response ~40 ms.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def close_server(server: ThreadedAssociationServer) -> None:
    """Stop a server made with `AE.make_server` and close its listening socket."""
    # Not server.shutdown(): pynetdicom's override also removes the server from
    # ae._servers, where only ae.start_server() puts it, and so raised ValueError for
    # ours and cut the daemon's shutdown short (exit 70, index not closed).
    socketserver.BaseServer.shutdown(server)
    server.server_close()


# --- client sockets -------------------------------------------------------------------------


class ClientSocket(AssociationSocket):
    """An AssociationSocket whose OS socket comes from `new_os_socket` (pynetdicom makes
    a plain socket.socket in its private `_create_socket`)."""

    def new_os_socket(self, family: socket.AddressFamily) -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = self.new_os_socket(family)
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock


class ClientAE(AE):
    """An AE whose requested associations use the AssociationSocket `new_socket` returns
    (pynetdicom builds it in its private `_create_socket`)."""

    def new_socket(self, assoc: Any, address: AddressInformation,
                   tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock

    def _create_socket(self, assoc: Any, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        return self.new_socket(assoc, address, tls_args)


# --- the association reactor's pause ------------------------------------------------------


def pause_reactor(assoc: Any, timeout: float = 5.0) -> None:
    """Stop `assoc`'s own reactor at its checkpoint and wait (at most `timeout` s) until
    it is really waiting there, so that it takes nothing off the DIMSE queue until
    `release()` or `kill()` restart it."""
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if assoc._is_paused:
            time.sleep(0.002)  # still paused: it is really waiting, not passing by
            if assoc._is_paused:
                return
        time.sleep(0.0005)


def release_while_paused(assoc: Any) -> None:
    """Before `assoc.release()` on an association whose reactor we paused: pynetdicom's
    handling of an N-EVENT-REPORT (in a thread of its own) ends with `_is_paused = False`,
    and release() would then wait for a pause that never comes."""
    if not assoc._reactor_checkpoint.is_set():
        assoc._is_paused = True
