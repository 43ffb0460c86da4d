"""The ops link's outbox: events on disk until the broker has acknowledged them.

paho keeps nothing on disk, and the broker may be away for hours while the box works
on; every event (failover, a parked instance, a held bundle, a stuck stage) is written
here first, with its `event_seq`, and counts as sent only when the broker has
acknowledged its PUBLISH (PUBACK, QoS 1). After a reconnect or a restart, what waited is
sent again, oldest first, so the operations center sees each `event_seq` at least once
and can drop repeats by number. The last `keep_acked` acknowledged events are kept, so
that an operations center that lost some (its own database restored, a subscriber that
was down while the broker dropped its queue) can ask for them again (`replay`, the
`replay_events` command).

SQLite (`STATE/ops/outbox.db`, WAL, synchronous=FULL) because it is already how the
box keeps durable small records (queue/index.py), not a format of our own. The outbox
is bounded (`max_events`): on overflow the oldest events are dropped and the number
dropped is kept and reported with the next events (`dropped`), so a gap is visible.
The same file keeps `conn_seq`, the connection counter that survives reboots.

Thread-safe (one connection under a lock: the stages add, the link thread reads and
acknowledges). Bodies are JSON built by messages.py; nothing here inspects them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from appliance.core import durable

MAX_EVENTS = 10_000
KEEP_ACKED = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, body TEXT NOT NULL,
                                   acked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
"""


class Outbox:
    def __init__(self, state_dir: Path, max_events: int = MAX_EVENTS, keep_acked: int = KEEP_ACKED) -> None:
        d = state_dir / "ops"
        durable.make_dirs(d)
        self.path = d / "outbox.db"
        self.max_events = max_events
        self.keep_acked = keep_acked
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(events)")}
        if "acked" not in columns:  # an outbox of the version before: its events are all unsent
            self._db.execute("ALTER TABLE events ADD COLUMN acked INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, k: str) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return int(row[0]) if row else 0

    def _set(self, k: str, v: int) -> None:
        self._db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v",
                         (k, v))

    def next_conn_seq(self) -> int:
        """The next connection's number: one more than any before, across restarts."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._meta("conn_seq") + 1
            self._set("conn_seq", n)
            return n

    def add(self, ts: float, body: dict[str, Any]) -> int:
        """Keep an event; its event_seq. The oldest are dropped beyond `max_events`."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._meta("event_seq") + 1
            self._set("event_seq", seq)
            self._db.execute("INSERT INTO events(seq, ts, body) VALUES(?, ?, ?)",
                             (seq, ts, json.dumps(body, separators=(",", ":"), sort_keys=True)))
            over = self._db.execute("SELECT COUNT(*) FROM events WHERE acked=0").fetchone()[0] \
                - self.max_events
            if over > 0:
                self._db.execute("DELETE FROM events WHERE seq IN"
                                 " (SELECT seq FROM events WHERE acked=0 ORDER BY seq LIMIT ?)", (over,))
                self._set("dropped", self._meta("dropped") + over)
            return seq

    def pending(self, after: int = 0, limit: int = 100) -> list[tuple[int, float, dict[str, Any]]]:
        """Events not yet acknowledged, oldest first, with event_seq greater than `after`."""
        with self._lock:
            rows = self._db.execute("SELECT seq, ts, body FROM events WHERE seq > ? AND acked=0"
                                    " ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [(int(s), float(t), json.loads(b)) for s, t, b in rows]

    def ack(self, seq: int) -> None:
        """The broker has the event: it is sent (kept among the last `keep_acked`)."""
        with self._lock, self._db:
            self._db.execute("UPDATE events SET acked=1 WHERE seq=?", (seq,))
            self._db.execute("DELETE FROM events WHERE acked=1 AND seq <= (SELECT seq FROM events"
                             " WHERE acked=1 ORDER BY seq DESC LIMIT 1 OFFSET ?)", (self.keep_acked,))

    def replay(self, since: int) -> dict[str, int]:
        """Send again the kept events with event_seq greater than `since`: they count as
        not yet acknowledged. Returns how many, and `first`, the oldest event_seq still
        on the box (a `since` below first - 1 leaves a gap the center should know of)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._db.execute("UPDATE events SET acked=0 WHERE seq > ? AND acked=1", (since,)).rowcount
            first = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
            return {"replayed": int(n), "first": int(first) if first is not None else 0,
                    "last_seq": self._meta("event_seq")}

    def counts(self) -> dict[str, int]:
        with self._lock:
            waiting = self._db.execute("SELECT COUNT(*) FROM events WHERE acked=0").fetchone()[0]
            return {"waiting": int(waiting), "dropped": self._meta("dropped"),
                    "last_seq": self._meta("event_seq")}
