"""The trial record: which slot an update put on trial, and what was true before it.

`appliance update` writes it (durably) after `rauc install` succeeded and before the
reboot; the mark-good unit reads it at each boot. A slot on trial is the only one the
gate may reject (mark bad and reboot): a failing gate on a slot that is not on trial
changes nothing, since the other slot may hold nothing better. The record stays until
its outcome is known: kept (removed at once), or rejected (removed at the next boot,
on the old slot, which also marks the new one bad if GRUB fell back by itself).
A record that cannot be parsed counts as no record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.core import durable

# On /data, beside RAUC's slot status; APPLIANCE_UPDATE_TRIAL moves it (tests only: the
# ops center's `update` command runs `install` in a worker process).
PATH = Path(os.environ.get("APPLIANCE_UPDATE_TRIAL", "/data/update/trial.json"))


@dataclass(frozen=True)
class Trial:
    slot: str  # the bootname RAUC installed into: A or B
    version: str  # the bundle's version (its manifest), for the log
    ops_link_was_up: bool
    # spoolcheck.SpoolAuth.failures before the install; None: not counted (the key was
    # unreadable) or a record written by a release that did not count.
    spool_failures: int | None = None


def read(path: Path | None = None) -> Trial | None:
    try:
        d = json.loads((path or PATH).read_text())
        failures = d.get("spool_failures")
        return Trial(slot=str(d["slot"]), version=str(d["version"]),
                     ops_link_was_up=bool(d["ops_link_was_up"]),
                     spool_failures=failures if type(failures) is int else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write(trial: Trial, path: Path | None = None) -> None:
    path = path or PATH
    durable.make_dirs(path.parent)
    durable.atomic_write(path, json.dumps(asdict(trial)).encode())


def clear(path: Path | None = None) -> None:
    durable.unlink_durable(path or PATH)
