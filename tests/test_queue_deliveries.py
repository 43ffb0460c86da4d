"""The queue's per-destination records (schema v5): deliveries, what each destination holds
of a bundle, destination health, and the migration from a v4 index."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.core.errors import StateError
from appliance.queue import index as db
from appliance.queue.index import Index, open_index
from appliance.queue.store import DestinationRow, Queue, transition


def _queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path, open_index(tmp_path))


def _add(q: Queue, item_id: str, state: str = "ready") -> None:
    now = time.time()
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes)"
                  " VALUES (?,?,?,?,?,1,10)", (item_id, "k" * 16, state, now, now))
    q.path(item_id).write_bytes(b"bundle")


def _states(q: Queue, item_id: str) -> dict[str, str]:
    return {str(d["destination"]): str(d["state"]) for d in q.deliveries(item_id)}


def test_a_claim_opens_a_delivery_and_the_outcome_closes_it(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "aa01")
    q.claim_next(time.time(), "pacs")
    q.progress("aa01", 1234)
    [d] = q.deliveries("aa01")
    assert (d["destination"], d["state"], d["attempts"], d["bytes_done"]) == ("pacs", "active", 1, 1234)
    q.delivered("aa01", 500.0)
    [d] = q.deliveries("aa01")
    assert (d["state"], d["delivered"]) == ("delivered", 500.0)


def test_a_deferred_item_keeps_its_error_and_counts_attempts_per_destination(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "bb01")
    q.claim_next(time.time(), "pacs")
    q.defer("bb01", "connection refused", 60, now=1000.0)
    [d] = q.deliveries("bb01")
    assert (d["state"], d["last_error"], d["next_attempt"]) == ("waiting", "connection refused", 1060.0)
    q.claim_next(2000.0, "pacs")
    assert q.deliveries("bb01")[0]["attempts"] == 2


def test_a_moved_item_keeps_a_record_of_each_destination_it_saw(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "cc01")
    q.claim_next(time.time(), "primary")
    q.requeue("cc01", reason="moved on: primary is down", moved=True)
    item = q.get("cc01")
    assert (item.state, item.attempts, item.next_attempt) == ("ready", 0, 0)  # no attempt spent
    q.claim_next(time.time(), "backup")
    q.delivered("cc01", time.time())
    assert _states(q, "cc01") == {"primary": "moved", "backup": "delivered"}
    assert q.get("cc01").destination == "backup"
    primary = next(d for d in q.deliveries("cc01") if d["destination"] == "primary")
    assert primary["last_error"] == "moved on: primary is down"


def test_refused_and_quarantined_items_mark_their_delivery(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "dd01")
    _add(q, "dd02")
    q.claim_next(time.time(), "pacs")
    q.refused("dd01", "association rejected")
    q.claim_next(time.time(), "pacs")
    q.quarantine("dd02", "bundle does not verify")
    assert _states(q, "dd01") == {"pacs": "held"}
    assert _states(q, "dd02") == {"pacs": "failed"}


def test_recovery_turns_an_active_delivery_into_a_waiting_one(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "ee01")
    q.claim_next(time.time(), "pacs")
    q.recover()
    assert q.get("ee01").state == "ready" and _states(q, "ee01") == {"pacs": "waiting"}


def test_deleting_an_item_deletes_its_deliveries(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "ff01")
    q.claim_next(time.time(), "pacs")
    q.defer("ff01", "refused", 60, time.time())
    q.delete("ff01")
    assert q.index.query("SELECT * FROM deliveries") == []


def test_a_delivery_that_disagrees_with_its_item_is_refused_with_the_reason(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "gg01")
    q.claim_next(time.time(), "pacs")
    with q.index.tx() as c:  # a broken index: the delivery already says delivered
        c.execute("UPDATE deliveries SET state='delivered'")
    with pytest.raises(StateError, match="its delivery to pacs is delivered; retry needs one of: active"), \
            q.index.tx() as c:
        transition(c, "gg01", "defer", time.time(), reason="x", next_attempt=0)
    assert q.get("gg01").state == "active"  # rolled back with it


def test_what_a_destination_holds_is_recorded_per_destination(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "hh01")
    q.instances_delivered("hh01", "primary", [0, 1])
    q.suspect("hh01", 2, "no answer", strike=True)
    q.park("hh01", 3, "refused", time.time())
    assert q.instances_of("hh01", "primary") == {0: ("delivered", 0), 1: ("delivered", 0),
                                                 2: ("suspect", 1), 3: ("parked", 0)}
    # the backup holds none of it: a bundle that moves sends every instance but the parked
    assert q.instances_of("hh01", "backup") == {2: ("suspect", 1), 3: ("parked", 0)}


def test_destination_health_is_saved_and_read_back(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    q.save_destination("primary", False, 100.0, 3, 2, "refused", 160.0)
    q.save_destination("primary", False, 100.0, 3, 3, "refused", 220.0)
    q.index.close()
    again = _queue(tmp_path)
    assert again.destinations() == {"primary": DestinationRow(False, 100.0, 3, 3, "refused", 220.0)}


def test_only_items_deferred_on_the_named_destinations_become_due_now(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    for item_id, dest in (("ii01", "primary"), ("ii02", "backup"), ("ii03", "primary")):
        _add(q, item_id)
        q.activate(item_id, dest)
        q.defer(item_id, "refused", 600, now=1000.0)
    assert q.due_now({"primary"}, 1001.0) == 2
    assert [i.id for i in q.list(("deferred",)) if i.next_attempt <= 1001.0] == ["ii01", "ii03"]
    assert all(i.state == "deferred" for i in q.list())  # a retry time, not a state


# --- the migration from schema 4 ----------------------------------------------------------


def _v4(path: Path) -> None:
    conn = sqlite3.connect(path)
    for script in db._SCHEMA[:4]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=4")
    rows = [("jj01", "delivered", "pacs", 3, 0), ("jj02", "deferred", "pacs", 2, 900.0),
            ("jj03", "ready", None, 0, 0), ("jj01p3", "held", None, 0, 0)]
    for item_id, state, dest, attempts, next_attempt in rows:
        conn.execute("INSERT INTO segments(id, study_key, state, created, updated, destination,"
                     " attempts, next_attempt, delivered, reason) VALUES (?,?,?,1,2,?,?,?,?,?)",
                     (item_id, "k" * 16, state, dest, attempts, next_attempt,
                      5.0 if state == "delivered" else None, "refused" if state == "deferred" else None))
    conn.executemany("INSERT INTO bundle_instances(item_id, idx, state, strikes, reason) VALUES (?,?,?,?,?)",
                     [("jj01", 0, "delivered", 0, None), ("jj01", 1, "delivered", 1, None),
                      ("jj01", 2, "suspect", 1, "no answer"), ("jj01", 3, "parked", 0, "refused")])
    conn.commit()
    conn.close()


def test_a_v4_index_migrates_to_v5_keeping_what_each_row_said(tmp_path: Path) -> None:
    _v4(tmp_path / "queue.db")
    q = Queue(tmp_path, Index(tmp_path / "queue.db"))
    assert q.index.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION
    # items claimed under v4 get a delivery at the destination they were claimed for
    assert _states(q, "jj01") == {"pacs": "delivered"}
    [d] = q.deliveries("jj02")
    assert (d["state"], d["attempts"], d["next_attempt"], d["last_error"]) == ("waiting", 2, 900.0, "refused")
    assert q.deliveries("jj03") == [] and q.deliveries("jj01p3") == []
    # delivered instances were at that destination; suspects and parked stay the bundle's
    assert q.instances_of("jj01", "pacs") == {0: ("delivered", 0), 1: ("delivered", 1),
                                              2: ("suspect", 1), 3: ("parked", 0)}
    assert q.instances_of("jj01", "backup") == {2: ("suspect", 1), 3: ("parked", 0)}
    assert q.destinations() == {}  # no health known: every destination starts up


def test_a_migrated_item_flows_on_through_the_new_tables(tmp_path: Path) -> None:
    _v4(tmp_path / "queue.db")
    q = Queue(tmp_path, Index(tmp_path / "queue.db"))
    q.activate("jj02", "pacs")
    q.delivered("jj02", 1001.0)
    [d] = q.deliveries("jj02")
    assert (d["state"], d["attempts"]) == ("delivered", 3)
