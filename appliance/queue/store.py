"""The bundle queue: state, priority, attempts and retry times of every bundle.

Owns `STATE/bundles/<segment id>.bundle` (immutable encrypted payload files, written
tmp -> fsync -> rename -> fsync(dir)) and the forwarding columns of the `segments` rows
in the queue index. A segment becomes a bundle when it is packed; its id stays the same
from the first received instance to delivery, so `appliance queue list` follows one id.

States:
    receiving -> sealed -> ready -> active -> delivered
                             ^        |
                             |        +--> deferred (retry at next_attempt) -> ready
                             |        +--> held (permanent failure, reason shown; a human
                             |                   releases or deletes it)
                             +---- release/retry
    failed: the bundle file is missing, or it failed authentication when it was to be sent
            (moved to `STATE/quarantine/<id>.bundle.<time>`, kept; reason "quarantined: ...").

`backoff` is pure. The rest is small SQL wrapped in methods that callers (the packer,
the forwarder, the CLI) share, so that state changes are written in one place.
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.core import durable
from appliance.core.errors import NotFoundError, StateError
from appliance.queue.index import Index

STATES = ("receiving", "sealed", "ready", "active", "deferred", "held", "delivered", "failed")
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
    incomplete: int = 0  # acknowledged instances missing from the bundle (see mark_incomplete)


class Queue:
    def __init__(self, state_dir: Path, index: Index) -> None:
        self.dir = state_dir / "bundles"
        self.quarantine_dir = state_dir / "quarantine"
        self.index = index
        durable.make_dirs(self.dir)
        durable.make_dirs(self.quarantine_dir)

    def path(self, item_id: str) -> Path:
        if not item_id.isalnum():  # ids are ours (hex); never let a CLI argument become a path
            raise NotFoundError(f"no queue item {item_id!r}")
        return self.dir / f"{item_id}.bundle"

    # --- reads ---

    def get(self, item_id: str) -> Item:
        rows = self.index.query("SELECT * FROM segments WHERE id=?", (item_id,))
        if not rows:
            raise NotFoundError(f"no queue item {item_id!r}")
        return _item(rows[0])

    def list(self, states: tuple[str, ...] = STATES) -> list[Item]:
        q = ",".join("?" * len(states))
        rows = self.index.query(
            f"SELECT * FROM segments WHERE state IN ({q}) ORDER BY created", states)  # noqa: S608
        return [_item(r) for r in rows]

    def next_due(self, now: float) -> Item | None:
        rows = self.index.query(
            "SELECT * FROM segments WHERE (state='ready' OR (state='deferred' AND next_attempt<=?))"
            " ORDER BY priority DESC, created LIMIT 1", (now,))
        return _item(rows[0]) if rows else None

    def counts(self) -> dict[str, int]:
        rows = self.index.query("SELECT state, COUNT(*) n FROM segments GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def oldest_waiting_age(self, now: float) -> float:
        rows = self.index.query("SELECT MIN(created) m FROM segments WHERE state NOT IN"
                                " ('delivered')")
        return 0.0 if rows[0]["m"] is None else max(0.0, now - rows[0]["m"])

    # --- transitions ---

    def _set(self, item_id: str, allowed: tuple[str, ...], **cols: object) -> None:
        sets = ", ".join(f"{k}=?" for k in cols)
        q = ",".join("?" * len(allowed))
        with self.index.tx() as c:
            cur = c.execute(f"UPDATE segments SET {sets}, updated=? WHERE id=? AND state IN ({q})",  # noqa: S608
                            (*cols.values(), time.time(), item_id, *allowed))
            if cur.rowcount == 0:
                row = c.execute("SELECT state FROM segments WHERE id=?", (item_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no queue item {item_id!r}")
                raise StateError(f"queue item {item_id} is {row['state']}; "
                                 f"this needs one of: {', '.join(allowed)}")

    def activate(self, item_id: str, destination: str) -> None:
        self._set(item_id, ("ready", "deferred"), state="active", destination=destination,
                  progress=0)

    def progress(self, item_id: str, done: int) -> None:
        with self.index.tx() as c:
            c.execute("UPDATE segments SET progress=? WHERE id=?", (done, item_id))

    def delivered(self, item_id: str, now: float) -> None:
        self._set(item_id, ("active",), state="delivered", delivered=now, reason=None)

    def defer(self, item_id: str, reason: str, delay: float, now: float) -> None:
        self._set(item_id, ("active",), state="deferred", reason=reason,
                  attempts=self.get(item_id).attempts + 1, next_attempt=now + delay)

    def hold(self, item_id: str, reason: str) -> None:
        self._set(item_id, ("active", "ready", "deferred", "held"), state="held", reason=reason)

    def release(self, item_id: str) -> None:
        if self._pack_held(item_id):
            return self._repack(item_id)
        self._set(item_id, ("held", "deferred", "failed"), state="ready", reason=None,
                  next_attempt=0)

    def retry(self, item_id: str) -> None:
        """Make a waiting item due now (deferred or held)."""
        if self._pack_held(item_id):
            return self._repack(item_id)
        self._set(item_id, ("deferred", "held", "ready"), state="ready", next_attempt=0)

    def delete(self, item_id: str) -> None:
        """Remove an item that is not in flight; its bundle file goes too."""
        item = self.get(item_id)
        if item.state in ("receiving", "sealed", "active"):
            raise StateError(f"queue item {item_id} is {item.state}; hold it first")
        if self._pack_held(item_id):
            raise StateError(f"queue item {item_id} was never packed: its images are still in"
                             " the spool; release it to pack it again")
        with self.index.tx() as c:
            c.execute("DELETE FROM segments WHERE id=?", (item_id,))
        durable.unlink_durable(self.path(item_id))

    def fail(self, item_id: str, reason: str) -> None:
        with self.index.tx() as c:
            c.execute("UPDATE segments SET state='failed', reason=?, updated=? WHERE id=?",
                      (reason, time.time(), item_id))

    def quarantine(self, item_id: str, reason: str) -> Path:
        """The bundle fails authentication: move its file to quarantine (kept for a human,
        never deleted) and mark the item failed with the reason. Returns the new path."""
        self.path(item_id)  # checks the id
        kept = self._to_quarantine(item_id)
        self.fail(item_id, f"quarantined: {reason}")
        return kept

    def _to_quarantine(self, name: str) -> Path:
        dst = self.quarantine_dir / f"{name}.bundle.{int(time.time())}"
        (self.dir / f"{name}.bundle").rename(dst)
        durable.fsync_dir(self.quarantine_dir)
        durable.fsync_dir(self.dir)
        return dst

    # --- housekeeping ---

    def recover(self) -> dict[str, int]:
        """At start: active work goes back to ready; files and records are reconciled."""
        counts = {"requeued": 0, "missing": 0, "orphans": 0,
                  "temps_removed": durable.remove_stale_temps(self.dir)}
        with self.index.tx() as c:
            counts["requeued"] = c.execute(
                "UPDATE segments SET state='ready', progress=0 WHERE state='active'").rowcount
        on_disk = {p.name.removesuffix(".bundle") for p in self.dir.glob("*.bundle")}
        rows = {r["id"]: r["state"] for r in self.index.query(
            "SELECT id, state FROM segments WHERE state NOT IN ('receiving','sealed')"
            " AND NOT (state='held' AND reason LIKE 'pack failed: %')")}  # no bundle yet
        for item_id, state in rows.items():
            if item_id not in on_disk and state != "delivered":
                self.fail(item_id, "bundle file missing")
                counts["missing"] += 1
        known = {r["id"] for r in self.index.query("SELECT id FROM segments")}
        for name in sorted(on_disk - known):
            self._to_quarantine(name)
            counts["orphans"] += 1
        return counts

    def expire_delivered(self, keep_s: float, now: float) -> int:
        rows = self.index.query("SELECT id FROM segments WHERE state='delivered' AND delivered<?",
                                (now - keep_s,))
        for r in rows:
            durable.unlink_durable(self.path(r["id"]))
            with self.index.tx() as c:
                c.execute("DELETE FROM segments WHERE id=?", (r["id"],))
        return len(rows)


    # --- pack failures (pack-isolation branch, issue 10 B.1 and B.3) ----------------------
    # Kept apart on purpose while the queue's states move into a transition table. A
    # segment the packer gave up on is `held` with a reason starting "pack failed: " and
    # no bundle: its instances are still in the spool. release/retry send it back to
    # `sealed` (packed again), `recover` leaves it alone (no bundle file is expected),
    # `delete` refuses it (its rows and spool files would be orphaned). A schema with a
    # column for it (or a state of its own) would be better than the reason prefix.

    PACK_FAILED = "pack failed: "

    def pack_failed(self, seg_id: str, reason: str) -> None:
        """sealed -> held, reason "pack failed: <reason>": the packer tried this segment
        several times and gave up; an operator decides (release = pack it again)."""
        self._set(seg_id, ("sealed",), state="held", reason=self.PACK_FAILED + reason)

    def mark_incomplete(self, seg_id: str, missing: int) -> None:
        """Record on a sealed segment that `missing` acknowledged instances could not be
        read back from the spool (file gone, or failing authentication) and are not in
        its bundle. Sets the count (not adds): a pack redone after a crash records the
        same number again. The segment flows on (ready, delivered) with the mark kept."""
        if missing < 0:
            raise ValueError("missing must be >= 0")
        self._set(seg_id, ("sealed",), incomplete=missing)

    def _pack_held(self, item_id: str) -> bool:
        rows = self.index.query("SELECT 1 FROM segments WHERE id=? AND state='held'"
                                " AND reason LIKE ?", (item_id, self.PACK_FAILED + "%"))
        return bool(rows)

    def _repack(self, item_id: str) -> None:
        self._set(item_id, ("held",), state="sealed", reason=None, sealed=time.time())


def _item(r: sqlite3.Row) -> Item:
    g = r.__getitem__
    return Item(id=g("id"), study_key=g("study_key"), state=g("state"), priority=g("priority"),
                instances=g("instances"), bytes=g("bytes"), bundle_bytes=g("bundle_bytes") or 0,
                attempts=g("attempts"), next_attempt=g("next_attempt"), created=g("created"),
                updated=g("updated"), reason=g("reason"), destination=g("destination"),
                progress=g("progress") or 0, incomplete=_column(r, "incomplete", 0))


def _column(r: sqlite3.Row, name: str, default: int) -> int:
    return int(r[name]) if name in r.keys() else default  # noqa: SIM118 - Row has no __contains__
