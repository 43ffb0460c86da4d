"""systemd notification (Type=notify): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

Uses `sdnotify`, which does nothing when NOTIFY_SOCKET is unset (a foreground run), so
callers need no special case. READY=1 is sent only after recovery of the spool and
queue and once the listeners are bound; WATCHDOG=1 is sent by the working loops (see
`daemon.Daemon`) so that a stuck loop makes systemd restart the service.
"""

from __future__ import annotations

import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._n = sdnotify.SystemdNotifier()
        self.readied = False  # READY=1 sent by this process

    def ready(self, status: str) -> None:
        self._n.notify(f"READY=1\nSTATUS={status}")
        self.readied = True

    def watchdog(self) -> None:
        self._n.notify("WATCHDOG=1")

    def status(self, status: str) -> None:
        self._n.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self._n.notify("STOPPING=1")

    def reloading(self) -> None:
        """The daemon executes itself again (a desired config, ops/desired.py): systemd
        waits for READY=1 from the same PID instead of seeing the service stop."""
        self._n.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
