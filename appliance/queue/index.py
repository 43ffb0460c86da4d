"""The queue index: one SQLite database in the state directory.

Owns `STATE/queue.db` (+ `-wal`, `-shm`). WAL mode lets the CLI read while the daemon
writes; `synchronous=FULL` makes every commit durable before it returns, which is what
lets the receiver answer Success right after its commit. The schema is versioned with
`PRAGMA user_version`; `open_index` migrates forward and refuses a newer schema.

No patient data is stored here: studies are grouped by a keyed hash of the Study
Instance UID (`study_key`); duplicates are found by a keyed hash of the SOP Instance UID
(`sop_key`), then of it and the content (`content_key`, filled in only when a second copy
arrives). SOP Class and Transfer Syntax UIDs are standard constants, not identifiers of a
patient.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.core.errors import StateError

SCHEMA_VERSION = 4

_SCHEMA = [
    # version 1
    """
    CREATE TABLE segments (
        id          TEXT PRIMARY KEY,
        study_key   TEXT NOT NULL,
        state       TEXT NOT NULL,          -- receiving | sealed | (pack/forward states)
        priority    INTEGER NOT NULL DEFAULT 0,
        created     REAL NOT NULL,
        updated     REAL NOT NULL,
        instances   INTEGER NOT NULL DEFAULT 0,
        bytes       INTEGER NOT NULL DEFAULT 0,
        reason      TEXT
    );
    CREATE INDEX segments_state ON segments(state, study_key);
    CREATE TABLE instances (
        id              TEXT PRIMARY KEY,   -- opaque, also the spool file name
        segment_id      TEXT NOT NULL REFERENCES segments(id),
        study_key       TEXT NOT NULL,
        content_key     TEXT NOT NULL,
        sop_class       TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        size            INTEGER NOT NULL,   -- plaintext bytes of the Part-10 file
        received        REAL NOT NULL,
        calling_ae      TEXT NOT NULL
    );
    CREATE UNIQUE INDEX instances_content ON instances(content_key);
    CREATE INDEX instances_segment ON instances(segment_id);
    """,
    # version 2: packing and forwarding
    """
    ALTER TABLE segments ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN next_attempt REAL NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN destination TEXT;
    ALTER TABLE segments ADD COLUMN progress INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE segments ADD COLUMN bundle_bytes INTEGER;
    ALTER TABLE segments ADD COLUMN sealed REAL;
    ALTER TABLE segments ADD COLUMN delivered REAL;
    ALTER TABLE instances ADD COLUMN packed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX segments_due ON segments(state, priority, created)
    """,
    # version 3: duplicates are looked up by a keyed hash of the SOP Instance UID first;
    # the content hash is computed only when that finds a candidate (it cost a quarter
    # of the per-image time), so content_key becomes nullable. Rows from version 2 get
    # their sop_key at the next start (`Spool.recover`).
    """
    CREATE TABLE instances_v3 (
        id              TEXT PRIMARY KEY,
        segment_id      TEXT NOT NULL REFERENCES segments(id),
        study_key       TEXT NOT NULL,
        sop_key         TEXT,
        content_key     TEXT,
        sop_class       TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        size            INTEGER NOT NULL,
        received        REAL NOT NULL,
        calling_ae      TEXT NOT NULL,
        packed          INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO instances_v3(id, segment_id, study_key, content_key, sop_class, transfer_syntax,
                             size, received, calling_ae, packed)
        SELECT id, segment_id, study_key, content_key, sop_class, transfer_syntax, size,
               received, calling_ae, packed FROM instances;
    DROP TABLE instances;
    ALTER TABLE instances_v3 RENAME TO instances;
    CREATE UNIQUE INDEX instances_content ON instances(content_key);
    CREATE INDEX instances_segment ON instances(segment_id);
    CREATE INDEX instances_sop ON instances(sop_key)
    """,
    # version 4 (pack-isolation branch; the lead reconciles it with the queue rework):
    # how many acknowledged instances of a segment could not be read back from the spool
    # and are missing from its bundle (`Queue.mark_incomplete`).
    """
    ALTER TABLE segments ADD COLUMN incomplete INTEGER NOT NULL DEFAULT 0
    """,
]


class Index:
    """A thread-safe handle on the queue index (one connection, one lock)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.lock = threading.RLock()
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            check_same_thread=False, timeout=10)
            else:
                self.conn = sqlite3.connect(path, check_same_thread=False, timeout=30,
                                            isolation_level=None)
        except sqlite3.OperationalError as e:
            raise StateError(f"cannot open the queue index {path}: {e}") from None
        self.conn.row_factory = sqlite3.Row
        if not readonly:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        else:
            self.conn.execute("PRAGMA query_only=1")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"queue index {self.path} has schema {version}, newer than this version "
                f"understands ({SCHEMA_VERSION}); refusing to touch it"
            )
        for v in range(version, SCHEMA_VERSION):
            with self.tx():
                self._script(_SCHEMA[v])
                self.conn.execute(f"PRAGMA user_version={v + 1}")

    def _script(self, sql: str) -> None:
        for stmt in sql.split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; durable (synchronous=FULL) when the block exits cleanly."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def open_index(state_dir: Path, readonly: bool = False) -> Index:
    path = state_dir / "queue.db"
    if readonly and not path.exists():
        raise StateError(f"no queue index at {path}: has the appliance run with this config?")
    return Index(path, readonly=readonly)
