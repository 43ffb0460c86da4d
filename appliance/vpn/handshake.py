"""The VPN's latest handshake, as the unprivileged daemon can know it.

Asking WireGuard (netlink, or wireguard-go's control socket) needs CAP_NET_ADMIN, which
the daemon does not have and should not get. So a root oneshot on a timer
(appliance-vpn-handshake.timer, every WRITTEN_EVERY_S) writes what
`wg show all latest-handshakes` prints to HANDSHAKES (tab-separated lines
`INTERFACE PEER_PUBLIC_KEY EPOCH_SECONDS`, 0 = never), by rename, and the daemon reads
that file (at most MAX_BYTES) when it builds its status: `parse` and `view` are pure,
`read` is the I/O edge.

What a reading says (`view`): `up` is true when the handshake with the configured peer
is younger than REJECT_AFTER_S (WireGuard's REJECT_AFTER_TIME: an older session can
carry nothing, and a live tunnel with keepalive shakes hands every 2 minutes), false
when older or never, and null when the file is missing, unreadable or older than
STALE_AFTER_S (the timer has stopped: the truth is unknown, so nothing is claimed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HANDSHAKES = Path("/run/appliance-vpn/latest-handshakes")
MAX_BYTES = 64 * 1024
WRITTEN_EVERY_S = 20  # appliance-vpn-handshake.timer's OnUnitActiveSec= (a test checks)
STALE_AFTER_S = 3 * WRITTEN_EVERY_S
REJECT_AFTER_S = 180


def parse(text: str, interface: str) -> dict[str, int]:
    """Peer public key -> latest handshake (epoch seconds, 0 = never) on `interface`."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split("\t")
        if len(f) == 3 and f[0] == interface and f[2].isdigit():
            out[f[1]] = int(f[2])
    return out


def view(text: str | None, file_age_s: float | None, interface: str, peer: str,
         now: float) -> dict[str, Any]:
    """What `status` and the ops `state` say about the tunnel (see the module docstring)."""
    out: dict[str, Any] = {"interface": interface, "up": None, "handshake_age_s": None}
    if text is None or file_age_s is None:
        return {**out, "reading": "missing"}
    if file_age_s > STALE_AFTER_S:
        return {**out, "reading": "stale", "reading_age_s": round(file_age_s)}
    handshakes = parse(text, interface)
    if peer not in handshakes:
        return {**out, "reading": "no interface" if not handshakes else "no peer"}
    at = handshakes[peer]
    if at == 0:
        return {**out, "up": False, "reading": "ok"}
    age = max(0.0, now - at)
    return {**out, "up": age < REJECT_AFTER_S, "handshake_age_s": round(age), "reading": "ok"}


def read(interface: str, peer: str, now: float, path: Path = HANDSHAKES) -> dict[str, Any]:
    """`view` of the file the timer writes (missing or unreadable: reading "missing")."""
    try:
        with path.open("rb") as f:
            age = now - os.fstat(f.fileno()).st_mtime
            data = f.read(MAX_BYTES)
    except OSError:
        return view(None, None, interface, peer, now)
    return view(data.decode("ascii", errors="replace"), age, interface, peer, now)
