"""What the queue's rows read as: `Item` (a segment or bundle), `DestinationRow` (a
destination's saved health), `AwaitingReceipt`, the priorities, and `backoff` (pure).

Owns nothing on disk: these are read from the queue index (`queue.index`) by `Queue`
(queue/store.py), which re-exports every name here. `_item` turns a `segments` row into
an `Item`. Nothing here writes, logs or fails on its own.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass

from appliance.queue import routes

PRIORITY_STAT = 10
PRIORITY_ROUTINE = 0


def backoff(attempts: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before the next attempt: exponential in attempts, full jitter, clamped.

    attempt 1 waits up to min_s, attempt n up to min_s * 2**(n-1), never more than max_s
    and never less than min_s / 2 (so a flapping peer is not hammered).
    """
    ceiling = min(max_s, min_s * (2 ** max(0, attempts - 1)))
    return max(min_s / 2, rng.uniform(0, ceiling))


@dataclass(frozen=True)
class DestinationRow:
    """A destination's health as the index keeps it (the `destinations` table)."""

    up: bool
    since: float
    failures: int
    probes: int
    last_error: str | None
    next_probe: float


@dataclass(frozen=True)
class AwaitingReceipt:
    """A bundle (or a copy of one) delivered to a destination with receipts, whose
    receipt has not come. `bundle_id`: the bundle file uploaded, which the center's
    receipt names (a copy's parent; the item itself otherwise)."""

    item_id: str
    delivered: float
    instances: int
    bundle_id: str


@dataclass(frozen=True)
class Item:
    id: str
    study_key: str
    state: str
    priority: int
    instances: int
    bytes: int
    bundle_bytes: int
    attempts: int
    next_attempt: float
    created: float
    updated: float
    reason: str | None
    destination: str | None
    progress: int
    parent: str | None = None  # a parked instance: the bundle whose file holds it
    only_index: int | None = None  # ... and its index in that bundle's manifest
    incomplete: int = 0  # acknowledged instances that could not be read back at packing
    route: tuple[str, ...] | None = None  # the destinations a rule named; None: all
    copy_to: str | None = None  # a copy (or a parked instance of one): its one destination

    @property
    def bundle_id(self) -> str:
        """The id of the bundle file that holds this item's instances."""
        return self.parent or self.id

    @property
    def is_copy(self) -> bool:
        """A copy of a bundle for a copy destination (not a parked instance)."""
        return self.copy_to is not None and self.only_index is None

def _item(r: sqlite3.Row) -> Item:
    g = r.__getitem__
    return Item(id=g("id"), study_key=g("study_key"), state=g("state"), priority=g("priority"),
                instances=g("instances"), bytes=g("bytes"), bundle_bytes=g("bundle_bytes") or 0,
                attempts=g("attempts"), next_attempt=g("next_attempt"), created=g("created"),
                updated=g("updated"), reason=g("reason"), destination=g("destination"),
                progress=g("progress") or 0, parent=g("parent"), only_index=g("only_index"),
                incomplete=g("incomplete") or 0,
                route=routes.names(g("route")),
                copy_to=g("copy_to"))
