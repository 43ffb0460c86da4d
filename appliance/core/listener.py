"""The hardened DICOM listener: who gets a connection, for how long, and how big a PDU.

pynetdicom's server gives every accepted socket two threads at once and lets the peer
send anything, at any pace, before an association exists: a blocking socket with no
timeout, and an A-ASSOCIATE-RQ of any declared length read whole before the first
handler can look at the caller. A `Gate` stands in front of it, for the receive ports
and for the storage commitment listener alike:

- admission, at accept time, before a byte is read: an optional address allowlist
  (`admit_host`), then a cap on connections from one address and a cap on connections
  in total. At the total cap the oldest connection that has no established association
  yet (still handshaking, or being negotiated or rejected) is closed to make room, so a
  crowd of stalled or refused connections cannot keep a scanner out; when every
  connection is an established association, the newcomer is closed instead;
- the handshake (TLS, then the whole A-ASSOCIATE-RQ) runs here, on the gate's one
  thread, with non-blocking sockets and one deadline from accept (`Limits.handshake_s`):
  a stalled connection costs a file descriptor, not a thread. The PDU header's declared
  length is checked before its body is read;
- only a complete, plausible A-ASSOCIATE-RQ is handed to pynetdicom (through
  `pynetdicom_compat.GatedServer`), on a blocking socket with an I/O timeout. From then
  on every PDU header is checked before its body is read (`PduPolicy`), a PDU must
  arrive within `Limits.io_timeout_s` of its header, a command set is capped at
  MAX_COMMAND bytes and a data set that is not a C-STORE's at MAX_OTHER_DATA_SET (a
  C-STORE's is capped by receive.intake, which refuses it with a status).

Every refusal is counted and logged by class (`REFUSALS`) with the peer's address, never
anything it sent; the log is thinned to one line per class per second with a count of
what was left out.

How it fails: an error on one connection closes that connection; the gate thread itself
only logs an unexpected exception and goes on. Binding (in `ae.make_server`) raises
OSError, which the caller turns into a message (`listen_error`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from appliance.core import pynetdicom_compat as compat
from appliance.core.errors import ListenError

log = structlog.get_logger("appliance.listener")

# --- pure: limits and decisions -----------------------------------------------------

# refusal class -> what it means (the log's `reason`, the status counters' keys).
REFUSALS: dict[str, str] = {
    "caller_address": "not an address allowed to connect here",
    "per_host_cap": "too many connections from this address",
    "total_cap": "too many connections, all of them established associations",
    "evicted": "no association yet while the listener was full: closed for a newcomer",
    "handshake_timeout": "no complete association request (TLS included) in time",
    "tls_failed": "TLS handshake failed",
    "pdu_too_long": "a PDU declared a length over the limit",
    "protocol": "not a DICOM upper layer PDU where one was due",
    "message_too_long": "a command set or a non-C-STORE data set over the limit",
}

PDU_TYPES = frozenset(range(0x01, 0x08))
A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
ASSOCIATE_RQ_MIN = 68  # the fixed fields of an A-ASSOCIATE-RQ, without any item
# An A-ASSOCIATE-RQ may be longer than a small receive.max_pdu (128 presentation
# contexts with several transfer syntaxes each run to ~20 KB); PDUs other than P-DATA
# may be this long whatever max_pdu is.
ASSOCIATE_FLOOR = 64 << 10
# A DIMSE command set is a few hundred bytes.
MAX_COMMAND = 64 << 10
# A data set that is not a C-STORE's (an N-EVENT-REPORT of a storage commitment for a
# 20,000-image study is ~2 MB) is held in memory by pynetdicom.
MAX_OTHER_DATA_SET = 16 << 20
C_STORE_RQ = 0x0001
HEADER = struct.Struct(">BBL")


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_per_host: int
    handshake_s: float  # from accept to a complete A-ASSOCIATE-RQ
    io_timeout_s: float  # per socket operation once handed over, and per PDU
    max_pdu: int  # the largest P-DATA-TF PDU body (receive.max_pdu)

    def pdu_limit(self, pdu_type: int) -> int:
        return self.max_pdu if pdu_type == P_DATA_TF else max(self.max_pdu, ASSOCIATE_FLOOR)


def pdu_refusal(header: bytes, limits: Limits, first: bool) -> str | None:
    """The refusal class for a PDU header (6 bytes), or None if its body may be read.
    `first`: the connection's first PDU, which must be an A-ASSOCIATE-RQ."""
    pdu_type, _, length = HEADER.unpack(header)
    if pdu_type not in PDU_TYPES or (first and (pdu_type != A_ASSOCIATE_RQ or length < ASSOCIATE_RQ_MIN)):
        return "protocol"
    if length > limits.pdu_limit(pdu_type):
        return "pdu_too_long"
    return None


def host_key(address: str) -> str:
    """The address a per-host cap counts: IPv4-mapped IPv6 as IPv4, no zone index."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass(frozen=True)
class Decision:
    refusal: str | None  # None: admitted
    evict: int | None = None  # the connection to close to make room


@dataclass
class Admission:
    """Who holds a connection: id -> (host, since, established). Pure: the caller passes
    `now` and says when a connection is established or closed."""

    max_total: int
    max_per_host: int
    conns: dict[int, tuple[str, float, bool]] = field(default_factory=dict)

    def admit(self, cid: int, host: str, now: float) -> Decision:
        if sum(1 for h, _, _ in self.conns.values() if h == host) >= self.max_per_host:
            return Decision("per_host_cap")
        evict = None
        if len(self.conns) >= self.max_total:
            waiting = [(since, c) for c, (_, since, established) in self.conns.items() if not established]
            if not waiting:
                return Decision("total_cap")
            evict = min(waiting)[1]
            del self.conns[evict]
        self.conns[cid] = (host, now, False)
        return Decision(None, evict)

    def established(self, cid: int, yes: bool) -> None:
        if cid in self.conns:
            host, since, _ = self.conns[cid]
            self.conns[cid] = (host, since, yes)

    def closed(self, cid: int) -> None:
        self.conns.pop(cid, None)


class PduPolicy:
    """What a handed-over connection may send, checked by `compat.GatedSocket` as each PDU
    arrives: the header before its body is read, and each P-DATA-TF's items for the
    command set and non-C-STORE data set caps. Pure but for `refuse`."""

    def __init__(self, limits: Limits, refuse: Callable[[str], None]) -> None:
        self.limits = limits
        self.io_timeout = limits.io_timeout_s
        self._refuse = refuse
        self._command = bytearray()
        self._command_field: int | None = None
        self._data = 0

    def header(self, header: bytes) -> bool:
        why = pdu_refusal(header, self.limits, first=False)
        if why:
            self._refuse(why)
        return why is None

    def body(self, pdu_type: int, body: bytes | bytearray) -> bool:
        if pdu_type != P_DATA_TF:
            return True
        why = self._items(memoryview(body))
        if why:
            self._refuse(why)
        return why is None

    def _items(self, body: memoryview) -> str | None:
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos:pos + 4], "big")
            if length < 2 or pos + 4 + length > len(body):
                return "protocol"
            control = body[pos + 5]
            why = self._fragment(body[pos + 6:pos + 4 + length], command=bool(control & 1),
                                 last=bool(control & 2))
            if why:
                return why
            pos += 4 + length
        return None if pos == len(body) else "protocol"

    def _fragment(self, data: memoryview, command: bool, last: bool) -> str | None:
        if command:
            self._command += data
            if len(self._command) > MAX_COMMAND:
                return "message_too_long"
            if last:
                self._command_field = command_field(bytes(self._command))
                self._command.clear()
                self._data = 0
            return None
        self._data += len(data)
        if self._command_field != C_STORE_RQ and self._data > MAX_OTHER_DATA_SET:
            return "message_too_long"
        if last:
            self._data = 0
        return None


def command_field(command_set: bytes) -> int | None:
    """(0000,0100) Command Field of an encoded command set (implicit VR little endian)."""
    pos = 0
    while pos + 8 <= len(command_set):
        group, elem, length = struct.unpack_from("<HHL", command_set, pos)
        if (group, elem) == (0x0000, 0x0100) and length == 2 and pos + 10 <= len(command_set):
            return int(struct.unpack_from("<H", command_set, pos + 8)[0])
        pos += 8 + length
    return None


# --- I/O: the gate --------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    cid: int
    sock: socket.socket
    host: str
    server: Any  # compat.GatedServer
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    handshaken: bool = True  # False until the TLS handshake is done
    assoc: Any = None  # once handed over
    evicted: bool = False  # handed over, then shut down for a newcomer; closed once it ends


class _RefusalLog:
    """At most one log line per refusal class per second, with what it left out."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._left_out: Counter[str] = Counter()

    def note(self, kind: str, host: str, port: int, listener: str, detail: str | None) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < 1.0:
            self._left_out[kind] += 1
            return
        self._last[kind] = now
        left_out = self._left_out.pop(kind, 0)
        log.warning("connection.refused", listener=listener, port=port, peer=host, reason=kind,
                    meaning=REFUSALS[kind], detail=detail, not_logged_since_last=left_out or None)


class Gate:
    """Accepts connections on one or more pynetdicom servers (made with
    `server_class=compat.GatedServer`) and hands each complete A-ASSOCIATE-RQ over."""

    def __init__(self, name: str, limits: Limits, refused: Callable[[str], None] | None = None,
                 admit_host: Callable[[str], bool] | None = None) -> None:
        self.name = name
        self.limits = limits
        self.admission = Admission(limits.max_connections, limits.max_per_host)
        self.refusals: Counter[str] = Counter()
        self._refused_hook = refused
        self._admit_host = admit_host
        self._sel = selectors.DefaultSelector()
        self._servers: list[Any] = []
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._lock = threading.Lock()  # refusals, from the gate and the association threads
        self._log = _RefusalLog()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self, server: Any) -> None:
        """Take connections for `server` (before `start`)."""
        server.socket.setblocking(False)
        self._sel.register(server.socket, selectors.EVENT_READ, server)
        self._servers.append(server)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"gate-{self.name}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The gate's thread runs (for the stage supervisor)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting; close the listening sockets and every connection still in its
        handshake. Handed-over associations run on until they end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for server in self._servers:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(server.socket)
            compat.close_server(server)
        for conn in [c for c in self._conns.values() if c.assoc is None]:
            self._drop(conn)
        self._servers.clear()
        self._sel.close()

    def count(self, kind: str, host: str, port: int = 0, detail: str | None = None) -> None:
        with self._lock:
            self.refusals[kind] += 1
            self._log.note(kind, host, port, self.name, detail)
        if self._refused_hook is not None:
            self._refused_hook(kind)

    # --- the loop (gate thread) ---

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception as e:  # one bad connection must not stop the listener
                log.exception("listener.error", listener=self.name, error_type=type(e).__name__)
                time.sleep(0.1)

    def _once(self) -> None:
        now = time.monotonic()
        pending = [c.deadline for c in self._conns.values() if c.assoc is None]
        wait = max(0.0, min([now + 0.25, *pending]) - now)
        for key, _ in self._sel.select(wait):
            if not isinstance(key.data, _Conn):
                self._accept(key.data)
            elif key.data.cid in self._conns:  # not closed earlier in this round (evicted)
                self._step(key.data)
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.assoc is None and now >= conn.deadline:
                self._refuse(conn, "handshake_timeout")
        self._sweep()

    def _accept(self, server: Any) -> None:
        for _ in range(64):  # then let the pending connections have a turn
            try:
                sock, address = server.socket.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of file descriptors, for one: wait, do not spin
                log.error("listener.accept_failed", listener=self.name, error=e.strerror)
                time.sleep(0.1)
                return
            self._admit(server, sock, address)

    def _admit(self, server: Any, sock: socket.socket, address: Any) -> None:
        host, port = host_key(str(address[0])), server.server_address[1]
        # Counted before the close, so that whoever sees the close also sees the count.
        if self._admit_host is not None and not self._admit_host(host):
            self.count("caller_address", host, port)
            sock.close()
            return
        self._sweep()
        self._next_id += 1
        cid = self._next_id
        decision = self.admission.admit(cid, host, time.monotonic())
        if decision.refusal == "per_host_cap" and self._settle(host):
            decision = self.admission.admit(cid, host, time.monotonic())
        if decision.refusal:
            self.count(decision.refusal, host, port)
            sock.close()
            return
        if decision.evict is not None and decision.evict in self._conns:
            self._evict(self._conns[decision.evict])
        sock.setblocking(False)
        # DIMSE sends small command PDUs before data: without NODELAY, Nagle + delayed
        # ACK stall each C-STORE response ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(cid, sock, host, server, time.monotonic() + self.limits.handshake_s)
        if server.ssl_context is not None:
            conn.sock = server.ssl_context.wrap_socket(sock, server_side=True,
                                                       do_handshake_on_connect=False)
            conn.handshaken = False
        self._conns[cid] = conn
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _settle(self, host: str) -> bool:
        """Read what `host`'s connections still in their handshake have sent (a peer that
        closed one and opened the next at once must not meet its own closed connection
        at the cap); whether any of them went away."""
        mine = [c for c in self._conns.values() if c.host == host and c.assoc is None]
        for conn in mine:
            self._step(conn)
        return any(c.cid not in self._conns for c in mine)

    def _step(self, conn: _Conn) -> None:
        """Move a connection's handshake on as far as the data at hand allows."""
        try:
            if not conn.handshaken:
                conn.sock.do_handshake()  # type: ignore[attr-defined]
                conn.handshaken = True
            while True:
                need = 6 - len(conn.buf) if len(conn.buf) < 6 else 6 + _declared(conn.buf) - len(conn.buf)
                data = conn.sock.recv(min(need, 1 << 16))
                if not data:
                    self._drop(conn)  # the peer gave up: not a refusal
                    return
                conn.buf += data
                if len(conn.buf) == 6 and (why := pdu_refusal(bytes(conn.buf), self.limits, first=True)):
                    self._refuse(conn, why)
                    return
                if len(conn.buf) > 6 and len(conn.buf) == 6 + _declared(conn.buf):
                    self._hand_over(conn)
                    return
        except ssl.SSLWantReadError:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        except ssl.SSLWantWriteError:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        except BlockingIOError:
            pass
        except ssl.SSLError as e:
            self._refuse(conn, "tls_failed", e.reason or type(e).__name__)
        except OSError:
            self._drop(conn)  # reset by the peer

    def _hand_over(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        conn.sock.setblocking(True)
        conn.sock.settimeout(self.limits.io_timeout_s)
        port = conn.server.server_address[1]
        policy = PduPolicy(self.limits, lambda kind: self.count(kind, conn.host, port))
        handoff = compat.Handoff(conn.sock, bytes(conn.buf), policy)
        conn.buf = bytearray()
        try:
            conn.server.finish_request(handoff, (conn.host, 0))
        except Exception as e:
            log.exception("listener.handover_failed", listener=self.name, error_type=type(e).__name__)
            self._drop(conn)
            return
        conn.assoc = handoff.assoc

    def _sweep(self) -> None:
        """Forget connections whose association has ended (closing what pynetdicom left
        open), and note which are established: those are never evicted."""
        for conn in list(self._conns.values()):
            a = conn.assoc
            if a is None:
                continue
            if conn.sock.fileno() == -1 or not (a.is_alive() or a.dul.is_alive()):
                self._drop(conn)
            elif not conn.evicted:
                self.admission.established(conn.cid, bool(a.is_established))

    def _evict(self, victim: _Conn) -> None:
        """Close a connection without an established association, to make room. One that
        pynetdicom has (being negotiated or rejected) is only shut down: its threads see
        the connection closed and end, and the sweep closes it then."""
        self.count("evicted", victim.host, victim.server.server_address[1])
        if victim.assoc is None:
            self._close(victim)
            return
        victim.evicted = True
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)

    def _refuse(self, conn: _Conn, kind: str, detail: str | None = None) -> None:
        self.count(kind, conn.host, conn.server.server_address[1], detail)
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._close(conn)
        self.admission.closed(conn.cid)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.cid, None)
        if conn.assoc is None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a pynetdicom thread reading it
        with contextlib.suppress(OSError):
            conn.sock.close()


def _declared(buf: bytearray) -> int:
    return int(HEADER.unpack_from(buf)[2])


# --- binding ----------------------------------------------------------------------------


def listen_error(e: OSError, what: str, host: str, port: int) -> ListenError:
    """The message for a listener that cannot bind: the port in use, the address not
    (yet) on this machine, or no permission for a port below 1024."""
    if e.errno == errno.EADDRINUSE:
        return ListenError(f"port {port} on {host} is in use (by another program?); "
                           f"cannot listen for {what}", temporary=True)
    if e.errno == errno.EADDRNOTAVAIL:
        return ListenError(f"{host} is not an address of this machine (is its network up?); "
                           f"cannot listen for {what} on port {port}", temporary=True)
    if e.errno == errno.EACCES:
        return ListenError(f"no permission to listen on port {port} on {host} for {what} "
                           "(ports below 1024 need CAP_NET_BIND_SERVICE)", temporary=False)
    return ListenError(f"cannot listen for {what} on {host}:{port}: {e.strerror or e}", temporary=True)


def resolve(host: str) -> set[str]:
    """Every address `host` resolves to (as `host_key` writes them); OSError if none."""
    infos: Iterable[Any] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return {host_key(str(info[4][0])) for info in infos}
