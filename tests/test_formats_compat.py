"""The spool and queue formats across releases (issue 14 item 4, docs/updates.md "Formats
across releases"): a release reads the previous one's data (the migrations: see also
tests/test_spool.py and the schema tests of each migration), and the previous release,
back on its slot after an update's trial boot, uses a newer queue index only when the
newer release marked it readable by it, and otherwise refuses it untouched; a spool file
of another format is refused by name, never misread. The newer release's data is made
here the way it would write it: a table and a column with a default added, its schema
number, its compat marker."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from appliance.core import crypto
from appliance.core.errors import IntegrityError, StateError
from appliance.queue import index as db
from appliance.spool.store import Spool
from tests.test_spool import KEY, SOP, meta, part10


def as_next_release(state: Path, readable_by: int | None) -> None:
    """What a release with schema SCHEMA_VERSION + 1 that only adds things leaves behind."""
    conn = sqlite3.connect(state / "queue.db")
    conn.execute("CREATE TABLE IF NOT EXISTS future_things (id TEXT PRIMARY KEY)")
    conn.execute("ALTER TABLE instances ADD COLUMN future_col TEXT NOT NULL DEFAULT 'x'")
    conn.execute("DELETE FROM schema_compat")
    if readable_by is None:
        conn.execute("DROP TABLE schema_compat")
    else:
        conn.execute("INSERT INTO schema_compat VALUES (?)", (readable_by,))
    conn.execute(f"PRAGMA user_version={db.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()


def stored_once(state: Path) -> str:
    s = Spool(state, KEY, db.open_index(state), 0)
    rid = s.store([part10(SOP)], meta()).id
    s.index.close()
    return rid


def test_this_release_marks_its_index_with_the_oldest_schema_that_can_use_it(tmp_path: Path) -> None:
    idx = db.open_index(tmp_path)
    assert idx.query("SELECT readable_by FROM schema_compat")[0][0] == db.READABLE_BY
    assert idx.newer is None


def test_newer_index_marked_readable_by_us_is_used_as_it_is(tmp_path: Path) -> None:
    rid = stored_once(tmp_path)
    as_next_release(tmp_path, readable_by=db.SCHEMA_VERSION)
    idx = db.open_index(tmp_path)
    assert idx.newer == db.SCHEMA_VERSION + 1
    s = Spool(tmp_path, KEY, idx, 0)
    assert s.read(rid) == part10(SOP)  # the instance it holds
    again = s.store([part10(SOP)], meta())  # and new ones still go in (the column's default)
    assert again.duplicate and again.id == rid
    s.store([part10(SOP + ".2")], meta(SOP + ".2"))
    assert idx.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION + 1  # not migrated back
    assert idx.query("SELECT count(*) FROM instances WHERE future_col = 'x'")[0][0] == 2


@pytest.mark.parametrize("readable_by", [db.SCHEMA_VERSION + 1, None])
def test_newer_index_not_marked_readable_by_us_is_refused_untouched(
        tmp_path: Path, readable_by: int | None) -> None:
    stored_once(tmp_path)
    as_next_release(tmp_path, readable_by=readable_by)
    before = hashlib.sha256((tmp_path / "queue.db").read_bytes()).hexdigest()
    with pytest.raises(StateError, match="newer than this version understands"):
        db.open_index(tmp_path)
    assert hashlib.sha256((tmp_path / "queue.db").read_bytes()).hexdigest() == before


def test_spool_file_of_another_format_is_refused_by_name(tmp_path: Path) -> None:
    rid = stored_once(tmp_path)
    path = tmp_path / "spool" / rid
    data = bytearray(path.read_bytes())
    assert bytes(data[:8]) == crypto.SPOOL_MAGIC == b"APSPOOL1"  # the format this release writes
    data[7:8] = b"2"
    path.write_bytes(bytes(data))
    s = Spool(tmp_path, KEY, db.open_index(tmp_path), 0)
    with pytest.raises(IntegrityError, match="format 2, which this version does not read"):
        s.read(rid)
