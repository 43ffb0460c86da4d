"""How many spool entries fail authentication: the health gate's "no spool entry newly
fails authentication" (docs/updates.md).

`appliance update` counts before the install (the old software reading the spool) and
writes the count into the trial record; the mark-good unit counts again on the new slot
(the new software reading the same files) and the gate rejects the slot if the count
grew. The count is the sealed files in `STATE/spool/` that do not authenticate, plus the
spool files in `STATE/quarantine/` (the daemon moves a file there when recovery or the
packer finds it fails: that file has left the spool but still counts). Each file is
authenticated streaming, chunk by chunk (never held whole); a file the daemon removes
while it is read (packed meanwhile) is not a failure. Names only, never content, reach a
log line: the count is all this module returns.

How it fails: a spool key that cannot be read raises KeyFileError (the daemon will not
start either, so the gate rejects on its unit state).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.core import crypto, durable
from appliance.core.errors import IntegrityError

BUNDLE_MARK = ".bundle."  # queue/store.py names quarantined bundles <id>.bundle.<time>


@dataclass(frozen=True)
class SpoolAuth:
    failing: int  # sealed files in the spool that do not authenticate now
    quarantined: int  # spool files in the quarantine directory
    checked: int  # files authenticated (for the log line)
    seconds: float

    @property
    def failures(self) -> int:
        return self.failing + self.quarantined


def quarantined(state_dir: Path) -> int:
    """Spool files kept in STATE/quarantine/ (bundles there are not counted)."""
    try:
        return sum(1 for p in (state_dir / "quarantine").iterdir()
                   if p.is_file() and BUNDLE_MARK not in p.name)
    except FileNotFoundError:
        return 0


def _authenticates(key: crypto.SpoolKey, path: Path) -> bool | None:
    """True / False; None when the file went away meanwhile (packed, or quarantined)."""
    try:
        with path.open("rb") as f:
            collections.deque(crypto.open_spool_file(key, path.name, f), maxlen=0)
    except FileNotFoundError:
        return None
    except IntegrityError:
        # Moved to quarantine while we read it: counted there, not twice.
        return None if not path.exists() else False
    return True


def count(state_dir: Path, key: crypto.SpoolKey) -> SpoolAuth:
    started = time.monotonic()
    failing = checked = 0
    spool = state_dir / "spool"
    names = sorted(p.name for p in spool.iterdir()) if spool.is_dir() else []
    for name in names:
        if name.startswith(durable.TEMP_PREFIX):
            continue
        ok = _authenticates(key, spool / name)
        if ok is None:
            continue
        checked += 1
        failing += not ok
    # Counted after the spool, so a file quarantined while we read it is counted there.
    return SpoolAuth(failing=failing, quarantined=quarantined(state_dir), checked=checked,
                     seconds=time.monotonic() - started)


def count_for(state_dir: Path, key_file: Path) -> SpoolAuth:
    return count(state_dir, crypto.load_spool_key(key_file))
