"""A TCP link that has gone silent, told apart from a peer that is merely slow: shared by
the transports (dicom, sftp).

A cut link on a WAN (a partition, a NAT that forgot us, a dead 4G modem) often sends
nothing back: no RST, no ICMP, the connection stays open and a blocked send or read waits
out the transport's whole `timeout_s` (a minute) before anyone learns the destination is
gone. `watch_link` turns keep-alives on, and `link_silent` reads the kernel's TCP_INFO to
say whether anything owed has been acknowledged within `link_timeout_s`.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios

KEEPALIVE_S = 1  # idle seconds before a keep-alive, and between keep-alives (see watch_link)


def watch_link(sock: socket.socket, link_timeout: float) -> None:
    """Keep-alives every KEEPALIVE_S while nothing is in flight (waiting for a response),
    so that `link_silent` can tell a dead link from a PACS that is thinking. The kernel's
    own give-up (TCP_KEEPCNT unanswered, ETIMEDOUT) comes a little after `link_timeout`,
    as a backstop. (Not TCP_USER_TIMEOUT: it also ends a connection whose peer keeps its
    window shut that long - a PACS that is slow to read - which is `timeout_s`'s call.)"""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(link_timeout / KEEPALIVE_S) + 2)


# struct tcp_info (linux/tcp.h) up to tcpi_last_ack_recv: 8 bytes, then 13 u32
_TCP_INFO = struct.Struct("8B13I")


def link_silent(sock: socket.socket, link_timeout: float) -> bool:
    """Whether nothing has come back over `sock`'s link for `link_timeout` s although
    something was owed: data in flight unacknowledged (the kernel is retransmitting it),
    or keep-alives unanswered while all was sent. Never while the peer's window is shut
    (data queued, none in flight): its machine answers the window probes, so the link
    is up and the PACS merely slow to read."""
    try:
        info = _TCP_INFO.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                     _TCP_INFO.size))
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (OSError, struct.error, ValueError):
        return False  # closed: the other checks say why
    probes, unacked, last_ack_ms = info[3], info[12], info[20]
    if last_ack_ms < link_timeout * 1000:
        return False
    return bool(unacked > 0 or (probes > 0 and queued == 0))
