"""Failpoints: named places where a test can make the daemon hang or fail on purpose.

Off unless the environment variable APPLIANCE_FAILPOINTS names a directory (nothing in
production sets it; the unit does not). Then `hit(name)` looks for a file of that name
in the directory; its content says what to do:

    hang    block here while the file exists (the default for an empty file)
    raise   raise FailpointError once per hit

This is how the tests show that a stuck stage withholds the systemd watchdog and that
the restart loses nothing, without a special build: the file is created and removed
from outside (even from the host into a container). The cost when off is one
`os.environ.get` per hit; hits sit at per-segment and per-attempt places, never per PDU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

log = structlog.get_logger("appliance.failpoints")

ENV = "APPLIANCE_FAILPOINTS"
POLL_S = 0.2


class FailpointError(RuntimeError):
    """Raised by a failpoint set to 'raise' (tests only)."""


def hit(name: str) -> None:
    where = os.environ.get(ENV)
    if not where:
        return
    path = Path(where) / name
    try:
        action = path.read_text(encoding="ascii").strip() or "hang"
    except (FileNotFoundError, NotADirectoryError):
        return
    except (OSError, UnicodeError):
        action = "hang"
    log.warning("failpoint.hit", failpoint=name, action=action)
    if action == "raise":
        raise FailpointError(name)
    while path.exists():
        time.sleep(POLL_S)
