"""The audit trail as a CLI command writes it (`keys init`, `audit show`, `update`,
`update-gate`: what the operator does on the box itself, beside the daemon's events).

`record(cfg, write)` opens the trail (appliance/audit/trail.py; the flock there keeps the
daemon's and the command's lines whole) and writes one event as the user running the
command (by uid: `operator_name`). A trail that cannot be opened (no spool key yet, a
state directory this user may not write) is said on stderr and never stops the command:
the audit trail never stands in the way of the work, as in the daemon.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from appliance.audit import AuditTrail
from appliance.audit.trail import for_config
from appliance.core.config import Config
from appliance.core.errors import ApplianceError
from appliance.health.control import operator_name


def operator() -> str:
    return operator_name(os.getuid())


def record(cfg: Config, write: Callable[[AuditTrail], bool]) -> bool:
    try:
        trail = for_config(cfg)
    except (OSError, ApplianceError) as e:
        print(f"audit trail not written: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    if not write(trail):
        print("audit trail not written (see the log: audit.write_failed)", file=sys.stderr)
        return False
    return True
