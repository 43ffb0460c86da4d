"""The bundle queue: state, priority, attempts and retry times of every segment and bundle.

Owns `STATE/bundles/<segment id>.bundle` (immutable encrypted payload files, written
tmp -> fsync -> rename -> fsync(dir)) and the state of every `segments` row in the queue
index. A segment becomes a bundle when it is packed; its id stays the same from the first
received instance to delivery, so `appliance queue list` follows one id.

The one writer of state: `transition` (below) moves an item by a named event of the
pure table in `queue.state` and is the only code that writes the `state` column. The
spool (opening and sealing segments inside its own transaction), the packer, the
forwarder and operator commands call it or the `Queue` methods built on it; operator
commands reach it through the daemon's control socket (`queue.commands`), so a command
and the forwarder never race on a row.

    failed: the bundle file is missing, or it failed authentication when it was to be sent
            (moved to `STATE/quarantine/<id>.bundle.<time>`, kept; reason "quarantined: ...").

Items that share a bundle's file (`parent` = the bundle): a parked instance (`only_index`)
and a copy for a copy destination (`copy_to`, `make_copies`; queue/routes.py). The file
goes with the last item that needs it. `route`: where a routing rule sent the study.

`backoff` is pure.

Three modules: this one (`Queue`, the files and the operations on items), `queue/records.py`
(`Item`, `DestinationRow`, `AwaitingReceipt`, the priorities, `backoff`) and
`queue/transitions.py` (`transition`, and the rows that open segments, parked instances
and copies, inside a caller's transaction). This module re-exports every name of the two.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from appliance.core import durable
from appliance.core.errors import NotFoundError, StateError
from appliance.queue import routes
from appliance.queue.index import Index
from appliance.queue.records import (
    PRIORITY_ROUTINE,
    PRIORITY_STAT,
    AwaitingReceipt,
    DestinationRow,
    Item,
    _item,
    backoff,
)
from appliance.queue.state import STATES
from appliance.queue.transitions import (
    _deliver,
    _scope,
    open_copy,
    open_parked,
    open_segment,
    raise_priority,
    transition,
)

__all__ = [
    "PRIORITY_ROUTINE",
    "PRIORITY_STAT",
    "AwaitingReceipt",
    "DestinationRow",
    "Item",
    "Queue",
    "_deliver",
    "_item",
    "_scope",
    "backoff",
    "open_copy",
    "open_parked",
    "open_segment",
    "raise_priority",
    "transition",
]

_RANK = {"suspect": 0, "parked": 1, "delivered": 2}  # which record of an instance wins


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

    def bytes_by_state(self) -> dict[str, int]:
        """Bytes of the items in each state: the instances' before packing, the bundle's
        after (for the metrics endpoint)."""
        rows = self.index.query("SELECT state, COALESCE(SUM(COALESCE(bundle_bytes, bytes)), 0) b"
                                " FROM segments GROUP BY state")
        return {r["state"]: int(r["b"]) for r in rows}

    def oldest_waiting_age(self, now: float) -> float:
        rows = self.index.query("SELECT MIN(created) m FROM segments WHERE state NOT IN"
                                " ('delivered')")
        return 0.0 if rows[0]["m"] is None else max(0.0, now - rows[0]["m"])

    # --- transitions ---

    def _move(self, item_id: str, event: str, now: float | None = None, **cols: object) -> str | None:
        with self.index.tx() as c:
            return transition(c, item_id, event, time.time() if now is None else now, None, **cols)

    def claim_next(self, now: float, destination: str | Sequence[str],
                   min_priority: int = PRIORITY_ROUTINE, copies: Sequence[str] = ()) -> Item | None:
        """Take the next due item (stat first, then oldest; at least `min_priority`) that
        can go somewhere now, and make it active, atomically: another lane or an operator
        command between choosing and claiming cannot slip in. Nothing due: no write
        transaction (lanes poll twice a second; waiting for the write lock there would
        hold the index from the receiver, which must answer the scanner).

        `destination`: the failover destinations that are up, in config order; an item
        goes to the first of them its route allows (no route: the first). `copies`: the
        copy destinations that are up; an item pinned to one of them goes there."""
        up = [destination] if isinstance(destination, str) else list(destination)
        where, args = routes.claimable(up, list(copies))
        if where is None:
            return None
        due = ("SELECT * FROM segments WHERE (state='ready' OR (state='deferred' AND next_attempt<=?))"  # noqa: S608
               f" AND priority>=? AND ({where}) ORDER BY priority DESC, created LIMIT 1")
        if not self.index.query(due, (now, min_priority, *args)):
            return None
        with self.index.tx() as c:
            row = c.execute(due, (now, min_priority, *args)).fetchone()
            if row is None:
                return None
            item = _item(row)
            dest = item.copy_to or next(n for n in up if item.route is None or n in item.route)
            transition(c, row["id"], "claim", now, destination=dest, progress=0)
        return self.get(row["id"])

    def make_copies(self, copies: Sequence[str], now: float) -> int:
        """Give each packed bundle not yet copied one copy item per copy destination its
        route allows (`copies`, config order), born ready (`queue.state.BORN`), in one
        transaction with marking it copied. The forwarder calls this before each claim,
        so a bundle's copies exist before it can be delivered. Returns how many."""
        if not copies:
            return 0
        todo = ("SELECT * FROM segments WHERE copied=0 AND parent IS NULL"
                " AND state IN ('ready', 'deferred', 'held', 'active')")
        if not self.index.query(todo + " LIMIT 1"):
            return 0
        made = 0
        with self.index.tx() as c:
            for row in c.execute(todo).fetchall():
                item = _item(row)
                for name in copies:
                    if item.route is None or name in item.route:
                        open_copy(c, item, name, now)
                        made += 1
                c.execute("UPDATE segments SET copied=1 WHERE id=?", (item.id,))
        return made

    def settle_routes(self, chain: Sequence[str], copies: Sequence[str]) -> dict[str, int]:
        """At start, against the config: an item whose route names no failover destination
        any longer goes everywhere (route cleared: better than waiting for ever), and a
        copy (or a copy's parked instance) for a copy destination no longer configured is
        removed (`delete`; one in flight is left to finish). Returns the counts."""
        counts = {"rerouted": 0, "copies_dropped": 0}
        rows = self.index.query("SELECT id, route FROM segments WHERE route IS NOT NULL AND"
                                " copy_to IS NULL AND state NOT IN ('delivered', 'failed')")
        stale = [r["id"] for r in rows if not set(routes.names(r["route"]) or ()) & set(chain)]
        with self.index.tx() as c:  # not a state: where the item may go
            for item_id in stale:
                c.execute("UPDATE segments SET route=NULL WHERE id=?", (item_id,))
        counts["rerouted"] = len(stale)
        q = ",".join("?" * len(copies))
        gone = self.index.query(
            f"SELECT id, parent FROM segments WHERE copy_to IS NOT NULL AND copy_to NOT IN ({q})"  # noqa: S608
            " AND state IN ('ready', 'deferred', 'held', 'delivered', 'failed')", tuple(copies))
        for r in gone:
            with self.index.tx() as c:
                transition(c, r["id"], "delete", time.time())
            self._drop_file_if_unused(r["parent"])
        counts["copies_dropped"] = len(gone)
        return counts

    def copies_of(self, item_id: str) -> Sequence[Item]:
        """The copy items of a bundle (config order of their making)."""
        rows = self.index.query("SELECT * FROM segments WHERE parent=? AND only_index IS NULL"
                                " AND copy_to IS NOT NULL ORDER BY id", (item_id,))
        return [_item(r) for r in rows]

    def activate(self, item_id: str, destination: str) -> None:
        self._move(item_id, "claim", destination=destination, progress=0)

    def progress(self, item_id: str, done: int) -> None:
        with self.index.tx() as c:  # not a state: bytes sent so far of the active attempt
            c.execute("UPDATE segments SET progress=? WHERE id=? AND state='active'", (done, item_id))
            c.execute("UPDATE deliveries SET bytes_done=? WHERE item_id=? AND state='active'",
                      (done, item_id))

    def delivered(self, item_id: str, now: float, reason: str | None = None) -> None:
        self._move(item_id, "delivered", now, delivered=now, reason=reason)

    def defer(self, item_id: str, reason: str, delay: float, now: float) -> None:
        with self.index.tx() as c:
            row = c.execute("SELECT attempts FROM segments WHERE id=?", (item_id,)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            transition(c, item_id, "defer", now, reason=reason, attempts=attempts,
                       next_attempt=now + delay)

    def refused(self, item_id: str, reason: str) -> None:
        """The destination will not take it without a human: held, with the reason."""
        self._move(item_id, "refused", reason=reason)

    def requeue(self, item_id: str, reason: str | None = None, moved: bool = False) -> None:
        """Ready again at once, no attempt counted: work left active by a crash, or a
        bundle whose bad instances were just set aside (the rest goes now). `moved`: its
        destination went down; it goes on to the next one (its delivery there says so)."""
        with self.index.tx() as c:
            transition(c, item_id, "requeue", time.time(), delivery="moved" if moved else None,
                       progress=0, reason=reason, next_attempt=0)

    def hold(self, item_id: str, reason: str = "held by operator") -> None:
        self._move(item_id, "hold", reason=reason)

    def release(self, item_id: str) -> None:
        self._move(item_id, "release", reason=None, next_attempt=0)

    def retry(self, item_id: str) -> None:
        """Make a waiting item due now (deferred or held)."""
        self._move(item_id, "retry", next_attempt=0)

    def delete(self, item_id: str) -> None:
        """Remove an item that is not in flight; its bundle file goes too, once no parked
        instance of the bundle needs it (deleting a bundle deletes its parked instances)."""
        self.path(item_id)  # checks the id
        item = self.get(item_id)
        with self.index.tx() as c:
            transition(c, item_id, "delete", time.time())
            c.execute("DELETE FROM bundle_instances WHERE item_id=?", (item_id,))
            if item.parent is None:
                for r in c.execute("SELECT id FROM segments WHERE parent=?", (item_id,)).fetchall():
                    transition(c, r["id"], "delete", time.time())
            # (a deleted parked instance stays marked parked in its bundle: never sent)
        self._drop_file_if_unused(item.bundle_id)

    def _drop_file_if_unused(self, bundle_id: str) -> None:
        left = self.index.query("SELECT 1 FROM segments WHERE id=? OR parent=? LIMIT 1",
                                (bundle_id, bundle_id))
        if not left:
            durable.unlink_durable(self.path(bundle_id))

    def fail(self, item_id: str, reason: str, event: str = "file_missing") -> None:
        self._move(item_id, event, reason=reason)

    # --- the packer's outcomes ---

    def pack_failed(self, seg_id: str, reason: str) -> None:
        """sealed -> unpackable: the packer tried this segment several times and gave up.
        Its images are still in the spool; an operator's release or retry packs it again,
        and delete is refused (its spool files and rows would be orphaned)."""
        self._move(seg_id, "pack_failed", reason=f"pack failed: {reason}")

    def mark_incomplete(self, seg_id: str, missing: int) -> None:
        """Record on a sealed segment that `missing` acknowledged instances could not be
        read back from the spool (file gone, or failing authentication) and are not in
        its bundle. Sets the count (not adds): a pack redone after a crash records the
        same number again. The segment flows on (ready, delivered) with the mark kept."""
        if missing < 0:
            raise ValueError("missing must be >= 0")
        with self.index.tx() as c:  # not a state: a count on the segment
            n = c.execute("UPDATE segments SET incomplete=? WHERE id=? AND state='sealed'",
                          (missing, seg_id)).rowcount
        if n == 0:
            self.get(seg_id)  # NotFoundError for an unknown id
            raise StateError(f"queue item {seg_id} is not sealed; only a segment being packed"
                             " can be marked incomplete")

    def quarantine(self, item_id: str, reason: str) -> Path:
        """The bundle fails authentication: move its file to quarantine (kept for a human,
        never deleted) and mark the item failed with the reason. Returns the new path."""
        self.path(item_id)  # checks the id
        bundle_id = self.get(item_id).bundle_id
        kept = self._to_quarantine(bundle_id)
        self.fail(item_id, f"quarantined: {reason}", event="quarantined")
        for r in self.index.query("SELECT id FROM segments WHERE (id=? OR parent=?) AND id!=? AND"
                                  " state IN ('ready', 'deferred', 'held')", (bundle_id, bundle_id, item_id)):
            self.fail(r["id"], f"quarantined with {item_id}: {reason}", event="quarantined")
        return kept

    def _to_quarantine(self, name: str) -> Path:
        dst = self.quarantine_dir / f"{name}.bundle.{int(time.time())}"
        (self.dir / f"{name}.bundle").rename(dst)
        durable.fsync_dir(self.quarantine_dir)
        durable.fsync_dir(self.dir)
        return dst

    # --- per instance: what a destination holds, suspects, parked instances ---

    def instances_of(self, item_id: str, destination: str | None = None,
                     exact: bool = False) -> dict[int, tuple[str, int]]:
        """{manifest index: (delivered | suspect | parked, strikes)} of a bundle, as seen
        by `destination` (delivered means: there; None: at any destination). Delivered
        wins over parked (a released parked instance that arrived), parked over suspect.
        `exact`: only what is recorded for `destination` itself (a copy destination: the
        failover chain's suspects and parked instances are not its business)."""
        rows = self.index.query(
            "SELECT idx, destination, state, strikes FROM bundle_instances WHERE item_id=?",
            (item_id,))
        mine = (destination,) if exact else ("", destination)
        out: dict[int, tuple[str, int]] = {}
        for r in rows:
            if destination is not None and r["destination"] not in mine:
                continue
            seen = out.get(r["idx"])
            if seen is None or _RANK[r["state"]] > _RANK[seen[0]]:
                out[r["idx"]] = (r["state"], max(r["strikes"], seen[1] if seen else 0))
            else:
                out[r["idx"]] = (seen[0], max(r["strikes"], seen[1]))
        return out

    def instances_delivered(self, item_id: str, destination: str, indexes: Iterable[int]) -> None:
        """`destination` now holds these instances of the bundle (not sent there again)."""
        with self.index.tx() as c:
            c.executemany("INSERT INTO bundle_instances(item_id, destination, idx, state)"
                          " VALUES (?,?,?,'delivered') ON CONFLICT(item_id, destination, idx)"
                          " DO UPDATE SET state='delivered', reason=NULL",
                          [(item_id, destination, i) for i in indexes])

    def suspect(self, item_id: str, idx: int, reason: str, strike: bool) -> int:
        """An instance failed at the destination: sent last from now on; with `strike`, the
        failure counts against it (see forward.policy). Returns its strikes. For a copy
        item it is recorded for the bundle at the copy's destination only."""
        with self.index.tx() as c:
            bundle, scope = _scope(c, item_id)
            c.execute("INSERT INTO bundle_instances(item_id, destination, idx, state, strikes, reason)"
                      " VALUES (?,?,?,'suspect',?,?) ON CONFLICT(item_id, destination, idx) DO UPDATE"
                      " SET state='suspect', strikes=strikes+?, reason=?",
                      (bundle, scope, idx, int(strike), reason, int(strike), reason))
            row = c.execute("SELECT strikes FROM bundle_instances WHERE item_id=? AND idx=?"
                            " AND destination=?", (bundle, idx, scope)).fetchone()
        return int(row["strikes"])

    def park(self, item_id: str, idx: int, reason: str, now: float) -> str:
        """Set one instance of a bundle aside: the bundle is delivered without it, and it
        becomes a queue item of its own, held with the reason, until an operator releases
        it (then it is sent alone) or deletes it. Returns the new item's id. An instance
        parked from a copy is parked for that copy's destination only, and goes there."""
        child = f"{item_id}p{idx}"
        with self.index.tx() as c:
            row = c.execute("SELECT * FROM segments WHERE id=?", (item_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no queue item {item_id!r}")
            bundle, scope = _scope(c, item_id)
            c.execute("INSERT INTO bundle_instances(item_id, destination, idx, state, reason)"
                      " VALUES (?,?,?,'parked',?) ON CONFLICT(item_id, destination, idx)"
                      " DO UPDATE SET state='parked', reason=?", (bundle, scope, idx, reason, reason))
            open_parked(c, child, bundle, idx, row["study_key"], row["priority"], reason, now,
                        route=row["route"], copy_to=row["copy_to"])
        return child

    def parked_count(self) -> int:
        rows = self.index.query("SELECT COUNT(*) n FROM segments WHERE only_index IS NOT NULL"
                                " AND state IN ('held', 'ready', 'deferred', 'active')")
        return int(rows[0]["n"])

    # --- deliveries and destination health (forward.failover) ---

    def deliveries(self, item_id: str) -> Sequence[dict[str, object]]:
        """Where the item was tried and how it went there, oldest first; with what the
        reading center's receipt said (`receipt`: None until one was recorded)."""
        rows = self.index.query("SELECT destination, state, attempts, next_attempt, last_error,"
                                " bytes_done, started, updated, delivered, receipt, receipt_at,"
                                " receipt_stored, receipt_failed, receipt_center FROM deliveries"
                                " WHERE item_id=? ORDER BY started, destination", (item_id,))
        return [dict(r) for r in rows]

    # --- end-to-end receipts (forward.receipts) ---

    def awaiting_receipts(self, destination: str, limit: int) -> Sequence[AwaitingReceipt]:
        """Bundles, and copies of bundles (their parent's file, uploaded whole), delivered
        to `destination` whose receipt has not come yet, the most recently delivered
        first, at most `limit` (a parked instance's item is left out: its file is its
        bundle's, which has a receipt of its own)."""
        rows = self.index.query(
            "SELECT d.item_id, d.delivered, s.instances, COALESCE(s.parent, s.id) bundle"
            " FROM deliveries d JOIN segments s ON s.id=d.item_id WHERE d.destination=?"
            " AND d.state='delivered' AND d.receipt IS NULL"
            " AND (s.parent IS NULL OR (s.copy_to IS NOT NULL AND s.only_index IS NULL))"
            " ORDER BY d.delivered DESC LIMIT ?", (destination, limit))
        return [AwaitingReceipt(r["item_id"], float(r["delivered"] or 0), int(r["instances"]),
                                r["bundle"]) for r in rows]

    def receipts_awaited(self, destination: str, delivered_before: float) -> tuple[int, int]:
        """(bundles and copies delivered to `destination` without a receipt, of which
        delivered before `delivered_before`: the overdue ones)."""
        rows = self.index.query(
            "SELECT COUNT(*) n, COALESCE(SUM(d.delivered<?), 0) late FROM deliveries d JOIN segments s"
            " ON s.id=d.item_id WHERE d.destination=? AND d.state='delivered' AND d.receipt IS NULL"
            " AND (s.parent IS NULL OR (s.copy_to IS NOT NULL AND s.only_index IS NULL))",
            (delivered_before, destination))
        return int(rows[0]["n"]), int(rows[0]["late"])

    def record_receipt(self, item_id: str, destination: str, verdict: str, stored: int,
                       failed: int, center: str, now: float) -> bool:
        """The center's receipt for a bundle delivered to `destination`, verified by the
        caller (not a state: what the center says it did with a delivered bundle). The
        first one counts; False if there is no such delivery without a receipt."""
        with self.index.tx() as c:
            n = c.execute("UPDATE deliveries SET receipt=?, receipt_at=?, receipt_stored=?,"
                          " receipt_failed=?, receipt_center=? WHERE item_id=? AND destination=?"
                          " AND state='delivered' AND receipt IS NULL",
                          (verdict, now, stored, failed, center, item_id, destination)).rowcount
        return n == 1

    def destinations(self) -> dict[str, DestinationRow]:
        """The health of each destination as last saved (forward.failover.Health)."""
        rows = self.index.query("SELECT * FROM destinations")
        return {r["name"]: DestinationRow(bool(r["up"]), float(r["since"]), int(r["failures"]),
                                          int(r["probes"]), r["last_error"], float(r["next_probe"]))
                for r in rows}

    def save_destination(self, name: str, up: bool, since: float, failures: int, probes: int,
                         last_error: str | None, next_probe: float) -> None:
        """Record a destination's health (not an item's state: the failover policy's view)."""
        with self.index.tx() as c:
            c.execute("INSERT INTO destinations(name, up, since, failures, probes, last_error,"
                      " next_probe) VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                      " up=excluded.up, since=excluded.since, failures=excluded.failures,"
                      " probes=excluded.probes, last_error=excluded.last_error,"
                      " next_probe=excluded.next_probe",
                      (name, int(up), since, failures, probes, last_error, next_probe))

    def due_now(self, destinations: Iterable[str], now: float) -> int:
        """Deferred items last tried on one of `destinations` become due now (not a state:
        their retry time), so that they move as soon as somewhere to go comes up. Returns
        how many."""
        names = list(destinations)
        if not names:
            return 0
        q = ",".join("?" * len(names))
        with self.index.tx() as c:
            return c.execute(f"UPDATE segments SET next_attempt=? WHERE state='deferred'"  # noqa: S608
                             f" AND next_attempt>? AND destination IN ({q})",
                             (now, now, *names)).rowcount

    # --- housekeeping ---

    def recover(self) -> dict[str, int]:
        """At start: active work goes back to ready; files and records are reconciled."""
        counts = {"requeued": 0, "missing": 0, "orphans": 0,
                  "temps_removed": durable.remove_stale_temps(self.dir)}
        for r in self.index.query("SELECT id FROM segments WHERE state='active'"):
            self.requeue(r["id"])
            counts["requeued"] += 1
        on_disk = {p.name.removesuffix(".bundle") for p in self.dir.glob("*.bundle")}
        rows = {r["id"]: (r["state"], r["parent"] or r["id"]) for r in self.index.query(
            "SELECT id, state, parent FROM segments WHERE state NOT IN"
            " ('receiving','sealed','unpackable')")}  # these have no bundle yet
        for item_id, (state, bundle_id) in rows.items():
            if bundle_id not in on_disk and state != "delivered":
                self.fail(item_id, "bundle file missing")
                counts["missing"] += 1
        known = {r["id"] for r in self.index.query("SELECT id FROM segments")}
        for name in sorted(on_disk - known):
            self._to_quarantine(name)
            counts["orphans"] += 1
        return counts

    def expire_delivered(self, keep_s: float, now: float) -> int:
        """Forget delivered items after the keep period; a bundle file goes with the last
        item that needs it (a bundle and its parked instances share one file)."""
        rows = self.index.query("SELECT id, parent FROM segments WHERE state='delivered' AND delivered<?"
                                " AND NOT EXISTS (SELECT 1 FROM segments c WHERE c.parent=segments.id)",
                                (now - keep_s,))
        for r in rows:
            with self.index.tx() as c:
                transition(c, r["id"], "expire", now)
                c.execute("DELETE FROM bundle_instances WHERE item_id=?", (r["id"],))
            self._drop_file_if_unused(r["parent"] or r["id"])
        return len(rows)
