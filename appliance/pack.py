"""Pack: turn sealed segments of spooled instances into encrypted, compressed bundles.

Owns the step from `sealed` to `ready`. For a sealed segment it reads each instance from
the spool (authenticated decryption), compresses it losslessly in the codec worker pool
(verifying by decoding again when `pack.verify`), and streams it into one bundle file
(`bundle.BundleWriter`) that is written atomically into `STATE/bundles/`. Then, in this
order, so that a crash at any point loses nothing and duplicates nothing:

1. the bundle file is durable (atomic_file: fsync, rename, fsync dir);
2. one transaction marks the segment `ready` and its instances `packed`;
3. the spool files are unlinked (one directory fsync), then the packed rows deleted.

A crash before 2 leaves the segment `sealed`: it is packed again and the bundle file
replaced. A crash between 2 and 3 leaves packed rows whose spool files `recover` removes.

Sealing policy (pure, `due_for_sealing`): a `receiving` segment is sealed when its study
has been quiet for `pack.study_quiet_s`, or when it has been open for
`pack.segment_max_age_s` while the study is still arriving (so forwarding overlaps
receiving); count and size limits are applied by the spool as instances arrive.

How it fails: an instance that fails authentication in the spool is quarantined and
left out (logged as an error: it cannot be sent, and must not block the study); an
instance the codec cannot compress is sent unchanged; a verification mismatch sends the
original and logs `pack.verify_failed`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import dcmread

from appliance import crypto, durable
from appliance.bundle import BundleWriter
from appliance.codec import CodecPool, Result, compress
from appliance.config import Pack
from appliance.errors import IntegrityError
from appliance.queue import Queue
from appliance.spool import Spool

log = structlog.get_logger("appliance.pack")


@dataclass(frozen=True)
class SegmentTimes:
    created: float
    updated: float


def may_pack_now(sealed_at: float, receiving_burst: bool, cfg: Pack, now: float) -> bool:
    """Whether to start packing a sealed segment now.

    While a scanner is sending a burst (images back to back), packing waits, at most
    `pack.segment_max_age_s` after the segment was sealed: on a small box the
    compression would otherwise take CPU from the receiver and keep the scanner waiting
    for every C-STORE response. A burst is short (a 300-slice CT takes ~1.5 s here), and
    a scanner that sends slowly leaves gaps in which packing proceeds as before.
    """
    return not receiving_burst or now - sealed_at >= cfg.segment_max_age_s


def due_for_sealing(seg: SegmentTimes, cfg: Pack, now: float) -> str | None:
    """Why a receiving segment should be sealed now ("quiet", "age"), or None."""
    if now - seg.updated >= cfg.study_quiet_s:
        return "quiet"
    if now - seg.created >= cfg.segment_max_age_s:
        return "age"
    return None


class Packer:
    def __init__(self, cfg: Pack, spool: Spool, queue: Queue, recipients: Sequence[Any],
                 pool: CodecPool, receiving_burst: Callable[[], bool] = lambda: False) -> None:
        self.cfg = cfg
        self.receiving_burst = receiving_burst
        self.spool = spool
        self.queue = queue
        self.index = spool.index
        self.recipients = list(recipients)
        self.pool = pool
        self.window = max(2, 2 * pool.workers)

    def seal_due(self, now: float) -> int:
        rows = self.index.query("SELECT id, created, updated FROM segments WHERE state='receiving'")
        sealed = 0
        for r in rows:
            why = due_for_sealing(SegmentTimes(r["created"], r["updated"]), self.cfg, now)
            if why is None:
                continue
            with self.index.tx() as c:
                # Re-check inside the transaction: an instance may have just arrived.
                n = c.execute("UPDATE segments SET state='sealed', sealed=?, updated=updated"
                              " WHERE id=? AND state='receiving' AND updated=?",
                              (now, r["id"], r["updated"])).rowcount
            if n:
                sealed += 1
                log.info("segment.sealed", segment=r["id"], why=why)
        return sealed

    def pack_pending(self) -> int:
        rows = self.index.query("SELECT id, updated FROM segments WHERE state='sealed'"
                                " ORDER BY priority DESC, created")
        packed = 0
        for r in rows:
            if not may_pack_now(r["updated"], self.receiving_burst(), self.cfg, time.time()):
                continue
            self.pack(r["id"])
            packed += 1
        return packed

    def pack(self, seg_id: str) -> None:
        seg = self.queue.get(seg_id)
        rows = self.index.query("SELECT id, size FROM instances WHERE segment_id=? AND packed=0"
                                " ORDER BY received, id", (seg_id,))
        t0 = time.monotonic()
        stats = collections.Counter[str]()
        with durable.atomic_file(self.queue.path(seg_id)) as f:
            writer = BundleWriter(f, seg_id, self.recipients, seg.study_key)
            pending: collections.deque[tuple[str, Future[Prepared]]] = collections.deque()
            for row in rows:
                pending.append((row["id"], self._submit(row["id"])))
                while len(pending) >= self.window:
                    self._write(writer, *pending.popleft(), stats)
            while pending:
                self._write(writer, *pending.popleft(), stats)
            writer.close()
            size = f.tell()
        now = time.time()
        with self.index.tx() as c:
            c.execute("UPDATE segments SET state='ready', bundle_bytes=?, updated=? WHERE id=?",
                      (size, now, seg_id))
            c.execute("UPDATE instances SET packed=1 WHERE segment_id=?", (seg_id,))
        self.remove_packed(seg_id)
        log.info("segment.packed", segment=seg_id, instances=len(rows), bytes_in=seg.bytes,
                 bytes_out=size, seconds=round(time.monotonic() - t0, 3), **stats)

    def _submit(self, rid: str) -> Future[Prepared]:
        # The worker reads, decrypts and identifies the instance itself: done here, that
        # work held the GIL against the receiver's threads (the scanner waits on them).
        args = (str(self.spool.dir / rid), rid, self.spool.key.key, self.cfg.codec, self.cfg.verify)
        return self.pool.submit_call(prepare, args, lambda: prepare(*args[:3], "none", False,
                                                                    reason="worker-crashed"))

    def _write(self, writer: BundleWriter, rid: str, fut: Future[Prepared],
               stats: collections.Counter[str]) -> None:
        try:
            p = fut.result()
        except IntegrityError as e:
            self.spool.quarantine(rid, str(e))
            stats["unreadable"] += 1
            return
        except FileNotFoundError:
            log.error("pack.instance_missing", instance=rid)
            stats["unreadable"] += 1
            return
        res = p.result
        if res.reason.startswith("verify-"):
            log.error("pack.verify_failed", instance=rid, codec=self.cfg.codec, reason=res.reason)
        stats[res.action] += 1
        writer.begin_instance({**p.facts, "transfer_syntax": res.transfer_syntax,
                               "action": res.action, "reason": res.reason})
        writer.write(res.data)
        writer.end_instance()

    def remove_packed(self, seg_id: str | None = None) -> int:
        """Unlink spool files of packed instances, then forget them (crash-safe order)."""
        where, args = ("segment_id=? AND packed=1", (seg_id,)) if seg_id else ("packed=1", ())
        rows = self.index.query(f"SELECT id FROM instances WHERE {where}", args)  # noqa: S608
        for r in rows:
            with contextlib.suppress(FileNotFoundError):
                (self.spool.dir / r["id"]).unlink()
        if rows:
            durable.fsync_dir(self.spool.dir)
            with self.index.tx() as c:
                c.execute(f"DELETE FROM instances WHERE {where}", args)  # noqa: S608
        return len(rows)


@dataclass(frozen=True)
class Prepared:
    """One instance ready for the bundle: the codec's result and the manifest facts."""

    result: Result
    facts: dict[str, Any]


def prepare(path: str, rid: str, spool_key: bytes, codec: str, verify: bool,
            reason: str | None = None) -> Prepared:
    """In a codec worker: read and authenticate a spooled instance, then compress it.

    Raises IntegrityError (the file fails authentication) or FileNotFoundError; the
    packer quarantines or reports those. `reason` marks a pass-through made after the
    workers crashed on this instance.
    """
    with open(path, "rb") as f:
        original = b"".join(crypto.open_spool_file(crypto.SpoolKey(spool_key), rid, f))
    meta = dcmread(io.BytesIO(original), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    res = compress(original, codec, verify)
    if reason is not None:
        res = dataclasses.replace(res, reason=reason)
    return Prepared(res, {
        "sop_instance_uid": str(meta.file_meta.MediaStorageSOPInstanceUID),
        "sop_class": str(meta.file_meta.MediaStorageSOPClassUID),
        "received_transfer_syntax": str(meta.file_meta.TransferSyntaxUID),
        "received_size": len(original),
        "received_sha256": hashlib.sha256(original).hexdigest(),
    })
