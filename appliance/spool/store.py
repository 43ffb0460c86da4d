"""The spool: received instances, sealed and durable, until they are packed.

Owns `STATE/spool/` (one sealed file per instance, named by an opaque random id),
`STATE/quarantine/` (files that failed authentication; never deleted by us), and the
`instances` and `segments` rows of the queue index.

The order of `store` is what makes a Success answer safe across a power cut:
1. seal the Part-10 bytes under a fresh per-file key into `spool/.tmp-*`, fsync it;
2. rename it to `spool/<id>` and fsync the directory (`durable.atomic_file`);
3. commit the index row (SQLite, synchronous=FULL).
Only after 3 may the receiver answer Success. A crash before 3 leaves an orphan file that
was never acknowledged; `recover` adopts it in place if it authenticates (read chunk by
chunk and identified from its start, never held whole; the modality may send it again:
the duplicate check makes that harmless) and quarantines it otherwise.

Instances are grouped per study into segments: the open (`receiving`) segment of a study
takes new instances until it reaches the configured count or size, then it is sealed and
a new one opened. A study's first segment (no other segment of the study existed when it
was opened) is sealed at `first_segment_instances` already, so that its first bundle is
packed and on the link within about a second of the first C-STORE instead of after a
hundred images. Which receiving segments are first is kept in memory only (no schema
change; after a restart the open segment takes the normal count). Time-based sealing
belongs to the packer.

Which key: `STATE/spool.keyid` records the public id of the spool key that seals this
spool (written at the first start). `check_key` refuses a different key before anything
is read or moved: a technician who points `spool.key_file` at the wrong file must get a
clear error, not a quarantine folder holding every image the box had not yet sent.

How it fails: `SpoolFullError` when storing would cross the free-space reserve (nothing
stored is touched); `IntegrityError` when a file fails authentication; `KeyFileError`
(exit 78) when the spool key is not the one that sealed the spool; OSError from the
disk passes up to the receiver, which answers Out of Resources.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import hmac
import io
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from appliance.core import crypto, durable
from appliance.core.errors import IntegrityError, KeyFileError, NotFoundError, SpoolFullError
from appliance.queue import routes as queue_routes
from appliance.queue import store as queue_store
from appliance.queue.index import Index
from appliance.queue.state import STATES

log = structlog.get_logger("appliance.spool")

# Room for the sealed file's header and tags, the index row and its WAL frames.
_OVERHEAD = 64 * 1024

# STATE/<this>: the hex id of the spool key that sealed the spool (see `check_key`).
KEY_ID_FILE = "spool.keyid"

# Receiving first segments remembered before the set is pruned of sealed ones.
_FIRST_PRUNE_AT = 64
_STATE_MARKS = ",".join("?" * len(STATES))


def new_id() -> str:
    """An opaque, unguessable, time-sortable id: 12 hex digits of ms time + 16 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver knows about an instance; UIDs are used only for keyed hashes."""

    study_uid: str
    sop_instance_uid: str
    sop_class: str
    transfer_syntax: str
    calling_ae: str
    priority: int = 0  # queue.store.PRIORITY_*: from the routing rules (receive/rules.py)
    route: tuple[str, ...] = ()  # destinations a routing rule named; (): all of them


@dataclass(frozen=True)
class Stored:
    id: str
    segment_id: str
    study_key: str
    duplicate: bool


# Part-10 bytes -> InstanceMeta, or raise ValueError: identifies an orphan at recovery.
# Identifies a spooled instance from its first bytes: (prefix, whether that is all of it).
Adopter = Callable[[bytes, bool], InstanceMeta]

# Recovery identifies an orphan from at most this much of its start (the UIDs are near
# the start; `receive.identify.identify` finds them within it, a deflated one included).
ADOPT_PREFIX = 4 << 20


class Spool:
    def __init__(self, state_dir: Path, key: crypto.SpoolKey, index: Index,
                 reserve_free_bytes: int, segment_max_instances: int = 100,
                 segment_max_bytes: int = 64 << 20, key_file: Path | None = None,
                 first_segment_instances: int = 0) -> None:
        self.dir = state_dir / "spool"
        self.key_id_file = state_dir / KEY_ID_FILE
        self.key_file = key_file  # only to name it in messages
        self._key_checked = False
        self.quarantine_dir = state_dir / "quarantine"
        self.key = key
        self.index = index
        self.reserve = reserve_free_bytes
        self._at_reserve = False  # the last check_room refused (see there)
        self.seg_max_n = segment_max_instances
        self.seg_max_bytes = segment_max_bytes
        # 0: a study's first segment takes as many instances as any other
        self.seg_first_n = min(first_segment_instances or segment_max_instances,
                               segment_max_instances)
        # receiving segments that are their study's first (under index.lock, like the rows)
        self._first: set[str] = set()
        self._hkey = key.index_key()
        for d in (self.dir, self.quarantine_dir):
            durable.make_dirs(d)

    # --- keyed hashes (never reversible without the spool key) ---

    def study_key(self, study_uid: str) -> str:
        return hmac.new(self._hkey, b"study\x00" + study_uid.encode(), hashlib.sha256).hexdigest()[:16]

    def content_key(self, sop_uid: str, digest: bytes) -> str:
        return hmac.new(self._hkey, b"content\x00" + sop_uid.encode() + b"\x00" + digest,
                        hashlib.sha256).hexdigest()

    def sop_key(self, sop_uid: str) -> str:
        return hmac.new(self._hkey, b"sop\x00" + sop_uid.encode(), hashlib.sha256).hexdigest()[:32]

    # --- store ---

    def check_room(self, size: int) -> None:
        """Raise SpoolFullError if storing `size` more bytes would cross the reserve.

        The first refusal is logged once as `spool.reserve_reached` (an ops event: every
        scanner is being answered A700), and the first instance stored again as
        `spool.reserve_left`; not once per instance."""
        free = durable.free_bytes(self.dir)
        if free - size - _OVERHEAD < self.reserve:
            if not self._at_reserve:
                self._at_reserve = True
                log.error("spool.reserve_reached", free_bytes=free, reserve_bytes=self.reserve)
            raise SpoolFullError(
                f"spool filesystem has {free // (1 << 20)} MiB free; reserve is "
                f"{self.reserve // (1 << 20)} MiB"
            )
        if self._at_reserve:
            self._at_reserve = False
            log.warning("spool.reserve_left", free_bytes=free, reserve_bytes=self.reserve)

    def store(self, parts: list[bytes | memoryview], meta: InstanceMeta,
              check_reserve: bool = True) -> Stored:
        """Durably store one instance (the concatenation of `parts`). See module docstring."""
        size = sum(len(p) for p in parts)
        if check_reserve:
            self.check_room(size)
        digest = _Memo(lambda: _sha256(parts))
        checked: set[str] = set()
        dup = self._duplicate(self.index.conn, meta, digest, checked)
        if dup:
            return dup
        rid = new_id()
        with durable.atomic_file(self.dir / rid) as f:
            crypto.seal_spool_parts(self.key, rid, parts, f)
        return self._record(rid, size, meta, digest, checked)

    def incoming(self) -> Incoming:
        """Start a spool file that is sealed while its instance arrives (`store_incoming`)."""
        return Incoming(self, new_id())

    def store_incoming(self, inc: Incoming, meta: InstanceMeta) -> Stored:
        """Durably store an instance sealed by `inc` as it arrived (same order as `store`).

        `inc` is finished here (last chunk, fsync); a duplicate is discarded. On any
        exception the temp file is removed.
        """
        try:
            inc.finish()
            digest = _Memo(lambda: self._digest_of(inc.path, inc.rid))
            checked: set[str] = set()
            dup = self._duplicate(self.index.conn, meta, digest, checked)
            if dup:
                inc.discard()
                return dup
            os.rename(inc.path, self.dir / inc.rid)
        except BaseException:
            inc.discard()
            raise
        durable.fsync_dir(self.dir)
        return self._record(inc.rid, inc.size, meta, digest, checked)

    def _digest_of(self, path: Path, rid: str) -> bytes:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in crypto.open_spool_file(self.key, rid, f):
                h.update(chunk)
        return h.digest()

    def _duplicate(self, conn: sqlite3.Connection, meta: InstanceMeta, digest: _Memo,
                   checked: set[str]) -> Stored | None:
        """The spooled copy of this very instance (same SOP Instance UID, same bytes), if any.

        Looked up by `sop_key` first, so the content hash is computed only for a candidate
        (a re-sent instance); a candidate stored without one gets it now, from its file.
        `checked` collects rows already compared (the caller looks again, inside its
        transaction, only at rows that appeared since).
        """
        skey = self.sop_key(meta.sop_instance_uid)
        with self.index.lock:
            rows = conn.execute("SELECT id, segment_id, study_key, content_key FROM instances"
                                " WHERE sop_key=?", (skey,)).fetchall()
        for r in rows:
            if r["id"] in checked:
                continue
            checked.add(r["id"])
            ours = self.content_key(meta.sop_instance_uid, digest())
            theirs = r["content_key"] or self._fill_content_key(conn, r["id"], meta.sop_instance_uid)
            if theirs == ours:
                return Stored(r["id"], r["segment_id"], r["study_key"], True)
        return None

    def _fill_content_key(self, conn: sqlite3.Connection, rid: str, sop_uid: str) -> str | None:
        try:
            h = hashlib.sha256()
            for chunk in self.open(rid):
                h.update(chunk)
        except (NotFoundError, IntegrityError, OSError):
            return None  # not a usable copy: never a reason to drop the new one
        key = self.content_key(sop_uid, h.digest())
        with self.index.lock, contextlib.suppress(sqlite3.IntegrityError):
            conn.execute("UPDATE instances SET content_key=? WHERE id=?", (key, rid))
        return key

    def _record(self, rid: str, size: int, meta: InstanceMeta, digest: _Memo,
                checked: set[str], unlink_on_error: bool = True) -> Stored:
        """Commit the index row of the durable spool file `rid` (step 3 of the order)."""
        skey = self.study_key(meta.study_uid)
        now = time.time()
        try:
            with self.index.tx() as c:
                # Another association may have stored the same instance meanwhile.
                dup = self._duplicate(c, meta, digest, checked)
                if dup is None:
                    seg = self._open_segment(c, skey, size, now)
                    if meta.priority:
                        queue_store.raise_priority(c, skey, meta.priority)
                    if meta.route:
                        queue_routes.set_route(c, skey, meta.route)
                    ckey = self.content_key(meta.sop_instance_uid, digest.value) if digest.done else None
                    c.execute(
                        "INSERT INTO instances(id, segment_id, study_key, sop_key, content_key,"
                        " sop_class, transfer_syntax, size, received, calling_ae)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (rid, seg, skey, self.sop_key(meta.sop_instance_uid), ckey, meta.sop_class,
                         meta.transfer_syntax, size, now, meta.calling_ae),
                    )
                    c.execute("UPDATE segments SET instances=instances+1, bytes=bytes+?, updated=?"
                              " WHERE id=?", (size, now, seg))
        except BaseException:
            if unlink_on_error:
                durable.unlink_durable(self.dir / rid)
            raise
        if dup is not None:
            durable.unlink_durable(self.dir / rid)
            return dup
        return Stored(rid, seg, skey, False)

    def _open_segment(self, conn: sqlite3.Connection, study_key: str, size: int, now: float) -> str:
        """The study's receiving segment, sealing it first if this instance would overflow it.

        Runs inside the receive transaction for every instance: one indexed lookup, and
        one more only when a segment is opened (is it the study's first?)."""
        row = conn.execute("SELECT id, instances, bytes FROM segments WHERE study_key=? AND"
                           " state='receiving' ORDER BY created DESC LIMIT 1", (study_key,)).fetchone()
        if row and row["instances"] > 0 and (
            row["instances"] >= self.segment_limit(str(row["id"]))
            or row["bytes"] + size > self.seg_max_bytes
        ):
            queue_store.transition(conn, row["id"], "seal", now)
            self._first.discard(str(row["id"]))
            row = None
        if row:
            return str(row["id"])
        seg = new_id()
        first = conn.execute(  # by the segments_state index: one probe per state
            f"SELECT 1 FROM segments WHERE state IN ({_STATE_MARKS}) AND study_key=? LIMIT 1",  # noqa: S608
            (*STATES, study_key)).fetchone() is None
        queue_store.open_segment(conn, seg, study_key, now)
        if first and self.seg_first_n < self.seg_max_n:
            self._remember_first(conn, seg)
        return seg

    def segment_limit(self, seg_id: str) -> int:
        """How many instances the receiving segment `seg_id` takes before it is sealed."""
        return self.seg_first_n if seg_id in self._first else self.seg_max_n

    def _remember_first(self, conn: sqlite3.Connection, seg_id: str) -> None:
        """Note a study's first segment; forget those no longer receiving (sealed by the
        packer's clock, or opened by a transaction that rolled back) when the set grows."""
        if len(self._first) >= _FIRST_PRUNE_AT:
            receiving = {r["id"] for r in conn.execute(
                "SELECT id FROM segments WHERE state='receiving'")}
            self._first &= receiving
        self._first.add(seg_id)

    # --- read ---

    def open(self, rid: str) -> Iterator[bytes]:
        """Yield the verified plaintext of a spooled instance, chunk by chunk."""
        try:
            f = (self.dir / rid).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"spool file {rid} is missing") from None
        with f:
            yield from crypto.open_spool_file(self.key, rid, f)

    def read(self, rid: str) -> bytes:
        return b"".join(self.open(rid))

    # --- which key ---

    def _sealed_key_ids(self) -> set[bytes]:
        """Key ids in the headers of the sealed files now in the spool (not verified)."""
        ids = set()
        for p in self.dir.iterdir():
            if p.name.startswith(durable.TEMP_PREFIX) or not p.is_file():
                continue
            try:
                with p.open("rb") as f:
                    head = f.read(16)
            except OSError:
                continue
            if head[:8] == crypto.SPOOL_MAGIC and len(head) == 16:
                ids.add(head[8:16])
        return ids

    def check_key(self) -> None:
        """Refuse to run on this spool with a spool key other than the one that sealed it.

        The first start records the key's public id in STATE/spool.keyid. A spool from
        before that file existed is judged by the key ids in its files' headers: if there
        are sealed files and none names this key, the key is wrong. Raises KeyFileError
        (exit 78: a configuration problem) and touches nothing.
        """
        mine = self.key.id.hex()
        try:
            recorded: str | None = self.key_id_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            recorded = None
        if recorded is None:
            ids = self._sealed_key_ids()
            if ids and self.key.id not in ids:
                recorded = sorted(ids)[0].hex()
        if recorded is not None and recorded != mine:
            key = f"spool key {self.key_file}" if self.key_file else "the spool key"
            raise KeyFileError(
                f"{key} (key id {mine}) is not the key that sealed the spool in {self.dir}"
                f" (key id {recorded}); point spool.key_file at the original key file"
                f" (nothing was moved or quarantined)")
        if recorded is None:
            durable.atomic_write(self.key_id_file, (mine + "\n").encode())
        self._key_checked = True

    # --- recovery ---

    def quarantine(self, name: str, why: str) -> None:
        """Move a spool file aside; it is kept for a human, never deleted."""
        src = self.dir / name
        dst = self.quarantine_dir / f"{name}.{int(time.time())}"
        shutil.move(src, dst)
        durable.fsync_dir(self.quarantine_dir)
        durable.fsync_dir(self.dir)
        log.error("spool.quarantined", file=name, reason=why)

    def recover(self, adopt: Adopter | None = None) -> dict[str, int]:
        """Reconcile files and records after a crash. Returns counts of what was done."""
        if not self._key_checked:
            self.check_key()  # never quarantine a whole spool because of the wrong key
        counts = {"temps_removed": durable.remove_stale_temps(self.dir), "adopted": 0,
                  "adopt_failed": 0, "quarantined": 0, "missing": 0}
        files = {p.name for p in self.dir.iterdir() if p.is_file()}
        rows = {r["id"] for r in self.index.query("SELECT id FROM instances")}
        for rid in sorted(rows - files):
            # Cannot happen with the store order above short of disk damage; say so loudly.
            log.error("spool.record_without_file", instance=rid)
            counts["missing"] += 1
        if adopt is not None:
            counts["keyed"] = self._key_legacy_rows(adopt)
        for name in sorted(files - rows):
            counts[self._adopt(name, adopt)] += 1
        return counts

    def _head(self, rid: str) -> tuple[bytes, int]:
        """Authenticate a whole spool file, streaming, and keep only its start: (the first
        ADOPT_PREFIX bytes of the plaintext, its size). Raises IntegrityError."""
        head = bytearray()
        size = 0
        for chunk in self.open(rid):
            if len(head) < ADOPT_PREFIX:
                head += chunk[: ADOPT_PREFIX - len(head)]
            size += len(chunk)
        return bytes(head), size

    def _adopt(self, name: str, adopt: Adopter | None) -> str:
        """Give an orphan spool file (sealed and renamed, but its row never committed: a
        crash between steps 2 and 3, so never acknowledged) its row, in place: it is
        authenticated chunk by chunk and identified from its start, so no orphan is ever
        held whole in memory. Returns the count it goes under."""
        try:
            head, size = self._head(name)
        except IntegrityError as e:
            self.quarantine(name, str(e))
            return "quarantined"
        try:
            meta = adopt(head, size == len(head)) if adopt else None
        except Exception as e:  # any failure to parse these bytes
            # (pydicom raises more than ValueError) must not stop the daemon starting.
            self.quarantine(name, f"orphan spool file without readable identifiers ({type(e).__name__})")
            return "quarantined"
        if meta is None:
            self.quarantine(name, "orphan spool file without readable identifiers")
            return "quarantined"
        try:
            # The file keeps its name: it was sealed under it (the per-file key is bound to
            # it). A duplicate of a spooled instance is dropped by _record as on receive.
            self._record(name, size, meta, _Memo(lambda: self._digest_of(self.dir / name, name)),
                         set(), unlink_on_error=False)
        except (OSError, sqlite3.Error) as e:
            # Too full to commit: keep the orphan (never acknowledged) for a later start
            # rather than fail to start and refuse every new image.
            log.error("spool.adopt_failed", file=name, error_type=type(e).__name__)
            return "adopt_failed"
        return "adopted"

    def _key_legacy_rows(self, adopt: Adopter) -> int:
        """Give rows stored by schema version 2 their `sop_key`, so duplicates still match."""
        n = 0
        for r in self.index.query("SELECT id FROM instances WHERE sop_key IS NULL AND packed=0"):
            try:
                head, size = self._head(r["id"])
                meta = adopt(head, size == len(head))
            except Exception as e:  # unreadable: recovery and packing deal with it
                log.warning("spool.unkeyed", instance=r["id"], error_type=type(e).__name__)
                continue
            with self.index.tx() as c:
                c.execute("UPDATE instances SET sop_key=? WHERE id=?",
                          (self.sop_key(meta.sop_instance_uid), r["id"]))
            n += 1
        return n

    def stats(self) -> dict[str, int]:
        r = self.index.query("SELECT COUNT(*) n, COALESCE(SUM(size),0) b FROM instances")[0]
        return {"instances": r["n"], "bytes": r["b"], "free_bytes": durable.free_bytes(self.dir),
                "reserve_bytes": self.reserve}




class _PartsReader(io.RawIOBase):
    """A seekable read-only file over a list of byte buffers, without concatenating them."""

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self._starts = []
        pos = 0
        for p in self._parts:
            self._starts.append(pos)
            pos += len(p)
        self._size = pos
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(b).cast("B")
        n = 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        while n < len(out) and 0 <= i < len(self._parts) and self._pos < self._size:
            part, off = self._parts[i], self._pos - self._starts[i]
            take = min(len(out) - n, len(part) - off)
            out[n:n + take] = part[off:off + take]
            n += take
            self._pos += take
            i += 1
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._size - self._pos)
        buf = bytearray(min(size, max(0, self._size - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])


def reader(parts: list[bytes | memoryview]) -> BinaryIO:
    return _PartsReader(parts)  # type: ignore[return-value]



class _Memo:
    """A value computed at most once, on first use (the content hash of an instance)."""

    def __init__(self, fn: Callable[[], bytes]) -> None:
        self._fn = fn
        self.done = False
        self.value = b""

    def __call__(self) -> bytes:
        if not self.done:
            self.value = self._fn()
            self.done = True
        return self.value


def _sha256(parts: list[bytes | memoryview]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


class Incoming:
    """A spool file being sealed while its instance arrives: `STATE/spool/.tmp-<id>`.

    Nothing in it is usable until `Spool.store_incoming` has finished, renamed and recorded
    it; a crash before that leaves a temp file that `recover` removes (it was never
    acknowledged). Not thread-safe: one instance, one writer.
    """

    def __init__(self, spool: Spool, rid: str) -> None:
        self.rid = rid
        self.path = spool.dir / f"{durable.TEMP_PREFIX}{rid}"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")
        self._sealer = crypto.SpoolSealer(spool.key, rid, self._f)

    @property
    def size(self) -> int:
        return self._sealer.size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._sealer.write(data)

    def finish(self) -> None:
        if self._f is None:
            raise ValueError("incoming spool file already closed")
        self._sealer.finish()
        durable.fsync_file(self._f)
        self._f.close()
        self._f = None

    def discard(self) -> None:
        """Close and remove the temp file (idempotent; safe after `finish` or a rename)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
