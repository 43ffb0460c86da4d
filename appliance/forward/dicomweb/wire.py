"""One HTTP exchange of the dicomweb transport: a connection of its own (TCP, then TLS),
a request whose body is written piece by piece, the response read under a cap, and a
watcher thread that shuts the socket down when the attempt is cancelled, so that a
blocked connect, send or receive returns within half a second. The same watcher reads
the socket's TCP_INFO (`forward.netlink`, as the dicom and sftp transports) and shuts it
down once nothing owed has been acknowledged for `link_timeout`: a cut link is known in
seconds, not after `timeout`. Writes wait for the destination's bandwidth cap
(`forward.bandwidth`) first. Every failure becomes `Retryable` or `Permanent` with a
reason for the operator (no URL path, no body).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from appliance.forward import Permanent, Retryable
from appliance.forward.bandwidth import Cap
from appliance.forward.dicom.tls import classify_tls_error, err_text
from appliance.forward.netlink import link_silent, watch_link

WATCH_S = 0.25  # how often the watcher looks at the attempt's cancel event


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    retry_after: str | None
    body: bytes  # b"" when there was none, or it was longer than the cap


class Cancelled(Retryable):
    """The attempt's time budget ran out (the scheduler set `plan.cancelled`)."""


class LinkSilent(Retryable):
    """The link went silent: nothing owed acknowledged for `link_timeout` (the watcher
    shut the socket down)."""


class Exchange:
    """One request/response; use as a context manager (closes the socket, stops the watcher).
    `link_timeout` (at most `timeout`; None: `timeout`) is how long the link may stay
    silent while something is owed (`forward.netlink.link_silent`)."""

    def __init__(self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None,
                 cancelled: threading.Event, cap: Cap | None = None,
                 link_timeout: float | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.link_timeout = min(link_timeout or timeout, timeout)
        self._silent = False
        self.where = "connecting"  # what the exchange was doing, for a reason
        self._cap = cap
        self._ssl = ssl_context
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._tripped = False
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="dicomweb-watch", daemon=True)
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def __enter__(self) -> Exchange:
        self._watcher.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        with contextlib.suppress(OSError):
            self.conn.close()
        self._watcher.join()

    # --- the watcher ---

    def _watch(self) -> None:
        while not self._done.wait(WATCH_S):
            with self._lock:
                sock = self._sock
                silent = sock is not None and link_silent(sock, self.link_timeout)
                if self._cancelled.is_set() or silent:
                    self._silent = silent and not self._cancelled.is_set()
                    self._tripped = True
                    if sock is not None:
                        _shutdown(sock)
                    return

    def _attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._tripped:
                _shutdown(sock)

    def check_cancelled(self) -> None:
        """Raise if the watcher ended the exchange: LinkSilent, or Cancelled (the budget)."""
        if self._silent:
            raise LinkSilent(f"the link to the server at {self.host}:{self.port} went silent"
                             f" {self.where}: nothing was acknowledged within"
                             f" {self.link_timeout:g} s (link_timeout_s)")
        if self._tripped or self._cancelled.is_set():
            raise Cancelled("the attempt ran out of its time budget while talking to the server "
                            "(is the link very slow?)")

    # --- connect ---

    def open(self) -> None:
        """Connect (and TLS handshake); the connection is then `self.conn`."""
        self.where = "connecting"
        sock = self._connect()
        self._attach(sock)
        if self._ssl is not None:
            self.where = "during the TLS handshake"
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as e:
                self.check_cancelled()
                raise self._failure(e, "during the TLS handshake") from None
            self._attach(sock)
        self.conn.sock = sock

    def _connect(self) -> socket.socket:
        """A TCP connection within `link_timeout`, looking at the cancel event meanwhile:
        the SYN is answered by the server's kernel, not by the PACS, so no answer for
        that long is a silent link (or a host that is gone), not a slow PACS."""
        deadline = time.monotonic() + self.link_timeout
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise Retryable(f"cannot resolve the server's host name {self.host!r}") from None
        last: OSError = TimeoutError(errno.ETIMEDOUT, "timed out")
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                self._connect_one(sock, addr, deadline)
            except OSError as e:
                sock.close()
                last = e
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise Retryable(f"cannot connect to the server at {self.host}:{self.port}: "
                        f"{err_text(last)}") from None

    def _connect_one(self, sock: socket.socket, addr: Any, deadline: float) -> None:
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        while err in (errno.EINPROGRESS, errno.EAGAIN):
            self.check_cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, f"no answer within {self.link_timeout:g} s"
                                   " (link_timeout_s)")
            _, writable, _ = select.select([], [sock], [], min(WATCH_S, left))
            if writable:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watch_link(sock, self.link_timeout)

    # --- request and response ---

    def send(self, data: bytes, where: str) -> None:
        """Write `data` (after waiting for the destination's bandwidth cap, if any)."""
        if self._cap is not None:
            self._cap.take(len(data), self._cancelled)
        self.where = where
        self.check_cancelled()
        try:
            self.conn.send(data)
        except (OSError, ssl.SSLError) as e:
            self.check_cancelled()
            raise self._failure(e, where) from None

    def response(self, cap: int) -> Response:
        """The response, its body read only up to `cap` bytes (a longer one is dropped
        unread: nothing reads a peer-declared length before checking it)."""
        self.where = "waiting for the answer"
        try:
            r = self.conn.getresponse()
            ctype = (r.getheader("Content-Type") or "").split(";")[0].strip().lower()
            length = r.getheader("Content-Length")
            if length is not None and (not length.strip().isdigit() or int(length) > cap):
                body = b""
            else:
                body = r.read(cap + 1)
                body = body if len(body) <= cap else b""
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            self.check_cancelled()
            raise self._failure(e, "waiting for the answer") from None
        return Response(r.status, ctype, r.getheader("Retry-After"), body)

    def early_response(self, cap: int) -> Response | None:
        """After a failed send: the answer the server may have given before closing (a
        413 or 401 sent before the body was read), if it can still be read."""
        if self.conn.sock is None or self._tripped:
            return None
        with contextlib.suppress(OSError, ssl.SSLError, http.client.HTTPException, Retryable):
            self.conn.sock.settimeout(min(self.timeout, 5.0))
            return self.response(cap)
        return None

    def _failure(self, e: BaseException, where: str) -> Retryable | Permanent:
        if isinstance(e, http.client.HTTPException):
            return Retryable(f"the server at {self.host}:{self.port} closed the connection "
                             f"{where} ({type(e).__name__})")
        if isinstance(e, ssl.SSLError):
            permanent, text = classify_tls_error(e)
            return Permanent(text) if permanent else Retryable(f"{text} {where}")
        if isinstance(e, TimeoutError):
            return Retryable(f"no progress from the server at {self.host}:{self.port} within "
                             f"{self.timeout:g} s {where}")
        return Retryable(f"connection to the server at {self.host}:{self.port} failed {where}: "
                         f"{err_text(e)}")


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown: on an SSLSocket it only cuts the file descriptor,
    # which is what wakes a thread blocked in a TLS read or write.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
