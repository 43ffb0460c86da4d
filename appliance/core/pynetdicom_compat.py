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
  (`replace_reactor_sleep`; receive.tuning decides how long);
- the chunked C-STORE receive (`_config.STORE_RECV_CHUNKED_DATASET` and the names
  `NamedTemporaryFile`, `create_file_meta`, `write_file_meta_info` in
  `pynetdicom.dimse_messages`): routed into our own buffer (`route_chunked_store`;
  receive.intake owns the buffer);
- the acceptor's socket: `RequestHandler._create_association` builds it, and the DUL
  reads it as `ready`, then `recv(6)`, then `recv(length)` (`_read_pdu_data`): our
  `GatedSocket` replays the A-ASSOCIATE-RQ core.listener read and checks each PDU before
  its body is read (`GatedServer`, `GatedHandler`, `Handoff`); the server is closed
  without pynetdicom's `shutdown` override (`close_server`);
- `AE._create_socket` and `AssociationSocket._create_socket` (`ClientAE`, `ClientSocket`:
  forward.dicom builds its own sockets through public hooks on them);
- the association reactor's pause (`Association._reactor_checkpoint`, `_is_paused`):
  `pause_reactor`, `release_while_paused` (forward.dicom.link).

How it fails: `check_version` raises DependencyError naming the tested range; the other
functions raise whatever pynetdicom raises; nothing here swallows an error.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import pynetdicom
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

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


class PduWatch(Protocol):
    """What a GatedSocket asks about each PDU (core.listener.PduPolicy)."""

    io_timeout: float

    def header(self, header: bytes) -> bool: ...  # False: close before reading the body

    def body(self, pdu_type: int, body: bytearray) -> bool: ...  # False: close


@dataclass(eq=False)
class Handoff:
    """A connection whose first PDU (a whole A-ASSOCIATE-RQ) someone else has read:
    passed as the `request` to GatedServer.finish_request."""

    sock: socket.socket
    replay: bytes
    watch: PduWatch
    assoc: Any = None  # set once pynetdicom has made the association


class GatedSocket(AssociationSocket):
    """An acceptor's AssociationSocket that first replays the A-ASSOCIATE-RQ the gate read,
    then shows every PDU header to `watch` before it reads the body, reads each body with
    a deadline, and shows P-DATA-TF bodies to `watch` too.

    Relies on how pynetdicom's DUL reads (`_read_pdu_data`): only when `ready`, then
    `recv(6)` for the header and `recv(length)` for the body; a short read or an OSError
    is a closed connection (Evt17)."""

    _replay: memoryview
    _watch: PduWatch
    _body_left: int
    _pdu_type: int

    def adopt(self, handoff: Handoff) -> None:
        self._replay = memoryview(handoff.replay)
        self._watch = handoff.watch
        self._body_left = 0
        self._pdu_type = 0

    @property
    def ready(self) -> bool:
        return bool(self._replay) or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        if self._replay:  # the A-ASSOCIATE-RQ, checked already: header, then body
            out = bytearray(self._replay[:nr_bytes])
            self._replay = self._replay[nr_bytes:]
            return out
        if nr_bytes == 0:
            return bytearray()
        if self._body_left == 0:  # a header
            head = self._read(nr_bytes, None)
            if len(head) == 6:
                if not self._watch.header(bytes(head)):
                    self._cut()
                    return bytearray()
                self._pdu_type, self._body_left = head[0], int.from_bytes(head[2:6], "big")
            return head
        body = self._read(nr_bytes, time.monotonic() + self._watch.io_timeout)
        self._body_left = self._body_left - len(body) if len(body) == nr_bytes else 0
        if not self._watch.body(self._pdu_type, body):
            self._cut()
            return bytearray()
        return body

    def _read(self, n: int, deadline: float | None) -> bytearray:
        """n bytes, fewer if the peer closed; TimeoutError after the socket's timeout
        without data, or when `deadline` passes before all n arrived."""
        sock = self.socket
        assert sock is not None
        buf = bytearray(n)
        got = 0
        with memoryview(buf) as view:
            while got < n:
                k = sock.recv_into(view[got:])
                if not k:
                    break
                got += k
                if deadline is not None and got < n and time.monotonic() > deadline:
                    raise TimeoutError("PDU not complete in time")
        if got < n:
            del buf[got:]
        return buf

    def _cut(self) -> None:
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class GatedHandler(RequestHandler):
    """pynetdicom's request handler for a Handoff: the association gets a GatedSocket."""

    handoff: Handoff

    def setup(self) -> None:
        self.handoff = self.request
        self.request = self.handoff.sock

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # pynetdicom builds a plain AssociationSocket in this private method (and queues
        # its "connection open" event as it does); we give that object our class rather
        # than build a second one, which would queue the event twice.
        sock = assoc.dul.socket
        sock.__class__ = GatedSocket
        cast(GatedSocket, sock).adopt(self.handoff)
        self.handoff.assoc = assoc
        return assoc


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's server, fed by core.listener.Gate instead of its own accept loop: the
    gate accepts, runs the handshake and calls `finish_request(Handoff, address)`."""

    request_queue_size = 64  # the gate accepts fast; a burst of SYNs must not be dropped

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", GatedHandler)
        super().__init__(*args, **kwargs)


def close_server(server: ThreadedAssociationServer) -> None:
    """Close the listening socket of a server made with `AE.make_server` and fed by a
    gate. (Not server.shutdown(): pynetdicom's override also removes the server from
    ae._servers, where only ae.start_server() puts it, and raises ValueError for ours;
    and BaseServer.shutdown waits for a serve_forever that never ran.)"""
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
