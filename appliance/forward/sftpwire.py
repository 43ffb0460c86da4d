"""The SFTP protocol pieces under the `sftp` transport (forward/sftp.py) that reach into
paramiko's internals: a client that keeps the extensions the server announced, the write
size the server takes, and a pipeline of writes whose every answer is checked.

Owns nothing on disk. Fails as paramiko does (OSError for a failure status, SFTPError
for a protocol error); forward/sftp.py turns those into the transport's errors. Checked
against paramiko 5.0 and 5.1 (the private methods used: `_send_version`, `_request`,
`_async_request`, `_read_response`, `_async_response`).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import paramiko
from paramiko.sftp import (
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_INIT,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_OK,
    int64,
)

from appliance.forward import bandwidth

PACKET = 32 * 1024  # OpenSSH's own channel packet size, and the write every server takes
_MAX_WRITE = 255 * 1024  # the most we put in one write request (OpenSSH's own limit)
_IN_FLIGHT = 64  # write requests unanswered at most (OpenSSH sftp's default, -R 64)


class Sftp(paramiko.SFTPClient):  # type: ignore[misc]
    """paramiko's client, keeping the extensions the server announced in its VERSION
    packet (paramiko reads and drops them): fsync and posix-rename are used only where
    offered. Overrides `_send_version` (paramiko 5.0, 5.1: the SFTPClient init step)."""

    extensions: frozenset[str] = frozenset()

    def _send_version(self) -> int:
        m = paramiko.Message()
        m.add_int(3)
        self._send_packet(CMD_INIT, m)
        t, data = self._read_packet()
        if t != CMD_VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        msg = paramiko.Message(data)
        version: int = msg.get_int()
        names = []
        while msg.get_remainder():  # (name, data) string pairs, as many as the server sends
            names.append(msg.get_text())
            msg.get_binary()
        self.extensions = frozenset(names)
        return version


def write_size(sftp: Sftp) -> int:
    """Bytes per write request: what the server says it takes (`limits@openssh.com`,
    OpenSSH 8.7+: 255 KiB), else the 32 KiB every server must take. Fewer, larger
    requests are what keeps a long link busy at a given number in flight."""
    if "limits@openssh.com" not in sftp.extensions:
        return PACKET
    t, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
    if t != CMD_EXTENDED_REPLY:
        return PACKET
    msg.get_int64()  # max packet length
    msg.get_int64()  # max read length
    most: int = msg.get_int64()
    return max(PACKET, min(most, _MAX_WRITE)) if most else PACKET


class Pipeline:
    """Writes at increasing offsets with up to `_IN_FLIGHT` requests unanswered, and
    checks every answer, in order, raising on the first failure.

    Not paramiko's own pipelining (`SFTPFile.set_pipelined`): that one waits for *every*
    outstanding answer once 100 are out, leaving the link idle for a round trip each
    time, and drops unchecked an answer it reads while waiting for another request (a
    full disk near the end of a file would go unnoticed). Uses paramiko's request
    plumbing (`_async_request`, `_read_response`), as its own SFTPFile does; answers the
    server sends out of order are kept by `_async_response` until their turn.
    """

    def __init__(self, sftp: Sftp, handle: bytes, offset: int, size: int, cap: bandwidth.Cap,
                 cancelled: threading.Event) -> None:
        self.sftp, self.handle, self.offset, self.size = sftp, handle, offset, size
        self.cap, self.cancelled = cap, cancelled
        self.pending: deque[int] = deque()
        self.early: dict[int, tuple[int, Any]] = {}

    def write(self, data: memoryview) -> None:
        for i in range(0, len(data), self.size):
            piece = bytes(data[i:i + self.size])
            self.cap.take(len(piece), self.cancelled)  # the destination's max_kbit_s
            self.pending.append(self.sftp._async_request(self, CMD_WRITE, self.handle,
                                                         int64(self.offset), piece))
            self.offset += len(piece)
            while len(self.pending) > _IN_FLIGHT:
                self._answer()

    def finish(self) -> None:
        while self.pending:
            self._answer()

    def _answer(self) -> None:
        num = self.pending.popleft()
        if num in self.early:
            t, msg = self.early.pop(num)
            if t == CMD_STATUS:
                self._check(msg)
        else:
            t, _ = self.sftp._read_response(num)  # raises IOError on a failure status
        if t != CMD_STATUS:
            raise paramiko.SFTPError("the server answered a write with something else")

    @staticmethod
    def _check(msg: Any) -> None:
        code, text = msg.get_int(), msg.get_text()
        if code != SFTP_OK:
            raise OSError(text)  # as paramiko's _convert_status does for a failure

    def _async_response(self, t: int, msg: Any, num: int) -> None:
        """paramiko calls this for an answer read while it waited for another one."""
        self.early[num] = (t, msg)
