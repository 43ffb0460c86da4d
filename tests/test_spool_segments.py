"""How the spool cuts a study into segments as it arrives: a study's first segment is
small (`pack.first_segment_instances`, so its first bundle is on the link within about
a second), the others take `pack.segment_max_instances`."""

from __future__ import annotations

import time
from pathlib import Path

from appliance.core import crypto
from appliance.queue import index as db
from appliance.queue.store import transition
from appliance.spool.store import InstanceMeta, Spool

KEY = crypto.SpoolKey(b"\x09" * 32)


def spool(root: Path, first: int = 4, most: int = 10) -> Spool:
    return Spool(root, KEY, db.open_index(root), 0, segment_max_instances=most,
                 first_segment_instances=first)


def store(s: Spool, study: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        s.store([f"{study}/{i}".encode()], InstanceMeta(
            study_uid=study, sop_instance_uid=f"{study}.{i}", sop_class="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.1", calling_ae="CT"))


def sizes(s: Spool, study: str) -> list[int]:
    rows = s.index.query("SELECT instances FROM segments WHERE study_key=? ORDER BY created, rowid",
                         (s.study_key(study),))
    return [r["instances"] for r in rows]


def seal_receiving(s: Spool, study: str) -> None:
    """What the packer's clock does to a quiet or old segment."""
    with s.index.tx() as c:
        for r in c.execute("SELECT id FROM segments WHERE study_key=? AND state='receiving'",
                           (s.study_key(study),)).fetchall():
            transition(c, r["id"], "seal", time.time())


def test_first_segment_of_a_study_is_sealed_at_the_first_count(tmp_path: Path) -> None:
    s = spool(tmp_path)
    store(s, "1.2.3", 40)
    assert sizes(s, "1.2.3") == [4, 10, 10, 10, 6]


def test_every_new_study_gets_a_small_first_segment(tmp_path: Path) -> None:
    s = spool(tmp_path)
    for i in range(12):  # two scanners' studies interleaved
        store(s, "1.2.3", 1, start=i)
        store(s, "1.2.4", 1, start=i)
    assert sizes(s, "1.2.3") == [4, 8] and sizes(s, "1.2.4") == [4, 8]


def test_segment_after_an_earlier_one_of_the_study_takes_the_full_count(tmp_path: Path) -> None:
    """A study that resumes after its first segment was sealed by time is not 'first' again."""
    s = spool(tmp_path)
    store(s, "1.2.3", 2)
    seal_receiving(s, "1.2.3")
    store(s, "1.2.3", 12, start=2)
    assert sizes(s, "1.2.3") == [2, 10, 2]


def test_first_count_above_the_segment_count_is_the_segment_count(tmp_path: Path) -> None:
    s = spool(tmp_path, first=50, most=10)
    store(s, "1.2.3", 25)
    assert sizes(s, "1.2.3") == [10, 10, 5]


def test_no_first_count_keeps_every_segment_the_same_size(tmp_path: Path) -> None:
    s = Spool(tmp_path, KEY, db.open_index(tmp_path), 0, segment_max_instances=10)
    store(s, "1.2.3", 25)
    assert sizes(s, "1.2.3") == [10, 10, 5]


def test_open_first_segment_keeps_its_count_while_many_studies_come_and_go(tmp_path: Path) -> None:
    """The in-memory set of first segments is pruned of sealed ones, never of open ones."""
    s = spool(tmp_path)
    store(s, "1.2.3", 1)
    for i in range(100):
        store(s, f"1.9.{i}", 1)
        seal_receiving(s, f"1.9.{i}")
    store(s, "1.2.3", 5, start=1)
    assert sizes(s, "1.2.3") == [4, 2]
    assert len(s._first) <= 65  # bounded: sealed studies' segments were forgotten
