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

Instances of `pack.stream_threshold_mb` or more (large multi-frame objects) take the
streaming path (`stream_pack`): the worker compresses frame by frame into a sealed temp
file (`STATE/spool/.tmp-pack-*`, named here so this thread removes it whatever happens
to the worker) and returns small facts; this thread copies the temp into the bundle in
1 MiB pieces. Whatever that path passes through, and the fallback after workers died on
a large instance, is copied from the sealed spool file chunk by chunk. Memory stays
near a chunk and a few frames whatever the instance size (docs/benchmarks.md, "Memory").

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
import functools
import hashlib
import io
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import dcmread

from appliance.bundle.format import BundleWriter
from appliance.core import crypto, durable, failpoints
from appliance.core.config import Pack
from appliance.core.errors import IntegrityError
from appliance.pack import stream as stream_pack
from appliance.pack.codec import Result, compress
from appliance.pack.pool import CodecPool
from appliance.pack.stream import Streamed
from appliance.queue.store import Queue, transition
from appliance.spool.store import Spool

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
                 pool: CodecPool, receiving_burst: Callable[[], bool] = lambda: False,
                 beat: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.beat = beat  # progress, for the stage supervisor (health/supervisor.py)
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
                cur = c.execute("SELECT 1 FROM segments WHERE id=? AND state='receiving' AND updated=?",
                                (r["id"], r["updated"])).fetchone()
                if cur is not None:  # `updated` stays the time of the last instance
                    transition(c, r["id"], "seal", now, sealed=now, updated=r["updated"])
            if cur is not None:
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
        failpoints.hit("pack.hang")
        seg = self.queue.get(seg_id)
        rows = self.index.query("SELECT id, size FROM instances WHERE segment_id=? AND packed=0"
                                " ORDER BY received, id", (seg_id,))
        t0 = time.monotonic()
        stats = collections.Counter[str]()
        pending: collections.deque[_Pending] = collections.deque()
        try:
            with durable.atomic_file(self.queue.path(seg_id)) as f:
                writer = BundleWriter(f, seg_id, self.recipients, seg.study_key)
                for row in rows:
                    pending.append(self._submit(row["id"], row["size"]))
                    while len(pending) >= self.window:
                        self._write(writer, pending.popleft(), stats)
                while pending:
                    self._write(writer, pending.popleft(), stats)
                writer.close()
                size = f.tell()
        finally:
            for job in pending:  # an error left work in flight: drop its temp when done
                if job.temp:
                    job.future.add_done_callback(functools.partial(_remove_after, job.temp))
        now = time.time()
        with self.index.tx() as c:
            transition(c, seg_id, "packed", now, bundle_bytes=size)
            c.execute("UPDATE instances SET packed=1 WHERE segment_id=?", (seg_id,))
        self.remove_packed(seg_id)
        log.info("segment.packed", segment=seg_id, instances=len(rows), bytes_in=seg.bytes,
                 bytes_out=size, seconds=round(time.monotonic() - t0, 3), **stats)

    def _submit(self, rid: str, size: int) -> _Pending:
        # The worker reads, decrypts and identifies the instance itself: done here, that
        # work held the GIL against the receiver's threads (the scanner waits on them).
        path = str(self.spool.dir / rid)
        key = self.spool.key.key
        if size >= self.cfg.stream_threshold_mb << 20:
            # Named here, so that this thread removes it whatever happens to the worker;
            # the prefix makes Spool.recover remove it after a crash of the daemon.
            temp = str(self.spool.dir / f"{durable.TEMP_PREFIX}pack-{secrets.token_hex(8)}")
            args: tuple[Any, ...] = (path, rid, key, self.cfg.codec, self.cfg.verify, temp)
            return _Pending(rid, self.pool.submit_call(stream_pack.prepare_stream, args,
                                                       stream_pack.crashed), temp)
        args = (path, rid, key, self.cfg.codec, self.cfg.verify)
        return _Pending(rid, self.pool.submit_call(prepare, args, lambda: prepare(
            path, rid, key, "none", False, reason="worker-crashed")), None)

    def _write(self, writer: BundleWriter, job: _Pending, stats: collections.Counter[str]) -> None:
        rid = job.rid
        try:
            try:
                p = job.future.result()
                if isinstance(p, Streamed) and p.facts is None:  # the workers died on it
                    p = stream_pack.passthrough_facts(str(self.spool.dir / rid), rid,
                                                      self.spool.key.key, p.reason)
            except IntegrityError as e:
                self.spool.quarantine(rid, str(e))
                stats["unreadable"] += 1
                return
            except FileNotFoundError:
                log.error("pack.instance_missing", instance=rid)
                stats["unreadable"] += 1
                return
            if isinstance(p, Streamed):
                self._write_streamed(writer, rid, p, job.temp or "", stats)
                return
            res = p.result
            if res.reason.startswith("verify-"):
                log.error("pack.verify_failed", instance=rid, codec=self.cfg.codec, reason=res.reason)
            stats[res.action] += 1
            writer.begin_instance({**p.facts, "transfer_syntax": res.transfer_syntax,
                                   "action": res.action, "reason": res.reason})
            writer.write(res.data)
            writer.end_instance()
            self.beat()
        finally:
            if job.temp:
                _remove(job.temp)

    def _write_streamed(self, writer: BundleWriter, rid: str, s: Streamed, temp: str,
                        stats: collections.Counter[str]) -> None:
        """Copy a large instance into the bundle in 1 MiB pieces (never whole)."""
        assert s.facts is not None
        if s.reason.startswith("verify-"):
            log.error("pack.verify_failed", instance=rid, codec=self.cfg.codec, reason=s.reason)
        stats[s.action] += 1
        stats["streamed"] += 1
        writer.begin_instance({**s.facts, "transfer_syntax": s.transfer_syntax,
                               "action": s.action, "reason": s.reason})
        if s.action == "compressed":
            stream_pack.copy_output(writer, s, temp)
            size, digest = s.output_size, None
        else:
            stream_pack.copy_passthrough(writer, str(self.spool.dir / rid), rid,
                                         self.spool.key.key)
            size, digest = s.facts["received_size"], s.facts["received_sha256"]
        stream_pack.check_written(writer.end_instance(), size, digest)
        self.beat()

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
class _Pending:
    rid: str
    future: Future[Any]  # of Prepared, or Streamed for a large instance
    temp: str | None  # the streamed output's temp file, removed after writing


def _remove_after(path: str, _done: Future[Any]) -> None:
    _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
