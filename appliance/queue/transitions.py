"""The writes of queue state inside a caller's transaction: `transition` (the only writer
of `state`, an item's and its delivery's) and the rows that open items.

Owns the `state` column of `segments` and of `deliveries` in the queue index: `transition`
moves an item by a named event of the pure table in `queue.state`, and its delivery at its
destination with it (`_deliver`). `open_segment` (the spool, in its own transaction),
`open_parked` and `open_copy` insert the rows of new items in the state `queue.state.BORN`
gives them; `raise_priority` lifts a study's segments to a routing rule's priority; `_scope`
says where an item's per-instance records go. `Queue` (queue/store.py) is built on these
and re-exports them.

How it fails: NotFoundError for an unknown item id, StateError naming what an event needs
when it does not apply to the item's state (the caller's transaction then rolls back);
sqlite3 errors propagate.
"""

from __future__ import annotations

import sqlite3

from appliance.core.errors import NotFoundError, StateError
from appliance.queue import routes
from appliance.queue import state as machine
from appliance.queue.records import Item


def transition(conn: sqlite3.Connection, item_id: str, event: str, now: float,
               delivery: str | None = None, **cols: object) -> str | None:
    """Move one item by `event` inside the caller's transaction; the only writer of `state`.

    Sets `cols` too (reason, attempts, ...). Returns the new state (None: the item was
    removed). Raises NotFoundError for an unknown id, StateError (naming what the event
    needs) when the event does not apply to the item's state. The row is read and written
    in one transaction (BEGIN IMMEDIATE), so nothing can change it in between.

    The item's delivery at its destination (`cols["destination"]` for a claim, else the
    one it was last claimed for) moves with it: by the event `delivery`, or the one
    `queue.state.DELIVERY_ON` names for `event`.
    """
    row = conn.execute("SELECT state, destination FROM segments WHERE id=?", (item_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no queue item {item_id!r}")
    try:
        target = machine.next_state(row["state"], event)
    except machine.Invalid as e:
        raise StateError(f"queue item {item_id} {e}") from None
    if target is machine.GONE:
        conn.execute("DELETE FROM segments WHERE id=?", (item_id,))
        conn.execute("DELETE FROM deliveries WHERE item_id=?", (item_id,))
        return None
    cols.setdefault("updated", now)
    sets = "".join(f", {k}=?" for k in cols)
    conn.execute(f"UPDATE segments SET state=?{sets} WHERE id=?",  # noqa: S608
                 (target, *cols.values(), item_id))
    dest = cols.get("destination", row["destination"])
    move = delivery or machine.DELIVERY_ON.get(event)
    if move is not None and isinstance(dest, str):
        _deliver(conn, item_id, dest, move, now, cols)
    return target


def _deliver(conn: sqlite3.Connection, item_id: str, dest: str, event: str, now: float,
             cols: dict[str, object]) -> None:
    """Move the (item, destination) delivery by `event` (inside `transition`'s transaction)."""
    row = conn.execute("SELECT state FROM deliveries WHERE item_id=? AND destination=?",
                       (item_id, dest)).fetchone()
    try:
        target = machine.next_delivery(None if row is None else row["state"], event)
    except machine.Invalid as e:
        raise StateError(f"queue item {item_id}: its delivery to {dest} {e}") from None
    if row is None:
        conn.execute("INSERT INTO deliveries(item_id, destination, state, attempts, started, updated)"
                     " VALUES (?,?,?,1,?,?)", (item_id, dest, target, now, now))
        return
    sets: dict[str, object] = {"state": target, "updated": now}
    if event == "claim":
        conn.execute("UPDATE deliveries SET attempts=attempts+1 WHERE item_id=? AND destination=?",
                     (item_id, dest))
        sets.update(started=now, bytes_done=0, next_attempt=0)
    elif event == "delivered":
        sets["delivered"] = now
    else:
        sets.update(last_error=cols.get("reason"), next_attempt=cols.get("next_attempt", 0))
    assign = ", ".join(f"{k}=?" for k in sets)
    conn.execute(f"UPDATE deliveries SET {assign} WHERE item_id=? AND destination=?",  # noqa: S608
                 (*sets.values(), item_id, dest))


def open_parked(conn: sqlite3.Connection, item_id: str, parent: str, idx: int, study_key: str,
                priority: int, reason: str, now: float, route: str | None = None,
                copy_to: str | None = None) -> None:
    """The item of a parked instance: held with the reason (inside the caller's
    transaction); it keeps the route (and copy destination) of the item it came from."""
    conn.execute("INSERT INTO segments(id, study_key, state, priority, created, updated, instances,"
                 " reason, parent, only_index, route, copy_to, copied) VALUES (?,?,?,?,?,?,1,?,?,?,?,?,1)",
                 (item_id, study_key, machine.BORN["parked"], priority, now, now, reason, parent,
                  idx, route, copy_to))


def open_copy(conn: sqlite3.Connection, bundle: Item, destination: str, now: float) -> None:
    """A bundle's copy item for a copy destination (inside the caller's transaction):
    born ready, with the bundle's priority, age and sizes, pinned to `destination`."""
    conn.execute("INSERT OR IGNORE INTO segments(id, study_key, state, priority, created, updated,"
                 " instances, bytes, bundle_bytes, incomplete, parent, route, copy_to, copied)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
                 (routes.copy_id(bundle.id, destination), bundle.study_key, machine.BORN["copy"],
                  bundle.priority, bundle.created, now, bundle.instances, bundle.bytes,
                  bundle.bundle_bytes, bundle.incomplete, bundle.id, routes.text((destination,)),
                  destination))


def open_segment(conn: sqlite3.Connection, seg_id: str, study_key: str, now: float) -> None:
    """A new segment for a study, in state receiving (inside the spool's transaction). It
    has the priority and the route the study has already (a stat study's later segments
    are stat; a routed study's go where its first did)."""
    conn.execute("INSERT INTO segments(id, study_key, state, created, updated, priority, route)"
                 " VALUES (?,?,?,?,?, COALESCE((SELECT MAX(priority) FROM segments"
                 " WHERE study_key=?), 0), (SELECT route FROM segments WHERE study_key=? AND"
                 " parent IS NULL AND route IS NOT NULL LIMIT 1))",
                 (seg_id, study_key, machine.BORN["segment"], now, now, study_key, study_key))


def _scope(conn: sqlite3.Connection, item_id: str) -> tuple[str, str]:
    """Where an item's per-instance records go: (bundle id, destination scope). A bundle
    and its parked instances: (itself, ''), as before; a copy: (its bundle, its destination)."""
    row = conn.execute("SELECT parent, copy_to, only_index FROM segments WHERE id=?",
                       (item_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no queue item {item_id!r}")
    if row["copy_to"] is not None and row["only_index"] is None:
        return row["parent"], row["copy_to"]
    return item_id, ""


def raise_priority(conn: sqlite3.Connection, study_key: str, priority: int) -> int:
    """A study found to be `priority` (a routing rule matched one of its instances): every
    segment of it not yet delivered gets at least that priority, so what is already sealed,
    packed or waiting goes first too. Inside the spool's transaction; returns the count."""
    cur = conn.execute("UPDATE segments SET priority=? WHERE study_key=? AND priority<? AND"
                       " state NOT IN ('delivered', 'failed')", (priority, study_key, priority))
    return cur.rowcount
