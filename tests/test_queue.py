"""The bundle queue: backoff bounds, state transitions, and recovery after a crash."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from appliance.core.errors import NotFoundError, StateError
from appliance.queue.index import open_index
from appliance.queue.store import Queue, backoff


def test_backoff_grows_and_stays_within_bounds() -> None:
    rng = random.Random(1)
    for attempts in range(1, 30):
        for _ in range(50):
            d = backoff(attempts, 5, 600, rng)
            assert 2.5 <= d <= 600
    # the ceiling doubles: late attempts can wait far longer than the first
    assert max(backoff(1, 5, 600, rng) for _ in range(200)) <= 5
    assert max(backoff(8, 5, 600, rng) for _ in range(200)) > 100


def test_backoff_is_jittered() -> None:
    rng = random.Random(2)
    assert len({round(backoff(6, 5, 600, rng), 3) for _ in range(20)}) > 10


def _queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path, open_index(tmp_path))


def _add(q: Queue, item_id: str, state: str = "ready", priority: int = 0, created: float = 0.0,
         with_file: bool = True) -> None:
    now = created or time.time()
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, priority, created, updated, instances,"
                  " bytes) VALUES (?,?,?,?,?,?,1,10)", (item_id, "k" * 16, state, priority, now, now))
    if with_file:
        q.path(item_id).write_bytes(b"bundle")


def test_stat_goes_before_routine_and_old_before_new(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "aa01", created=100)
    _add(q, "aa02", created=50)
    _add(q, "aa03", priority=10, created=200)
    order = []
    while (item := q.next_due(time.time())) is not None:
        order.append(item.id)
        q.activate(item.id, "d")
        q.delivered(item.id, time.time())
    assert order == ["aa03", "aa02", "aa01"]


def test_deferred_item_waits_until_its_time(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "bb01")
    q.activate("bb01", "d")
    q.defer("bb01", "connection refused", 60, now=1000.0)
    item = q.get("bb01")
    assert (item.state, item.attempts, item.reason) == ("deferred", 1, "connection refused")
    assert q.next_due(1059.0) is None
    assert q.next_due(1060.0) is not None


def test_held_item_is_not_sent_until_released(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "cc01")
    q.activate("cc01", "d")
    q.refused("cc01", "peer does not accept SOP class")
    assert q.next_due(time.time()) is None
    assert q.get("cc01").reason == "peer does not accept SOP class"
    q.release("cc01")
    assert q.next_due(time.time()).id == "cc01"  # type: ignore[union-attr]


def test_invalid_transition_says_why(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "dd01", state="delivered")
    with pytest.raises(StateError, match="dd01 is delivered"):
        q.activate("dd01", "d")
    with pytest.raises(NotFoundError):
        q.release("nope")


def test_ids_from_the_command_line_never_become_paths(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    with pytest.raises(NotFoundError):
        q.path("../../etc/passwd")


def test_recovery_requeues_active_and_reconciles_files(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "ee01", state="active")
    _add(q, "ee02", state="ready", with_file=False)
    (q.dir / "ff99.bundle").write_bytes(b"orphan")
    (q.dir / ".tmp-1234").write_bytes(b"half written")
    counts = q.recover()
    assert counts == {"requeued": 1, "missing": 1, "orphans": 1, "temps_removed": 1}
    assert q.get("ee01").state == "ready"
    assert (q.get("ee02").state, q.get("ee02").reason) == ("failed", "bundle file missing")
    quarantined = list(q.quarantine_dir.iterdir())
    assert [p.read_bytes() for p in quarantined] == [b"orphan"]  # kept, not deleted


def test_delivered_bundles_expire_after_the_keep_period(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "gg01")
    q.activate("gg01", "d")
    q.delivered("gg01", now=1000.0)
    assert q.expire_delivered(keep_s=3600, now=1000.0 + 3599) == 0
    assert q.expire_delivered(keep_s=3600, now=1000.0 + 3601) == 1
    assert not q.path("gg01").exists()
    with pytest.raises(NotFoundError):
        q.get("gg01")


def test_quarantine_keeps_the_file_and_fails_the_item(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "hh01", state="active")
    kept = q.quarantine("hh01", "bundle does not verify: tag mismatch")
    assert kept.parent == q.quarantine_dir and kept.read_bytes() == b"bundle"
    assert not q.path("hh01").exists()
    item = q.get("hh01")
    assert (item.state, item.reason) == ("failed", "quarantined: bundle does not verify: tag mismatch")
    assert q.next_due(time.time() + 10**6) is None
    with pytest.raises(NotFoundError):
        q.quarantine("../hh01", "x")  # ids from anywhere never become paths
    assert q.recover()["orphans"] == 0  # quarantined files are not orphans of bundles/
