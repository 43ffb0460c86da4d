"""Routes and copies: where a queue item may go (docs/architecture.md, "Copy destinations
and routing rules").

A route is the list of destination names a routing rule gave a study, kept in
`segments.route` as ",center-b,archive," (NULL: every destination), so that SQL can ask
whether it names a destination (`instr`). A copy of a bundle for a `mode = "copy"`
destination is an item of its own whose id `copy_id` derives from the bundle's. Pure
but for `set_route`, which writes the column inside the spool's transaction; names are
config names, never patient data.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence


def text(route: Sequence[str]) -> str:
    """A route as the index keeps it."""
    return f",{','.join(route)},"


def names(stored: str | None) -> tuple[str, ...] | None:
    """A route as the index keeps it, back to its names (None: every destination)."""
    return tuple(n for n in stored.split(",") if n) if stored else None


def copy_id(bundle_id: str, destination: str) -> str:
    """The id of a bundle's copy for `destination`: opaque, alphanumeric, stable."""
    return f"{bundle_id}c{hashlib.sha256(destination.encode()).hexdigest()[:8]}"


def set_route(conn: sqlite3.Connection, study_key: str, route: Sequence[str]) -> int:
    """A routing rule named destinations for the study (inside the spool's transaction):
    its segments without a route that have not been sent or copied yet get it. The
    first route a study gets stays (as the first matching rule decides). Returns the count."""
    cur = conn.execute("UPDATE segments SET route=? WHERE study_key=? AND parent IS NULL AND"
                       " route IS NULL AND copied=0 AND state IN ('receiving', 'sealed', 'ready',"
                       " 'deferred', 'held')", (text(route), study_key))
    return cur.rowcount


def claimable(up: list[str], copies: list[str]) -> tuple[str | None, list[str]]:
    """The SQL condition (and its arguments) for items that can go somewhere now: pinned
    to a copy destination that is up, or routed to (no route: any) failover destination
    that is up. None: nowhere to go."""
    parts: list[str] = []
    args: list[str] = []
    if up:
        routed = " OR ".join("instr(route, ?) > 0" for _ in up)
        parts.append(f"(copy_to IS NULL AND (route IS NULL OR {routed}))")
        args += [f",{n}," for n in up]
    if copies:
        parts.append(f"copy_to IN ({','.join('?' * len(copies))})")
        args += copies
    return (" OR ".join(parts) if parts else None), args
