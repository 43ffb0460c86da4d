"""The spool's duplicate check: the same instance (same SOP Instance UID, same bytes) is
stored once, whatever order and concurrency it arrives in; a different version of an
instance is never taken for a duplicate; rows from the previous schema still match."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.core import crypto
from appliance.queue import index as db
from appliance.queue.index import Index
from appliance.receive.identify import identify_stored, part10_header
from appliance.spool.store import InstanceMeta, Spool, Stored, _sha256

KEY = crypto.SpoolKey(b"\x07" * 32)
SOP = "1.2.826.0.1.3680043.8.498.1"


def meta(sop: str = SOP) -> InstanceMeta:
    return InstanceMeta(study_uid="1.2.3.4", sop_instance_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax="1.2.840.10008.1.2.1", calling_ae="MODALITY")


def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path, KEY, db.open_index(tmp_path), 0)


def rows(s: Spool) -> list[sqlite3.Row]:
    return s.index.query("SELECT * FROM instances ORDER BY received, id")


def files(s: Spool) -> list[str]:
    return sorted(p.name for p in s.dir.iterdir())


def test_same_bytes_twice_is_stored_once(tmp_path: Path) -> None:
    s = spool(tmp_path)
    first = s.store([b"head", b"body"], meta())
    again = s.store([b"hea", b"dbody"], meta())  # same bytes, cut differently
    assert not first.duplicate and again.duplicate
    assert (again.id, again.segment_id, again.study_key) == (first.id, first.segment_id, first.study_key)
    assert [r["id"] for r in rows(s)] == [first.id] and files(s) == [first.id]
    assert s.read(first.id) == b"headbody"


def test_new_instance_is_not_hashed_until_a_candidate_appears(tmp_path: Path) -> None:
    """The content hash is the expensive part of the check; a first-seen SOP Instance UID
    does not need it. Once a second copy arrives, the first one gets it from its file."""
    s = spool(tmp_path)
    first = s.store([b"one"], meta())
    assert rows(s)[0]["content_key"] is None
    s.store([b"one"], meta())
    assert rows(s)[0]["content_key"] == s.content_key(SOP, _sha256([b"one"]))
    assert rows(s)[0]["id"] == first.id


def test_another_version_of_an_instance_is_kept(tmp_path: Path) -> None:
    """Same SOP Instance UID, different bytes (a corrected instance): both are kept, in order;
    the PACS decides which wins, not us."""
    s = spool(tmp_path)
    a = s.store([b"version 1"], meta())
    b = s.store([b"version 2"], meta())
    c = s.store([b"version 1"], meta())
    assert not a.duplicate and not b.duplicate and c.duplicate and c.id == a.id
    assert [s.read(r["id"]) for r in rows(s)] == [b"version 1", b"version 2"]


def test_same_bytes_under_another_sop_uid_is_not_a_duplicate(tmp_path: Path) -> None:
    s = spool(tmp_path)
    s.store([b"same"], meta())
    other = s.store([b"same"], meta(SOP + "0"))
    assert not other.duplicate and len(rows(s)) == 2


def test_unreadable_candidate_never_drops_the_new_copy(tmp_path: Path) -> None:
    """If the copy we hold fails authentication, the new one is stored: we must not answer
    Success for bytes we cannot send."""
    s = spool(tmp_path)
    first = s.store([b"payload"], meta())
    p = s.dir / first.id
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    again = s.store([b"payload"], meta())
    assert not again.duplicate and again.id != first.id
    assert s.read(again.id) == b"payload"


def test_concurrent_copies_of_one_instance_are_stored_once(tmp_path: Path) -> None:
    """Two associations delivering the same instance at once (a modality retrying on a
    second association): whatever the interleaving, one row and one file remain."""
    s = spool(tmp_path)
    for round_ in range(20):
        sop = f"{SOP}.{round_}"
        barrier = threading.Barrier(4)
        results: list[Stored] = []

        def send(sop: str = sop, barrier: threading.Barrier = barrier,
                 results: list[Stored] = results) -> None:
            barrier.wait()
            results.append(s.store([b"x" * 1000, sop.encode()], meta(sop)))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = [r for r in results if not r.duplicate]
        assert len(stored) == 1 and {r.id for r in results} == {stored[0].id}
    assert len(rows(s)) == 20 and len(files(s)) == 20


V2_INSTANCES = """
    CREATE TABLE segments (id TEXT PRIMARY KEY, study_key TEXT NOT NULL, state TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
        instances INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
        destination TEXT, progress INTEGER NOT NULL DEFAULT 0, bundle_bytes INTEGER,
        sealed REAL, delivered REAL);
    CREATE TABLE instances (id TEXT PRIMARY KEY, segment_id TEXT NOT NULL, study_key TEXT NOT NULL,
        content_key TEXT NOT NULL, sop_class TEXT NOT NULL, transfer_syntax TEXT NOT NULL,
        size INTEGER NOT NULL, received REAL NOT NULL, calling_ae TEXT NOT NULL,
        packed INTEGER NOT NULL DEFAULT 0);
    CREATE UNIQUE INDEX instances_content ON instances(content_key);
    PRAGMA user_version=2;
"""


def part10(sop: str) -> bytes:
    """A minimal Part-10 instance with the three identifying UIDs (explicit VR LE)."""
    def el(tag: tuple[int, int], value: str) -> bytes:
        v = value.encode() + (b"\0" if len(value) % 2 else b"")
        return (tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little") + b"UI"
                + len(v).to_bytes(2, "little") + v)
    ds = el((0x0008, 0x0016), meta().sop_class) + el((0x0008, 0x0018), sop) \
        + el((0x0020, 0x000D), "1.2.3.4") + el((0x0020, 0x000E), "1.2.3.4.5")
    return part10_header(meta().sop_class, sop, "1.2.840.10008.1.2.1", "MODALITY") + ds


def test_rows_of_the_previous_schema_are_migrated_and_still_match(tmp_path: Path) -> None:
    """An upgrade with instances still in the spool: the index migrates to the current version, the
    next start gives the old rows their SOP key, and a re-send is still a duplicate."""
    data = part10(SOP)
    (tmp_path / "v3").mkdir()
    s = spool(tmp_path / "v3")  # only to seal a file the way the spool does
    old = s.store([data], meta())
    state = tmp_path / "state"
    (state / "spool").mkdir(parents=True)
    os.rename(s.dir / old.id, state / "spool" / old.id)
    conn = sqlite3.connect(state / "queue.db")
    conn.executescript(V2_INSTANCES)
    conn.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes)"
                 " VALUES ('seg', ?, 'receiving', 1, 1, 1, ?)", (old.study_key, len(data)))
    conn.execute("INSERT INTO instances VALUES (?, 'seg', ?, ?, ?, ?, ?, 1, 'MODALITY', 0)",
                 (old.id, old.study_key, s.content_key(SOP, _sha256([data])), meta().sop_class,
                  meta().transfer_syntax, len(data)))
    conn.commit()
    conn.close()

    index = Index(state / "queue.db")
    assert index.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION
    up = Spool(state, KEY, index, 0)
    assert index.query("SELECT sop_key FROM instances")[0]["sop_key"] is None
    counts = up.recover(adopt=identify_stored)
    assert counts["keyed"] == 1 and counts["adopted"] == 0
    again = up.store([data], meta())
    assert again.duplicate and again.id == old.id
    assert [r["id"] for r in index.query("SELECT id FROM instances")] == [old.id]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "queue.db")
    conn.execute(f"PRAGMA user_version={db.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(Exception, match="newer than this version"):
        db.open_index(tmp_path)


def test_reaching_the_reserve_is_logged_once_and_leaving_it_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.core.errors import SpoolFullError

    s = spool(tmp_path)
    s.reserve = 1 << 62  # more than any disk: every store refused
    for _ in range(3):
        with pytest.raises(SpoolFullError):
            s.check_room(100)
    s.reserve = 0
    s.check_room(100)
    s.check_room(100)
    out = capsys.readouterr().out
    assert out.count("spool.reserve_reached") == 1 and out.count("spool.reserve_left") == 1
    assert out.index("spool.reserve_reached") < out.index("spool.reserve_left")
