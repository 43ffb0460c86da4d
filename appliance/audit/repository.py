"""The audit trail sent on to the hospital's audit record repository: syslog over TLS.

DICOM PS3.15 A.6 (Audit Trail Message Transmission Profile - SYSLOG-TLS) and IHE ITI-20:
each AuditMessage of the local trail is one RFC 5424 syslog message (PRI facility 10,
security/authorization; severity 5, notice, or 4, warning, when the event's outcome is a
failure; MSGID "IHE+RFC-3881" as ITI-20 asks, which PS3.15 allows; no structured data;
the XML as MSG, UTF-8 after a BOM), framed for TLS as RFC 5425 says: octet counting,
"MSG-LEN SP SYSLOG-MSG", over TLS 1.2 or newer, the repository's certificate checked
against `audit.syslog_ca` and its name against `audit.syslog_host`, with this box's
client certificate if one is configured.

Written on the stdlib (`ssl`, `socket`): `logging.handlers.SysLogHandler` speaks RFC 3164
over UDP or plain TCP (newline framed), not RFC 5425 (no TLS, no octet counting, no
RFC 5424 header), and no well-kept library adds a durable cursor; the framing is a few
lines (`frame`).

The sealed local trail (trail.py) is the source of truth and the queue: a `Cursor`
(the first line of a file names it, so a rotation does not lose the place; an offset in
it) is kept in `STATE/audit/repository-cursor.json` and moved on, durably, after each
batch of at most BATCH messages written to the socket. So a repository down for a day
gets everything later, oldest first (as long as rotation kept it: a cursor whose file
was rotated away restarts at the oldest file, counted in `gaps` and logged), and a
restart resends at most one batch. The queue is as bounded as the trail (max_mb x files).
RFC 5425 has no acknowledgement: messages written into a connection that then breaks
may be lost; the sender checks, before each batch, that the repository has not closed
the connection, which is how an idle connection usually ends, and after each handshake
waits SETTLE_S for a repository that refuses this box's client certificate (or its
absence) only then, by an alert or by closing.

`Sender` runs on its own thread, the supervisor's `audit` stage (a dead thread, or a
send past its deadlines, withholds the watchdog like any stage): it never blocks
receiving or forwarding (the trail's write only sets an event). Connect, handshake and
each write have a deadline (TIMEOUT_S); a failure closes the connection and waits
(back-off from 1 s doubling to BACKOFF_MAX_S; new messages do not cut it short).
`status()`: running, connected, sent, waiting, gaps, the last error's class and when.
Logs name the error class and the TLS library's reason (a certificate name that does
not match, an unknown CA): never a message, which holds patient IDs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from appliance.audit import trail as audit_trail
from appliance.core import durable
from appliance.core.config import Audit
from appliance.core.errors import KeyFileError
from appliance.health.supervisor import Stage

log = structlog.get_logger("appliance.audit")

CURSOR_FILE = "repository-cursor.json"
BATCH = 200  # messages written before the cursor is made durable
TIMEOUT_S = 15.0  # connect, TLS handshake, each write
BACKOFF_MIN_S = 0.5  # doubled at each failure: the first wait is 1 s
BACKOFF_MAX_S = 60.0
STOP_WAIT_S = 5.0  # at the daemon's stop: how long the sender may take to send what waits
SETTLE_S = 1.0  # after a handshake: how long a repository may take to end the session
POLL_S = 1.0  # another process (the CLI) may write the trail: looked at this often
MAX_LINE = 16 << 20  # a trail line longer than this is not ours: skipped, never read whole

FACILITY = 10  # security/authorization messages (PS3.15 A.6, ITI-20)
NOTICE, WARNING = 5, 4
APP_NAME = "appliance"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"


# --- the syslog message (pure) ---------------------------------------------------------


_WHEN = re.compile(rb'EventDateTime="([0-9T:.+Z-]{10,40})"')
_OUTCOME = re.compile(rb'EventOutcomeIndicator="([0-9]+)"')
_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def frame(message: bytes, hostname: str, procid: str = "-") -> bytes:
    """One AuditMessage as RFC 5425 sends it: "LEN SP" then the RFC 5424 message. Its
    TIMESTAMP is the event's EventDateTime; severity 4 for a failed event, else 5."""
    when = _WHEN.search(message)
    outcome = _OUTCOME.search(message)
    severity = NOTICE if outcome is None or outcome.group(1) == b"0" else WARNING
    stamp = when.group(1).decode() if when else _now()
    header = (f"<{FACILITY * 8 + severity}>1 {stamp} {_field(hostname, 255)} {APP_NAME}"
              f" {_field(procid, 128)} {MSGID} - ").encode("ascii")
    body = header + BOM + message
    return str(len(body)).encode() + b" " + body


def _field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no spaces, 1..limit long, or "-"."""
    return _PRINTUSASCII.sub("_", value)[:limit] or "-"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the place in the trail ------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    file: str  # the SHA-256 (hex, 32) of the file's first line: it survives rotation
    offset: int


class Cursor:
    """Where the repository's copy of the trail ends, and the messages after it."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.dir = directory
        self.key = key
        self.path = directory / CURSOR_FILE
        self.gaps = 0  # times the place was rotated away before it was sent
        self.unreadable = 0  # lines that did not open (a crash cut them): skipped
        self.position = self._load()
        self._saved = self.position
        # name -> (bytes counted, lines in them): `waiting` counts each byte about twice
        # in its life, not at each call (the files only grow, and rotated ones not at all)
        self._total: dict[str, tuple[int, int]] = {}
        self._before: dict[str, tuple[int, int]] = {}

    def _load(self) -> Position | None:
        try:
            d = json.loads(self.path.read_text())
            return Position(str(d["file"]), int(d["offset"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("audit.repository_cursor_unreadable", error=type(e).__name__)
            return None

    def save(self) -> None:
        if self.position is None or self.position == self._saved:
            return
        data = json.dumps({"file": self.position.file, "offset": self.position.offset})
        durable.atomic_write(self.path, data.encode(), mode=0o600)
        self._saved = self.position

    def files(self) -> list[tuple[str, Path]]:
        """The trail's files, oldest first, each with its name (first line's digest);
        a file without a whole line yet is left out."""
        paths = sorted(self.dir.glob(audit_trail.FILE + ".*"),
                       key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
        paths = [p for p in paths if p.suffix[1:].isdigit()] + [self.dir / audit_trail.FILE]
        out = []
        for p in paths:
            try:
                with p.open("rb") as f:
                    first = f.readline(MAX_LINE)
            except FileNotFoundError:
                continue
            if first.endswith(b"\n"):
                out.append((hashlib.sha256(first).hexdigest()[:32], p))
        return out

    def _start(self, files: list[tuple[str, Path]]) -> int:
        """The index of the cursor's file in `files` (the oldest, 0, if it is gone)."""
        if self.position is None:
            return 0
        for i, (name, _) in enumerate(files):
            if name == self.position.file:
                return i
        self.gaps += 1
        log.warning("audit.repository_gap", gaps=self.gaps,
                    why="the file the cursor was in was rotated away before it was sent")
        self.position = None
        return 0

    def read(self, limit: int = BATCH) -> list[tuple[bytes, Position]]:
        """The next messages after the cursor (at most `limit`), each with the position
        after it; the cursor does not move (`advance` does)."""
        files = self.files()
        out: list[tuple[bytes, Position]] = []
        i = self._start(files)
        offset = self.position.offset if self.position is not None else 0
        while i < len(files) and len(out) < limit:
            name, path = files[i]
            if not self._read_file(path, name, offset, limit, out) or i + 1 == len(files):
                break  # the batch is full, an unreadable line waits for the next, or the end
            i, offset = i + 1, 0
            if not out:  # a rotated file fully sent: the cursor moves to the next
                self.position = Position(files[i][0], 0)
        return out

    def _read_file(self, path: Path, name: str, offset: int, limit: int,
                   out: list[tuple[bytes, Position]]) -> bool:
        """Messages of one file from `offset` into `out`; True if it was read to its end."""
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return True
        with f:
            f.seek(offset)
            while len(out) < limit:
                line = f.readline(MAX_LINE)
                if not line.endswith(b"\n"):
                    return True  # the end, or a line being written
                offset += len(line)
                message = audit_trail.open_line(line, self.key)
                if message is None:
                    if out:  # counted and passed over when it is first in a batch
                        return False
                    self.unreadable += 1
                    log.error("audit.repository_line_unreadable", unreadable=self.unreadable)
                    self.position = Position(name, offset)
                    continue
                out.append((message, Position(name, offset)))
        return False

    def advance(self, to: Position) -> None:
        self.position = to

    def waiting(self) -> int:
        """Messages after the cursor (whole lines; counted, not opened)."""
        files = self.files()
        i = self._start(files)
        names = {name for name, _ in files}
        for cache in (self._total, self._before):
            for gone in set(cache) - names:
                del cache[gone]
        n = 0
        try:
            for name, path in files[i:]:
                n += _count(self._total, name, path, path.stat().st_size)
            if self.position is not None and files and files[i][0] == self.position.file:
                n -= _count(self._before, files[i][0], files[i][1], self.position.offset)
        except FileNotFoundError:  # rotated while counted: the next count is right
            pass
        return max(n, 0)


def _count(cache: dict[str, tuple[int, int]], name: str, path: Path, upto: int) -> int:
    """Newlines in the first `upto` bytes of `path`, counting on from what `cache` has."""
    done, lines = cache.get(name, (0, 0))
    if upto < done:
        done, lines = 0, 0
    if upto > done:
        with path.open("rb") as f:
            f.seek(done)
            while done < upto and (chunk := f.read(min(1 << 20, upto - done))):
                lines += chunk.count(b"\n")
                done += len(chunk)
    cache[name] = (done, lines)
    return lines


# --- the connection ----------------------------------------------------------------------


def tls_context(cfg: Audit) -> ssl.SSLContext:
    """TLS 1.2+, the repository checked against syslog_ca and its name; this box's client
    certificate if configured. A file that does not load is a KeyFileError (exit 66)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.syslog_ca))
        if cfg.syslog_cert is not None and cfg.syslog_key is not None:
            ctx.load_cert_chain(str(cfg.syslog_cert), str(cfg.syslog_key))
    except (OSError, ssl.SSLError) as e:
        raise KeyFileError(f"audit.syslog_ca / syslog_cert / syslog_key: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def error_class(e: BaseException, timeout_s: float = TIMEOUT_S) -> tuple[str, str]:
    """(class, reason) of a failure, for status and the log: no message content."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return "certificate", str(e.verify_message or e.reason or "verify failed")
    if isinstance(e, ssl.SSLError):
        return "tls", str(e.reason or type(e).__name__)
    if isinstance(e, socket.gaierror):
        return "dns", "the repository's name does not resolve"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout", f"no answer within {timeout_s:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "refused", "connection refused"
    if isinstance(e, ConnectionAbortedError) and e.args and not e.errno:
        return "closed", str(e.args[0])
    if isinstance(e, ConnectionError | EOFError):
        return "closed", type(e).__name__
    return "network", os.strerror(e.errno) if isinstance(e, OSError) and e.errno else type(e).__name__


def _settle(sock: ssl.SSLSocket, wait_s: float, timeout_s: float) -> None:
    """Raise if the repository ends the session just after the handshake: a repository
    that wants a client certificate (and got none, or one it does not trust) says so only
    then, by an alert or by closing (TLS 1.3; rsyslog's gtls x509/certvalid closes), and
    what was written before would be lost without a word."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    if not readable:
        return
    sock.setblocking(False)
    try:
        got = sock.recv(1)
    except ssl.SSLWantReadError:
        return  # session tickets, no data: the session stands
    finally:
        sock.settimeout(timeout_s)
    if got == b"":
        raise ConnectionAbortedError("the repository ended the session after the TLS handshake"
                                     " (does it want this box's client certificate?)")


def _closed_by_peer(sock: ssl.SSLSocket, timeout_s: float) -> bool:
    """The repository sends nothing: a readable socket means it closed (or failed)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        finally:
            sock.settimeout(timeout_s)
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True


# --- the sender ------------------------------------------------------------------------------


class Sender:
    """Sends the trail in `directory` (sealed under `key`) to the repository of `cfg`."""

    def __init__(self, cfg: Audit, directory: Path, key: bytes, hostname: str,
                 backoff_max_s: float = BACKOFF_MAX_S, timeout_s: float = TIMEOUT_S,
                 stage: Stage | None = None) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.stage = stage
        self.backoff_max_s = backoff_max_s
        self.host = cfg.syslog_host
        self.port = cfg.syslog_port
        self.hostname = hostname
        self.context = tls_context(cfg)
        self.cursor = Cursor(directory, key)
        self.sent = 0
        self.waiting = 0
        self.connected = False
        self.last_error: str | None = None
        self.last_error_reason: str | None = None
        self.last_error_at: float | None = None
        self._sock: ssl.SSLSocket | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = BACKOFF_MIN_S

    def wake(self) -> None:
        """A message was written to the trail (AuditTrail.on_write): send it soon."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-repository", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return  # stuck in a write past its deadline: a daemon thread, left behind
        self._close(graceful=True)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "running": self.alive(), "connected": self.connected,
                "sent": self.sent, "waiting": self.waiting, "gaps": self.cursor.gaps,
                "unreadable": self.cursor.unreadable, "last_error": self.last_error,
                "last_error_reason": self.last_error_reason, "last_error_at": self.last_error_at}

    def _run(self) -> None:
        log.info("audit.repository_started", host=self.host, port=self.port)
        while not self._stop.is_set():
            try:
                with self.stage.job("audit") if self.stage else contextlib.nullcontext():
                    progressed = self.step()
            except Exception as e:  # noqa: BLE001 - the thread must go on; the class is logged
                self._failed(e)
                progressed = False
            if self.last_error is not None and not self.connected:
                self._stop.wait(self._backoff)  # new messages do not shorten a back-off
            elif not progressed:
                self._wake.wait(POLL_S)
                self._wake.clear()
        if self.connected:  # at a stop: what is waiting (the stop's own message), one batch
            with contextlib.suppress(Exception):
                self.step()
        log.info("audit.repository_stopped", sent=self.sent, waiting=self.waiting)

    def step(self) -> bool:
        """Send one batch; True if something was sent (more may wait)."""
        batch = self.cursor.read(BATCH)
        if not batch:
            self.waiting = 0
            self.cursor.save()  # a rotated file passed over, or an unreadable line
            return False
        try:
            sock = self._connection()
            for message, after in batch:
                sock.sendall(frame(message, self.hostname, str(os.getpid())))
                self.cursor.advance(after)
                self.sent += 1
                if self.stage is not None:
                    self.stage.beat()
        except (OSError, ssl.SSLError, EOFError) as e:
            self._failed(e)
            self.waiting = self.cursor.waiting()
            return False
        finally:
            self.cursor.save()
        self.waiting = self.cursor.waiting()
        return True

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and _closed_by_peer(self._sock, self.timeout_s):
            self._close()
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            try:
                self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
            self._sock.settimeout(self.timeout_s)
            _settle(self._sock, SETTLE_S, self.timeout_s)
            was = self.last_error
            self.connected, self.last_error, self._backoff = True, None, BACKOFF_MIN_S
            self.last_error_reason = None
            log.info("audit.repository_connected", host=self.host, port=self.port,
                     after_error=was, waiting=self.waiting)
        return self._sock

    def _failed(self, e: BaseException) -> None:
        cls, reason = error_class(e, self.timeout_s)
        if (cls, reason) != (self.last_error, self.last_error_reason):
            log.warning("audit.repository_failed", host=self.host, port=self.port, error=cls,
                        reason=reason, waiting=self.waiting)
        self.last_error, self.last_error_reason, self.last_error_at = cls, reason, time.time()
        self._close()
        self._backoff = min(self._backoff * 2, self.backoff_max_s)

    def _close(self, graceful: bool = False) -> None:
        self.connected = False
        if self._sock is not None:
            with contextlib.suppress(OSError, ValueError):
                if graceful:  # TLS close_notify: the repository sees an orderly end
                    self._sock.unwrap()
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
