"""The daemon's control socket: `STATE/run/control.sock`, mode 0600.

Everything a local operator asks of the running daemon goes through here: `appliance
status` reads its status document, `appliance queue hold|release|retry|delete` ask it to
move items (the queue keeps one writer; see `queue.commands`). The operations center's
signed commands (ops/commands.py) call the same handlers in the daemon, with an `_operator`
argument naming the signing key; `_` arguments from the socket are dropped, so a local
client cannot pose as the operations center.

On the wire: the client sends one JSON object on one line, {"cmd": NAME, "args": {...}},
and reads one JSON object back, then EOF: {"ok": true, "result": ...} or
{"ok": false, "error": TEXT, "exit_code": N}. A request is at most MAX_REQUEST bytes and
must arrive within REQUEST_TIMEOUT_S; at most MAX_CLIENTS are served at once (more are
closed at once), so a stuck client costs one thread for a few seconds and nothing else.
Answers hold counters, states and opaque ids only, never patient data; an `ApplianceError`
becomes its message and exit code, anything else "internal error (TypeName)", logged.

How it fails: `request` returns None when no daemon listens (no socket, or refused), and
raises `DaemonUnavailable` when one listens but does not answer in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from appliance.core import errors
from appliance.core.errors import ApplianceError

log = structlog.get_logger("appliance.control")

MAX_REQUEST = 64 << 10
REQUEST_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for the socket file at path that fits sun_path: the path itself, or, when
    it is longer, /proc/self/fd/N/NAME through an O_PATH descriptor of its folder (what
    systemd does for long socket paths), so any appliance.state_dir works."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)

Handler = Callable[[dict[str, Any]], Any]


class DaemonUnavailable(ApplianceError):
    """The daemon's control socket exists but the daemon does not answer."""

    exit_code = errors.EX_UNAVAILABLE


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600: root and the service user only
        try:
            with unix_address(self.path) as address:
                s.bind(address)
        finally:
            os.umask(old)
        s.listen(16)
        self._sock = s
        threading.Thread(target=self._serve, name="control", daemon=True).start()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many at once: the client sees EOF and says so
                continue
            threading.Thread(target=self._client, args=(conn,), name="control-client",
                             daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT_S)
                answer = self._answer(_read_line(conn), _peer_uid(conn))
                conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except (OSError, ValueError) as e:
            log.warning("control.client_failed", error_type=type(e).__name__)
        finally:
            self._slots.release()

    def _answer(self, line: bytes, peer_uid: int | None = None) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd, args = req["cmd"], req.get("args", {})
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise TypeError
            args = {k: v for k, v in args.items() if not k.startswith("_")}
            args["_peer_uid"] = peer_uid  # who asks (SO_PEERCRED), for the audit trail
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request", "exit_code": errors.EX_USAGE}
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}", "exit_code": errors.EX_USAGE}
        try:
            return {"ok": True, "result": handler(args)}
        except ApplianceError as e:
            return {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except Exception as e:
            log.exception("control.command_failed", command=cmd, error_type=type(e).__name__)
            return {"ok": False, "error": f"internal error ({type(e).__name__})",
                    "exit_code": errors.EX_SOFTWARE}

    def stop(self) -> None:
        if self._sock:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of the Unix socket (SO_PEERCRED)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", creds)[1])


def operator_name(uid: int | None) -> str:
    """A local user's name for the audit trail ("uid N" when it has none)."""
    if uid is None:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return bytes(buf.split(b"\n", 1)[0])


class CommandFailed(ApplianceError):
    """The daemon refused or failed a command; carries the daemon's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def request(path: Path, cmd: str, args: dict[str, Any] | None = None,
            timeout: float = 30.0) -> Any:
    """Ask the daemon; its result, None when no daemon listens. Raises CommandFailed with
    the daemon's message and exit code, DaemonUnavailable when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            with unix_address(path) as address:
                s.connect(address)
            s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
            chunks = []
            while b := s.recv(65536):
                chunks.append(b)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise
    except OSError as e:  # timed out, reset: a daemon is there but hung or dying
        raise DaemonUnavailable(f"the appliance daemon did not answer on {path}"
                                f" ({type(e).__name__})") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise DaemonUnavailable(f"the appliance daemon did not answer on {path}"
                                " (closed without an answer: busy or stopping)") from None
    if not answer.get("ok"):
        raise CommandFailed(str(answer.get("error")), int(answer.get("exit_code", errors.EX_SOFTWARE)))
    return answer.get("result")
