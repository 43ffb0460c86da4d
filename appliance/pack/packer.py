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
any instance, is copied from the sealed spool file chunk by chunk. Memory stays
near a chunk and a few frames whatever the instance size (docs/benchmarks.md, "Memory").

Nothing in this process parses or inflates an instance: the codec workers do, and the
manifest's facts come from our own file meta (`stream.meta_facts`). A deflated data set
is inflated in a worker up to `inflate_cap` (the configured maximum instance size, and
no more than the in-memory path holds), else packed as it came ("inflated-too-large").

What is pure is in pack/policy.py: the sealing rule (`due_for_sealing`), what is packed
while a scanner sends a burst (`may_pack_now`, `pack.during_burst`), the job limit, the
inflation cap and the failure table (`after_failure`).

Several sealed segments are packed side by side (`segments_at_once`: one per worker, at
most MAX_SEGMENTS_AT_ONCE), each on a thread of its own, so that the workers are not
idle while one segment's last jobs finish and its bundle is synced and committed. A
free place goes to the highest priority, then the oldest. Memory stays what one segment
held: their codec jobs share one window of `window` results (pack/window.py, which says
which segment a free place goes to).

Codec (`pack.adaptive`, pack/pace.py): as each instance's job goes to the pool, the
packer asks `pace.choose_codec` with the recent send rate of the destination the bundle
goes to (`link`, from the forwarder: today the first one that is up) and its own recent
pack rate (as `pack.codec`'s equivalent, `pace.equivalent_bytes`) and `pack.codec`'s
ratio; when the link would wait for the packer, a faster codec (JPEG-LS) or none is
used, from that instance on. Each instance's transfer syntax is in the manifest, so a
bundle may mix them; every codec is lossless. A change is logged (`pack.codec_chosen`).

How it fails (docs/architecture.md, "Failure behaviour"): one instance never stops its
segment, and one segment never stops the others.

- An instance the codec cannot or should not compress is sent unchanged (reason in the
  manifest); a verification mismatch sends the original and logs `pack.verify_failed`.
- Any other failure on one instance (an exception while the worker reads or identifies
  it, a worker that dies on it twice, a job past its time limit, `job_limit`) sends it
  unchanged too: this thread reads it from the spool, identifies it from the file meta
  the receiver wrote, and logs `pack.instance_passed_through` with the reason class
  ("pack-error", "worker-crashed", "worker-timeout").
- An acknowledged instance that cannot be read back (spool file missing; failing
  authentication, then quarantined and kept) is an alarm (`pack.instance_lost`,
  `pack.instance_unreadable`, at error) and the segment is marked incomplete in the
  queue (`Queue.mark_incomplete`): it is delivered without it, never as if complete.
- A segment that fails as a whole (the bundle cannot be written...) is tried again after
  a back-off, PACK_ATTEMPTS times in all (`policy.after_failure`), then held with its reason
  (`Queue.pack_failed`); other segments are packed meanwhile. A full disk is waited
  out instead, however long (it clears as bundles are delivered). The count lives in
  memory: a restart gives every segment its full tries again.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog

from appliance.bundle.format import BundleWriter
from appliance.core import crypto, durable, failpoints, part10
from appliance.core.config import Pack, Receive
from appliance.core.errors import IntegrityError
from appliance.pack import pace
from appliance.pack import stream as stream_pack
from appliance.pack.codec import Result, compress
from appliance.pack.policy import (
    Burst,
    SegmentTimes,
    after_failure,
    due_for_sealing,
    inflate_cap,
    job_limit,
    may_pack_now,
)
from appliance.pack.pool import CodecPool, PoolClosed, WorkerLost
from appliance.pack.stream import Streamed
from appliance.pack.window import Window
from appliance.queue.state import STATES
from appliance.queue.store import PRIORITY_STAT, Queue, transition
from appliance.spool.store import Spool

log = structlog.get_logger("appliance.pack")

MAX_SEGMENTS_AT_ONCE = 4  # packed side by side (at most one per worker)
POOL_GRACE_S = 60.0  # the pool kills a job at its limit; this thread waits this much more
# pass-through reasons that mean something went wrong with this instance (logged as such)
_FAILURE_REASONS = frozenset({"unparseable", "encode-error", "reencode-error",
                              "reencode-mismatch", "worker-crashed", "worker-timeout",
                              "pack-error", "temp-write-error"})


@dataclass
class _Tries:
    attempts: int = 0
    not_before: float = 0.0  # time.monotonic()


class Packer:
    """Seals and packs segments. `beat()` is called whenever a codec job's instance has
    been written or a segment has been packed or held: progress, for a supervisor."""

    def __init__(self, cfg: Pack, spool: Spool, queue: Queue, recipients: Sequence[Any],
                 pool: CodecPool, receiving_burst: Callable[[], bool] = lambda: False,
                 beat: Callable[..., None] = lambda **_: None, *,
                 max_instance_bytes: int = Receive.max_instance_mb << 20,
                 on_packed: Callable[[str], None] = lambda seg: None,
                 link: Callable[[], tuple[str | None, float | None]] = lambda: (None, None)) -> None:
        self.cfg = cfg
        # where a bundle packed now goes and its recent send rate (Forwarder.link)
        self.link = link
        # raw bytes/s packed, counted as with pack.codec (pace.equivalent_bytes)
        self.packed = pace.Throughput()
        self.ratio = pace.Recent()  # raw bytes per output byte of pack.codec's instances
        self.chosen = cfg.codec
        self._choosing = threading.Lock()  # segment threads ask at once
        self.on_packed = on_packed  # a bundle is ready: the forwarder may take it now
        # progress, for the stage supervisor (health/supervisor.py); beat(expect=s) before a
        # wait that may last s seconds
        self.beat = beat
        self.inflate_cap = inflate_cap(cfg, max_instance_bytes)
        self.receiving_burst = receiving_burst
        self.spool = spool
        self.queue = queue
        self.index = spool.index
        self.recipients = list(recipients)
        self.pool = pool
        # results held in memory at once, all segments together (`Window`)
        self.window = max(2, 2 * pool.workers)
        self._window = Window(self.window)
        self.segments_at_once = max(1, min(pool.workers, MAX_SEGMENTS_AT_ONCE))
        self._tries: dict[str, _Tries] = {}  # segments whose pack failed, by id

    def seal_due(self, now: float) -> int:
        rows = self.index.query("SELECT id, created, updated, priority FROM segments"
                                " WHERE state='receiving'")
        sealed = 0
        for r in rows:
            times = SegmentTimes(r["created"], r["updated"], r["priority"] >= PRIORITY_STAT)
            why = due_for_sealing(times, self.cfg, now)
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
        """Pack every sealed segment that is due, up to `segments_at_once` side by side
        (each on a thread of its own; their codec jobs share the pool and one window of
        `window` results in memory, `Window`, taken by the first in rank first). A free
        place goes to the highest priority first, then the oldest, looked up again each
        time (a stat segment sealed meanwhile goes next, not after the routine ones seen
        before it); a failing one is set aside (retried after a back-off, held after
        PACK_ATTEMPTS) and the others go on. Each instance's codec is chosen as its job
        is submitted (`choose_codec`)."""
        packed = 0
        running: set[str] = set()
        finished: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()
        stopping = False
        while True:
            while not stopping and len(running) < self.segments_at_once:
                seg = self._next_sealed(exclude=running)
                if seg is None:
                    break
                running.add(seg)
                threading.Thread(target=self._pack_one, args=(seg, finished),
                                 name="pack-segment", daemon=True).start()
            if not running:
                return packed
            seg, error = finished.get()  # each pack's waits are bounded (job_limit, POOL_GRACE_S)
            running.discard(seg)
            if error is None:
                self._tries.pop(seg, None)
                packed += 1
            elif isinstance(error, (CancelledError, PoolClosed)):  # shutting down: packed at the next start
                log.info("pack.interrupted", segment=seg)
                stopping = True
            elif isinstance(error, Exception):
                self._failed(seg, error)
            else:
                raise error

    def _pack_one(self, seg: str, finished: queue.SimpleQueue[tuple[str, BaseException | None]]) -> None:
        try:
            self.pack(seg)
        except BaseException as e:  # reported to pack_pending, which decides
            finished.put((seg, e))
        else:
            finished.put((seg, None))

    def _next_sealed(self, exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        rows = self.index.query("SELECT id, study_key, created, updated, priority FROM segments"
                                " WHERE state='sealed' ORDER BY priority DESC, created")
        sealed = {r["id"] for r in rows}
        for gone in [s for s in self._tries if s not in sealed]:  # released, deleted...
            del self._tries[gone]
        burst, now = self.receiving_burst(), time.time()
        # looked up only during a burst, and only when the policy asks (once per call)
        asks = bool(rows) and burst and self.cfg.during_burst in ("link-waits", "first")
        link_waits = asks and self.cfg.during_burst == "link-waits" and not self.index.query(
            "SELECT 1 FROM segments WHERE state='ready' LIMIT 1")
        for r in rows:
            if r["id"] in exclude:  # being packed
                continue
            facts = Burst(first=self._first_of_study(r["study_key"], r["created"]),
                          link_waits=link_waits) if asks else Burst()
            if not may_pack_now(r["updated"], burst, self.cfg, now, r["priority"] >= PRIORITY_STAT,
                                facts):
                continue
            tries = self._tries.get(r["id"])
            if tries and time.monotonic() < tries.not_before:
                continue
            return str(r["id"])
        return None

    def _first_of_study(self, study_key: str, created: float) -> bool:
        """No segment of the study is older than one created at `created` (by the
        segments_state index: one probe per state)."""
        marks = ",".join("?" * len(STATES))
        return not self.index.query(
            f"SELECT 1 FROM segments WHERE state IN ({marks}) AND study_key=?"  # noqa: S608
            " AND created<? LIMIT 1", (*STATES, study_key, created))

    def _failed(self, seg: str, e: Exception) -> None:
        tries = self._tries.setdefault(seg, _Tries())
        what = after_failure(e, tries.attempts)
        tries.attempts, tries.not_before = what.attempts, time.monotonic() + what.delay_s
        if not what.hold:
            log.warning("pack.segment_failed", segment=seg, attempts=what.attempts,
                        reason=what.reason, retry_in_s=round(what.delay_s, 1), exc_info=e)
            return
        self.queue.pack_failed(seg, what.reason)
        del self._tries[seg]
        log.error("pack.segment_held", segment=seg, attempts=what.attempts, reason=what.reason,
                  exc_info=e)
        self.beat()

    def choose_codec(self) -> str:
        """The codec for the next instance: `pack.codec`, or a faster one when the link
        would wait for the packer (`pace.choose_codec`; `pack.adaptive`)."""
        if not self.cfg.adaptive:
            return self.cfg.codec
        dest, send_bps = self.link()
        with self._choosing:
            rates = pace.Rates(send_bps=send_bps, pack_bps=self.packed.rate(),
                               ratio=self.ratio.rate())
            codec = pace.choose_codec(self.cfg.codec, rates)
            if codec != self.chosen:
                log.info("pack.codec_chosen", codec=codec, was=self.chosen, destination=dest,
                         send_bps=_rounded(rates.send_bps), pack_bps=_rounded(rates.pack_bps),
                         ratio=None if rates.ratio is None else round(rates.ratio, 2))
                self.chosen = codec
        return codec

    def pack(self, seg_id: str, codec: str | None = None) -> None:
        """Pack one segment, each instance with `codec`, or (None) with the codec chosen
        for it as its job is submitted (`choose_codec`: a switch takes effect at once,
        not from the next segment)."""
        self.packed.begin()  # before the failpoint: a test slows "the packer" with it
        tally: _Tally | None = None
        try:
            failpoints.hit("pack.hang")
            tally = self._pack(seg_id, codec)
        finally:
            self.packed.end(pace.equivalent_bytes(tally.raw, self.cfg.codec) if tally else 0)
        if tally is not None and tally.raw.get(self.cfg.codec):
            self.ratio.add(tally.raw[self.cfg.codec], tally.out[self.cfg.codec])

    def _pack(self, seg_id: str, codec: str | None) -> _Tally:
        """Pack one segment; returns what happened to its instances."""
        seg = self.queue.get(seg_id)
        rows = self.index.query("SELECT id, size FROM instances WHERE segment_id=? AND packed=0"
                                " ORDER BY received, id", (seg_id,))
        t0 = time.monotonic()
        tally = _Tally(seg_id)
        self._window.feeding(seg_id, (-seg.priority, seg.created, seg_id))
        pending: collections.deque[_Pending] = collections.deque()
        try:
            with durable.atomic_file(self.queue.path(seg_id)) as f:
                writer = BundleWriter(f, seg_id, self.recipients, seg.study_key)
                for row in rows:
                    self._slot(seg_id, writer, pending, tally)
                    try:
                        pending.append(self._submit(row["id"], row["size"],
                                                    codec or self.choose_codec()))
                    except BaseException:
                        self._window.release()
                        raise
                self._window.fed(seg_id)
                while pending:
                    self._write_next(writer, pending, tally)
                writer.close()
                size = f.tell()
        finally:
            self._window.fed(seg_id)
            for job in pending:  # an error left work in flight: drop its temp when done
                self._window.release()
                if job.temp:
                    job.future.add_done_callback(functools.partial(_remove_after, job.temp))
        if tally.missing:  # before `ready`: a crash in between records the same count again
            self.queue.mark_incomplete(seg_id, tally.missing)
        now = time.time()
        with self.index.tx() as c:
            transition(c, seg_id, "packed", now, bundle_bytes=size)
            c.execute("UPDATE instances SET packed=1 WHERE segment_id=?", (seg_id,))
        self.remove_packed(seg_id)
        log.info("segment.packed", segment=seg_id, instances=len(rows), bytes_in=seg.bytes,
                 bytes_out=size, codecs=dict(tally.codecs), seconds=round(time.monotonic() - t0, 3),
                 **tally.stats)
        self.on_packed(seg_id)
        self.beat()
        return tally

    def _slot(self, seg_id: str, writer: BundleWriter, pending: collections.deque[_Pending],
              tally: _Tally) -> None:
        """Take a place in the window for one more job (`Window`: the first segment in
        rank still submitting goes first): while it cannot, write this segment's oldest
        job (freeing its place); with none of its own in flight, wait (the others free
        theirs as they write, so this never waits on a segment that waits in turn)."""
        while not self._window.acquire(seg_id, 0):
            if pending:
                self._write_next(writer, pending, tally)
            elif self._window.acquire(seg_id, SLOT_POLL_S):
                return
            else:
                self.beat()

    def _write_next(self, writer: BundleWriter, pending: collections.deque[_Pending],
                    tally: _Tally) -> None:
        job = pending.popleft()
        try:
            self._write(writer, job, tally)
        finally:
            self._window.release()

    def _submit(self, rid: str, size: int, codec: str) -> _Pending:
        # The worker reads, decrypts and identifies the instance itself: done here, that
        # work held the GIL against the receiver's threads (the scanner waits on them).
        path = str(self.spool.dir / rid)
        key = self.spool.key.key
        limit = job_limit(size, self.cfg)
        if size >= self.cfg.stream_threshold_mb << 20:
            # Named here, so that this thread removes it whatever happens to the worker;
            # the prefix makes Spool.recover remove it after a crash of the daemon.
            temp = str(self.spool.dir / f"{durable.TEMP_PREFIX}pack-{secrets.token_hex(8)}")
            args: tuple[Any, ...] = (path, rid, key, codec, self.cfg.verify, temp)
            return _Pending(rid, self.pool.submit_call(stream_pack.prepare_stream, args, limit),
                            temp, limit, codec)
        args = (path, rid, key, codec, self.cfg.verify, self.inflate_cap)
        return _Pending(rid, self.pool.submit_call(prepare, args, limit), None, limit, codec)

    def _write(self, writer: BundleWriter, job: _Pending, tally: _Tally) -> None:
        """Write one instance's job into the bundle; whatever went wrong with that one
        instance is settled here (pass-through, or left out with an alarm)."""
        rid = job.rid
        try:
            # The pool kills a job at its limit, and a crashed one is tried once more:
            # never wait longer than that (and a margin) on the pool itself.
            waited = 2 * job.limit_s + POOL_GRACE_S
            self.beat(expect=waited + POOL_GRACE_S)
            try:
                p = job.future.result(timeout=waited)
            except (CancelledError, PoolClosed):
                raise
            except IntegrityError as e:
                self._unreadable(rid, str(e), tally)
                return
            except FileNotFoundError:
                self._lost(rid, tally)
                return
            except WorkerLost as e:
                self._pass_through(writer, rid, e.reason, tally)
                return
            except FutureTimeout:
                log.error("pack.pool_unresponsive", instance=rid, waited_s=round(waited, 1))
                self._pass_through(writer, rid, "worker-timeout", tally)
                return
            except Exception as e:  # reading or identifying it in the worker raised
                self._pass_through(writer, rid, "pack-error", tally, type(e).__name__)
                return
            if isinstance(p, Streamed):
                self._write_streamed(writer, rid, p, job.temp or "", tally, codec=job.codec)
                return
            res = p.result
            self._note(rid, res.action, res.reason, tally, codec=job.codec)
            tally.packed_with(job.codec, res.input_size, res.output_size)
            writer.begin_instance({**p.facts, "transfer_syntax": res.transfer_syntax,
                                   "action": res.action, "reason": res.reason})
            writer.write(res.data)
            writer.end_instance()
            self.beat()
        finally:
            if job.temp:
                if job.future.done():
                    _remove(job.temp)
                else:  # the worker may still create it: remove it when the job ends
                    job.future.add_done_callback(functools.partial(_remove_after, job.temp))
            self.beat()

    def _note(self, rid: str, action: str, reason: str, tally: _Tally,
              error_type: str | None = None, codec: str = "") -> None:
        tally.stats[action] += 1
        if reason.startswith("verify-"):
            log.error("pack.verify_failed", instance=rid, codec=codec, reason=reason)
        elif reason in _FAILURE_REASONS:
            tally.stats[reason] += 1
            log.warning("pack.instance_passed_through", instance=rid, segment=tally.segment,
                        reason=reason, **({"error_type": error_type} if error_type else {}))

    def _pass_through(self, writer: BundleWriter, rid: str, reason: str, tally: _Tally,
                      error_type: str | None = None) -> None:
        """Send an instance as received, read here from the spool chunk by chunk and
        identified from the file meta the receiver wrote (never from its data set)."""
        try:
            s = stream_pack.passthrough_facts(str(self.spool.dir / rid), rid,
                                              self.spool.key.key, reason)
        except IntegrityError as e:
            self._unreadable(rid, str(e), tally)
            return
        except FileNotFoundError:
            self._lost(rid, tally)
            return
        except Exception as e:  # our own file meta does not parse: it cannot be named
            self._unreadable(rid, f"file meta unreadable ({type(e).__name__})", tally)
            return
        self._write_streamed(writer, rid, s, "", tally, error_type)

    def _lost(self, rid: str, tally: _Tally) -> None:
        tally.missing += 1
        tally.stats["lost"] += 1
        log.error("pack.instance_lost", alarm="instance_lost", instance=rid,
                  segment=tally.segment)

    def _unreadable(self, rid: str, why: str, tally: _Tally) -> None:
        """Quarantine the spool file (kept for a human) and leave the instance out."""
        try:
            self.spool.quarantine(rid, why)
        except FileNotFoundError:
            return self._lost(rid, tally)
        tally.missing += 1
        tally.stats["unreadable"] += 1
        log.error("pack.instance_unreadable", alarm="instance_unreadable", instance=rid,
                  segment=tally.segment)

    def _write_streamed(self, writer: BundleWriter, rid: str, s: Streamed, temp: str,
                        tally: _Tally, error_type: str | None = None, codec: str = "") -> None:
        """Copy a large instance into the bundle in 1 MiB pieces (never whole)."""
        assert s.facts is not None
        self._note(rid, s.action, s.reason, tally, error_type, codec)
        tally.stats["streamed"] += 1
        writer.begin_instance({**s.facts, "transfer_syntax": s.transfer_syntax,
                               "action": s.action, "reason": s.reason})
        if codec:
            tally.packed_with(codec, s.facts["received_size"], s.output_size
                              if s.action == "compressed" else s.facts["received_size"])
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


SLOT_POLL_S = 1.0  # a segment waiting for a place in the window beats this often


@dataclass(frozen=True)
class _Pending:
    rid: str
    future: Future[Any]  # of Prepared, or Streamed for a large instance
    temp: str | None  # the streamed output's temp file, removed after writing
    limit_s: float  # the job's time limit in the pool
    codec: str


@dataclass
class _Tally:
    """What happened to the instances of the segment being packed."""

    segment: str
    stats: collections.Counter[str] = field(default_factory=collections.Counter)
    codecs: collections.Counter[str] = field(default_factory=collections.Counter)  # instances
    raw: collections.Counter[str] = field(default_factory=collections.Counter)  # bytes in, by codec
    out: collections.Counter[str] = field(default_factory=collections.Counter)  # bytes out, by codec
    missing: int = 0  # acknowledged instances left out: unreadable or lost

    def packed_with(self, codec: str, raw: int, out: int) -> None:
        self.codecs[codec] += 1
        self.raw[codec] += raw
        self.out[codec] += out


def _rounded(rate: float | None) -> int | None:
    return None if rate is None else round(rate)


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


def prepare(path: str, rid: str, spool_key: bytes, codec_name: str, verify: bool,
            max_inflated: int) -> Prepared:
    """In a codec worker: read and authenticate a spooled instance, then compress it
    (a deflated one inflated up to `max_inflated` bytes, else passed through).

    The manifest facts come from the file meta the receiver wrote, never from the data
    set (which may not parse: `compress` then passes it through as "unparseable").
    Raises IntegrityError (the file fails authentication) or FileNotFoundError; the
    packer quarantines or reports those.
    """
    with open(path, "rb") as f:
        original = b"".join(crypto.open_spool_file(crypto.SpoolKey(spool_key), rid, f))
    try:
        meta: part10.Meta | None = part10.meta(original)
    except part10.Malformed:
        meta = None
    res = compress(original, codec_name, verify, max_inflated)
    return Prepared(res, {
        **stream_pack.meta_facts(original, meta),
        "received_size": len(original),
        "received_sha256": hashlib.sha256(original).hexdigest(),
    })
