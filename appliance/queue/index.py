"""The queue index: one SQLite database in the state directory.

Owns `STATE/queue.db` (+ `-wal`, `-shm`). WAL mode lets the CLI read while the daemon
writes; `synchronous=FULL` makes every commit durable before it returns, which is what
lets the receiver answer Success right after its commit. The schema is versioned with
`PRAGMA user_version`; `open_index` migrates forward. A newer schema is used as it is
only when the newer release said so: the table `schema_compat` (outside the versioned
schema: created on open, ignored by releases that do not know it) holds `readable_by`, the
lowest schema version whose code may still read and write this database (a migration that
only adds tables, or columns with defaults, keeps the previous release's number). A
newer schema whose `readable_by` is above ours, or that has none, is refused untouched
(StateError). This is what lets an update fall back to the old slot after its trial boot
migrated the index (docs/updates.md, "Formats across releases").

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

SCHEMA_VERSION = 7
# The lowest schema version whose code can use a database of SCHEMA_VERSION. Raise it
# (to SCHEMA_VERSION) only for a migration the previous release cannot live with; then
# an update that falls back after its trial boot leaves a daemon that cannot start.
READABLE_BY = 7

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
    # version 4: forwarding per instance. A bundle's instances that one destination has
    # stored, that failed there (suspects, with strikes) or that were parked apart; a
    # parked instance is a queue item of its own (`parent` = the bundle whose file holds
    # it, `only_index` = its index in that bundle's manifest). `incomplete`: acknowledged
    # instances of the segment that could not be read back when it was packed.
    """
    ALTER TABLE segments ADD COLUMN parent TEXT;
    ALTER TABLE segments ADD COLUMN only_index INTEGER;
    ALTER TABLE segments ADD COLUMN incomplete INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX segments_parent ON segments(parent);
    CREATE TABLE bundle_instances (
        item_id     TEXT NOT NULL,
        idx         INTEGER NOT NULL,       -- index in the bundle's manifest
        state       TEXT NOT NULL,          -- delivered | suspect | parked
        strikes     INTEGER NOT NULL DEFAULT 0,
        reason      TEXT,
        PRIMARY KEY (item_id, idx)
    )
    """,
    # version 5: failover. `deliveries`: one row per (item, destination) it was tried on,
    # the per-destination detail of the item's overall state in `segments`. Its `state`
    # is written only with the item's own transition (queue.state DELIVERY_TABLE).
    # `destinations`: each destination's health (forward.failover), so that a restart
    # does not forget that the primary is down. What a destination holds of a bundle is
    # per destination (an instance delivered to A is not delivered to B); suspects and
    # parked instances stay per bundle (destination ''). Rows of version 4 keep what they
    # said: a delivered instance was at the destination the item was last claimed for.
    """
    CREATE TABLE deliveries (
        item_id      TEXT NOT NULL,
        destination  TEXT NOT NULL,
        state        TEXT NOT NULL,         -- active | waiting | moved | held | delivered | failed
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        last_error   TEXT,
        bytes_done   INTEGER NOT NULL DEFAULT 0,
        started      REAL,
        updated      REAL NOT NULL,
        delivered    REAL,
        PRIMARY KEY (item_id, destination)
    );
    INSERT INTO deliveries(item_id, destination, state, attempts, next_attempt, last_error,
                           bytes_done, updated, delivered)
        SELECT id, destination,
               CASE state WHEN 'delivered' THEN 'delivered' WHEN 'active' THEN 'active'
                          WHEN 'held' THEN 'held' WHEN 'failed' THEN 'failed' ELSE 'waiting' END,
               attempts, next_attempt, reason, progress, updated, delivered
        FROM segments WHERE destination IS NOT NULL
              AND state IN ('ready', 'active', 'deferred', 'held', 'delivered', 'failed');
    CREATE TABLE destinations (
        name        TEXT PRIMARY KEY,
        up          INTEGER NOT NULL,
        since       REAL NOT NULL DEFAULT 0,
        failures    INTEGER NOT NULL DEFAULT 0,
        probes      INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT,                   -- a reason class, never a peer's text
        next_probe  REAL NOT NULL DEFAULT 0
    );
    CREATE TABLE bundle_instances_v5 (
        item_id     TEXT NOT NULL,
        destination TEXT NOT NULL DEFAULT '',  -- '' for suspects and parked (per bundle)
        idx         INTEGER NOT NULL,
        state       TEXT NOT NULL,          -- delivered | suspect | parked
        strikes     INTEGER NOT NULL DEFAULT 0,
        reason      TEXT,
        PRIMARY KEY (item_id, destination, idx)
    );
    INSERT INTO bundle_instances_v5(item_id, destination, idx, state, strikes, reason)
        SELECT b.item_id,
               CASE WHEN b.state = 'delivered' THEN COALESCE(s.destination, '') ELSE '' END,
               b.idx, b.state, b.strikes, b.reason
        FROM bundle_instances b LEFT JOIN segments s ON s.id = b.item_id;
    DROP TABLE bundle_instances;
    ALTER TABLE bundle_instances_v5 RENAME TO bundle_instances
    """,
    # version 6: end-to-end receipts (forward.receipts). What the reading center signed
    # that it did with a bundle delivered to a destination with `receipt_key`: the verdict
    # (stored | partial | failed | duplicate), when the appliance recorded it, the counts
    # of instances stored and failed there, and the center's name. NULL: no receipt yet
    # (or a destination without receipts). Rows of version 5 have none.
    """
    ALTER TABLE deliveries ADD COLUMN receipt TEXT;
    ALTER TABLE deliveries ADD COLUMN receipt_at REAL;
    ALTER TABLE deliveries ADD COLUMN receipt_stored INTEGER;
    ALTER TABLE deliveries ADD COLUMN receipt_failed INTEGER;
    ALTER TABLE deliveries ADD COLUMN receipt_center TEXT
    """,
    # version 7: routes and copies. `route`: the destinations a routing rule named for the
    # item's study (",center-b,archive,"; NULL: every destination), so that a restart
    # keeps it. `copy_to`: the copy destination (`mode = "copy"`) an item is pinned to - a
    # copy of a bundle is an item of its own (`parent` = the bundle, `only_index` NULL) -
    # and a parked instance of such a copy. `copied`: a bundle's copy items have been
    # made. Bundles already delivered or failed are not copied after the upgrade.
    """
    ALTER TABLE segments ADD COLUMN route TEXT;
    ALTER TABLE segments ADD COLUMN copy_to TEXT;
    ALTER TABLE segments ADD COLUMN copied INTEGER NOT NULL DEFAULT 0;
    UPDATE segments SET copied=1 WHERE state IN ('delivered', 'failed') OR parent IS NOT NULL;
    CREATE INDEX segments_copied ON segments(copied, state)
    """,
]


class Index:
    """A thread-safe handle on the queue index (one connection, one lock)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.newer: int | None = None  # a newer release's schema, used as it is
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
            readable_by = self._readable_by()
            if readable_by is None or readable_by > SCHEMA_VERSION:
                raise StateError(
                    f"queue index {self.path} has schema {version}, newer than this version "
                    f"understands ({SCHEMA_VERSION}); refusing to touch it"
                )
            self.newer = version  # used as it is: its additions are ignored
            return
        for v in range(version, SCHEMA_VERSION):
            with self.tx():
                self._script(_SCHEMA[v])
                self.conn.execute(f"PRAGMA user_version={v + 1}")
        with self.tx():
            self.conn.execute("CREATE TABLE IF NOT EXISTS schema_compat (readable_by INTEGER NOT NULL)")
            self.conn.execute("DELETE FROM schema_compat")
            self.conn.execute("INSERT INTO schema_compat VALUES (?)", (READABLE_BY,))

    def _readable_by(self) -> int | None:
        try:
            row = self.conn.execute("SELECT min(readable_by) FROM schema_compat").fetchone()
        except sqlite3.OperationalError:  # no such table: a release that did not say
            return None
        return row[0] if row and isinstance(row[0], int) else None

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
