"""The local status socket: `STATE/run/status.sock`, mode 0600.

A client connects and reads one JSON document (then EOF); nothing is read from the
client, so there is no request parsing to get wrong. `appliance status` uses it to show
live counters while the daemon runs. The document holds counters, addresses and opaque
ids only, never patient data.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from appliance.core.errors import StateError

log = structlog.get_logger("appliance.status")


class StatusServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if len(bytes(self.path)) > 107:  # sockaddr_un.sun_path
            raise StateError(f"the status socket path {self.path} is longer than 107 bytes;"
                             " use a shorter appliance.state_dir")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(8)
        self._sock = s
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(json.dumps(self.snapshot(), default=str).encode())
                except Exception as e:
                    log.warning("status.send_failed", error_type=type(e).__name__)

    def stop(self) -> None:
        if self._sock:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query(path: Path, timeout: float = 5.0) -> dict[str, Any] | None:
    """Read the daemon's status document, or None if no daemon is listening."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            chunks = []
            while b := s.recv(65536):
                chunks.append(b)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
