"""The ingest record: which bundles the center has ingested, and which wait for a retry.

Owns `<state_dir>/ingest.db` (+ `-wal`, `-shm`): SQLite in WAL mode with
`synchronous=FULL`, so a commit is on disk before it returns (the record of a stored
bundle must survive a power cut, or the next copy of it would be stored again), and
with a busy timeout, so several ingest processes on one state dir take turns.

Tables:
- `ingested (bundle_id, sha256)`: a bundle file (by its id and the SHA-256 of its
  bytes) that reached a verdict (stored, partial or failed), the time, and the receipt
  body written for it (JSON, no patient data); `finished` once the bundle file left
  `claimed/`. A second file with the same id and digest whose first copy was stored or
  partial is a duplicate (`previous`).
- `pending (claim)`: a claimed bundle that could not be stored yet (PACS down,
  Retryable): its attempts, when to try next, and why (an operator-facing reason).

No patient data: ids are the appliance's opaque bundle ids and file digests.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core import durable
from appliance.core.errors import StateError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingested (
    bundle_id TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    verdict   TEXT NOT NULL,
    at        REAL NOT NULL,
    receipt   TEXT NOT NULL,
    finished  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bundle_id, sha256)
);
CREATE TABLE IF NOT EXISTS pending (
    claim     TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    attempts  INTEGER NOT NULL,
    next_at   REAL NOT NULL,
    reason    TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Previous:
    verdict: str
    at: float
    receipt: dict[str, Any]
    finished: bool


class Record:
    def __init__(self, state_dir: Path) -> None:
        durable.make_dirs(state_dir)
        # Two ingest processes started together: SQLite answers the second one's switch to
        # WAL "database is locked" at once, without its busy timeout, so the set-up is
        # serialised by a lock file.
        with (state_dir / "ingest.db.setup").open("a") as setup:
            fcntl.flock(setup, fcntl.LOCK_EX)
            try:
                self.db = sqlite3.connect(state_dir / "ingest.db", timeout=60, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StateError(f"{state_dir / 'ingest.db'} has schema {version}, newer than "
                                     f"this version reads ({SCHEMA_VERSION})")
                self.db.executescript(_SCHEMA)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except sqlite3.Error as e:
                raise StateError(f"cannot open {state_dir / 'ingest.db'}: {e}") from None

    def close(self) -> None:
        self.db.close()

    def previous(self, bundle_id: str, sha256: str) -> Previous | None:
        row = self.db.execute("SELECT verdict, at, receipt, finished FROM ingested "
                              "WHERE bundle_id = ? AND sha256 = ?", (bundle_id, sha256)).fetchone()
        if row is None:
            return None
        return Previous(row[0], row[1], json.loads(row[2]), bool(row[3]))

    def holds(self, bundle_id: str) -> bool:
        """Was any copy of `bundle_id` stored or partly stored?"""
        return self.db.execute("SELECT 1 FROM ingested WHERE bundle_id = ? AND verdict IN "
                               "('stored', 'partial') LIMIT 1", (bundle_id,)).fetchone() is not None

    def ingested(self, bundle_id: str, sha256: str, verdict: str, at: float,
                 receipt: dict[str, Any]) -> None:
        """Record a verdict (before the receipt is written and the file moved)."""
        self.db.execute("INSERT OR REPLACE INTO ingested (bundle_id, sha256, verdict, at, receipt, "
                        "finished) VALUES (?, ?, ?, ?, ?, 0)",
                        (bundle_id, sha256, verdict, at, json.dumps(receipt)))

    def finished(self, bundle_id: str, sha256: str) -> None:
        self.db.execute("UPDATE ingested SET finished = 1 WHERE bundle_id = ? AND sha256 = ?",
                        (bundle_id, sha256))

    def defer(self, claim: str, bundle_id: str, next_at: float, reason: str) -> int:
        """Count a failed attempt of `claim`; returns its attempts so far."""
        self.db.execute("INSERT INTO pending (claim, bundle_id, attempts, next_at, reason) "
                        "VALUES (?, ?, 1, ?, ?) ON CONFLICT(claim) DO UPDATE SET "
                        "attempts = attempts + 1, next_at = excluded.next_at, reason = excluded.reason",
                        (claim, bundle_id, next_at, reason))
        return int(self.db.execute("SELECT attempts FROM pending WHERE claim = ?", (claim,)).fetchone()[0])

    def attempts(self, claim: str) -> int:
        row = self.db.execute("SELECT attempts FROM pending WHERE claim = ?", (claim,)).fetchone()
        return int(row[0]) if row else 0

    def due(self, claim: str, now: float) -> bool:
        row = self.db.execute("SELECT next_at FROM pending WHERE claim = ?", (claim,)).fetchone()
        return row is None or row[0] <= now

    def forget_pending(self, claim: str) -> None:
        self.db.execute("DELETE FROM pending WHERE claim = ?", (claim,))

    def pending(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT claim, bundle_id, attempts, next_at, reason FROM pending "
                              "ORDER BY next_at")
        return [dict(zip(("claim", "bundle_id", "attempts", "next_at", "reason"), r, strict=True))
                for r in cur]
