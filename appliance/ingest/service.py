"""`appliance ingest`: take bundles from the drop folder into the center's PACS, with receipts.

One pass (`Ingester.run_pass`): first the claims in `claimed/` that no process holds
(left by a dead process, or waiting for a retry whose time has come), then each complete
`<id>.bundle` in the drop folder, claimed one at a time (`claim`), so that several ingest
processes on one folder share the work and each bundle is worked on by one of them. Per
bundle:

1. SHA-256 of the file. If the record (`record`) says this id and digest were stored
   (or partly stored) before, it is a duplicate: nothing goes to the PACS, the receipt
   says "duplicate" (with the first ingest's per-instance outcomes) and the file goes to
   `done/`. (Recorded but not finished - the process died between the record and the
   move - it is finished now with its original receipt.)
2. Decrypt with the center's private key and verify every chunk and every instance
   against the manifest (`bundle.format.VerifiedBundle`). Failing authentication, or a
   manifest whose bundle id is not the file's: verdict failed, `failed/` with the reason,
   and nothing reaches the PACS.
3. Store into the PACS with the appliance's own `DicomTransport` (statuses, TLS,
   conversion for what the PACS does not take, per-instance blame). An instance the PACS
   refuses for good (`Permanent` naming it) is recorded as failed with its reason and the
   rest is sent (the transport's `Plan.skip`); the PACS down, a timeout or any `Retryable`
   leaves the bundle in `claimed/` for a later pass, with exponential back-off between
   `retry_min_s` and `retry_max_s` (jittered). A `Permanent` that names no instance is
   the PACS's configuration (our AE title unknown, our certificate refused): also left
   for a later pass, logged as an error, because failing every bundle for it would need
   a human to re-drop them all once the PACS is fixed.
4. Verdict (stored | partial | failed), recorded (SQLite, synchronous=FULL) before the
   receipt is written and the file moved, so a crash after the PACS took it never stores
   it twice; then the receipt (`receipt.write`: atomic and durable), then the move to
   `done/` (stored, partial, duplicate) or `failed/` with `<id>.reason.txt`.

Logs: structured events `ingest.*` with the opaque bundle id, counts and reasons from the
transport (which name instances by index and SOP classes by name); never a UID.

How it fails: a missing drop folder or key, or a state dir on another file system than
the drop folder (the claim is a rename), are errors at start (`StateError`,
`KeyFileError`); everything about one bundle is that bundle's verdict or its retry.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle.format import Manifest, PrivateKey, VerifiedBundle
from appliance.core import crypto, durable, failpoints
from appliance.core.errors import IntegrityError, StateError
from appliance.forward import Permanent, Plan, Retryable, Transport, Unreadable
from appliance.health.notify import Notifier
from appliance.ingest import claim as claims
from appliance.ingest import receipt as receipts
from appliance.ingest.config import Ingest
from appliance.ingest.receipt import InstanceOutcome, Receipt
from appliance.ingest.record import Record

log = structlog.get_logger("appliance.ingest")

WATCHDOG_EVERY_S = 5.0


@dataclass(frozen=True)
class Delivery:
    """What storing one bundle came to: per-instance outcomes, or a reason to retry."""

    outcomes: tuple[InstanceOutcome, ...] = ()
    retry: str | None = None  # set: nothing decided, try again later
    failed: str | None = None  # set: the bundle itself failed (authentication)


def utc_iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backoff_s(attempts: int, lo: float, hi: float, rnd: Callable[[], float] = random.random) -> float:
    """lo, 2 lo, 4 lo ... capped at hi, less up to 20 % jitter (so that processes and
    bundles do not retry in lockstep)."""
    base = min(hi, lo * (2 ** min(attempts - 1, 40)))
    return float(max(lo, base * (1 - 0.2 * rnd())))


def store(transport: Transport, bundle_id: str, path: Path, manifest: Manifest,
          progress: Callable[[int], None], cancelled: threading.Event) -> Delivery:
    """Send every instance of a verified bundle; instances the PACS refuses for good are
    set aside (failed, with the reason) and the rest sent on."""
    stored: set[int] = set()
    refused: dict[int, str] = {}
    while True:
        plan = Plan(skip=frozenset(stored | set(refused)), delivered=stored.add, cancelled=cancelled)
        try:
            transport.send(bundle_id, path, progress, plan)
            break
        except Unreadable as e:
            return Delivery(failed=str(e))
        except Permanent as e:
            new = [i for i in e.instances if i not in refused and i not in stored]
            if not new:
                return Delivery(retry=f"the PACS refuses this bundle: {e}")
            for i in new:
                refused[i] = receipts.short_reason(str(e))
        except Retryable as e:
            return Delivery(retry=str(e))
    outcomes = []
    for entry in manifest.instances:
        if entry.index in refused:
            outcomes.append(InstanceOutcome(entry.index, "failed", "permanent", refused[entry.index]))
        elif entry.index in stored:
            outcomes.append(InstanceOutcome(entry.index, "stored"))
        else:  # the transport returned without reporting it: never claim it was stored
            outcomes.append(InstanceOutcome(entry.index, "failed", "not-sent", "not reported stored"))
    return Delivery(outcomes=tuple(outcomes))


class Ingester:
    """The center's ingest: one object per process; `run_pass` or `serve`."""

    def __init__(self, cfg: Ingest, key: PrivateKey, signer: Ed25519PrivateKey, transport: Transport,
                 now: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.key = key
        self.signer = signer
        self.transport = transport
        self.now = now
        self.claimed = cfg.state_dir / "claimed"
        self.done = cfg.state_dir / "done"
        self.failed = cfg.state_dir / "failed"
        self.locks = cfg.state_dir / "locks"
        self.cancelled = threading.Event()
        self.notifier = Notifier()
        self._last_ping = 0.0
        check_dirs(cfg)
        for d in (self.claimed, self.done, self.failed, self.locks):
            durable.make_dirs(d)
        self.record = Record(cfg.state_dir)

    def close(self) -> None:
        self.record.close()
        self.transport.close()

    # --- the loop ---

    def serve(self, stop: threading.Event) -> None:
        """Pass after pass until `stop` is set; systemd READY/WATCHDOG/STATUS."""
        self.notifier.ready(f"watching {self.cfg.drop_dir.name}")
        log.info("ingest.started", center=self.cfg.name, poll_s=self.cfg.poll_s)
        while not stop.is_set():
            counts = self.run_pass(stop)
            self.notifier.watchdog()
            if counts:
                self.notifier.status(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            stop.wait(self.cfg.poll_s)
        self.notifier.stopping()

    def run_pass(self, stop: threading.Event | None = None) -> Counter[str]:
        """One pass over `claimed/` and the drop folder; counts of verdicts (and pending)."""
        counts: Counter[str] = Counter()
        now = self.now()
        for path, bid in claims.stale_claims(self.claimed):
            if stop is not None and stop.is_set():
                return counts
            if self.record.due(path.name, now):
                c = claims.take(path, bid)
                if c is not None:
                    if not self.record.attempts(c.name):  # not a retry: its process died
                        log.warning("ingest.reclaimed", bundle=bid, claim=c.token)
                    counts[self._work(c)] += 1
        ids, odd = claims.drops(self.cfg.drop_dir)
        if odd:
            # Not named by count only: a file name is whatever an uploader chose.
            log.warning("ingest.ignored", files=odd, detail="*.bundle names that are not bundle ids")
        for bid in ids:
            if stop is not None and stop.is_set():
                return counts
            c = claims.claim_new(self.cfg.drop_dir, self.claimed, bid)
            if c is not None:
                log.info("ingest.claimed", bundle=bid, claim=c.token)
                counts[self._work(c)] += 1
        return counts

    def _ping(self, _: int = 0) -> None:
        """Progress of a long store keeps the watchdog fed (rate-limited)."""
        t = time.monotonic()
        if t - self._last_ping >= WATCHDOG_EVERY_S:
            self._last_ping = t
            self.notifier.watchdog()

    # --- one bundle ---

    def _work(self, c: claims.Claim) -> str:
        try:
            with claims.bundle_lock(self.locks, c.bundle_id) as mine:
                if not mine:
                    log.info("ingest.busy", bundle=c.bundle_id,
                             detail="another copy of this bundle is being ingested")
                    return "busy"
                return self._ingest(c)
        except Exception as e:  # a bug met by one bundle must not stop the others
            log.error("ingest.error", bundle=c.bundle_id, exc_info=True)
            return self._defer(c, f"unexpected {type(e).__name__} (see the log)")
        finally:
            c.release()

    def _ingest(self, c: claims.Claim) -> str:
        t0 = time.monotonic()
        digest = _sha256_fd(c.fd)
        prev = self.record.previous(c.bundle_id, digest)
        if prev is not None and (prev.verdict in ("stored", "partial") or not prev.finished):
            return self._repeat(c, digest, prev.receipt, prev.finished)
        verified = self._verify(c)
        if isinstance(verified, str):
            delivery = Delivery(failed=verified)
        else:
            delivery = store(self.transport, c.bundle_id, c.path, verified, self._ping, self.cancelled)
        if delivery.retry is not None:
            return self._defer(c, delivery.retry)
        if delivery.failed is not None:
            rec = self._receipt(c.bundle_id, digest, (), "failed", delivery.failed)
        else:
            verdict = receipts.verdict_of(delivery.outcomes)
            reason = None if verdict == "stored" else _failures(delivery.outcomes)
            rec = self._receipt(c.bundle_id, digest, delivery.outcomes, verdict, reason)
        self._finish(c, digest, rec, record=True)
        (log.info if rec.verdict == "stored" else log.warning)(
            f"ingest.{rec.verdict}", bundle=c.bundle_id, instances=len(rec.instances),
            stored=len(rec.stored), reason=rec.reason, seconds=round(time.monotonic() - t0, 3))
        return rec.verdict

    def _verify(self, c: claims.Claim) -> Manifest | str:
        """The verified manifest, or why the bundle fails (nothing sent to the PACS)."""
        try:
            with os.fdopen(os.dup(c.fd), "rb") as f:
                f.seek(0)
                manifest = VerifiedBundle(f, self.key).manifest
        except IntegrityError as e:
            return f"bundle does not verify: {e}"
        if manifest.bundle_id != c.bundle_id:
            return "bundle does not verify: its manifest names another bundle id than its file name"
        return manifest

    def _repeat(self, c: claims.Claim, digest: str, body: dict[str, Any], finished: bool) -> str:
        """A copy already recorded: a duplicate, or the rest of an interrupted ingest."""
        first = _receipt_from_body(body)
        if finished:
            rec = Receipt(c.bundle_id, digest, self.cfg.name, utc_iso(self.now()), "duplicate",
                          first.instances, f"already ingested at {first.time} ({first.verdict})")
        else:
            rec = first
        self._finish(c, digest, rec, record=False)
        log.info("ingest.duplicate" if finished else "ingest.finished", bundle=c.bundle_id,
                 first_verdict=first.verdict)
        return rec.verdict

    def _receipt(self, bid: str, digest: str, outcomes: tuple[InstanceOutcome, ...], verdict: str,
                 reason: str | None) -> Receipt:
        return Receipt(bid, digest, self.cfg.name, utc_iso(self.now()), verdict, outcomes,
                       None if reason is None else receipts.short_reason(reason))

    def _finish(self, c: claims.Claim, digest: str, rec: Receipt, record: bool) -> None:
        if record:
            self.record.ingested(c.bundle_id, digest, rec.verdict, self.now(), rec.body())
            failpoints.hit("ingest.recorded")
        if rec.verdict == "failed" and self.record.holds(c.bundle_id):
            # A file that fails under the name of a bundle the center holds (garbage, or
            # a broken re-upload) must not replace that bundle's receipt.
            log.warning("ingest.receipt_kept", bundle=c.bundle_id,
                        detail="a failed copy of a bundle already stored; its receipt is kept")
        else:
            receipts.write(self.cfg.drop_dir, c.bundle_id, receipts.sign(rec, self.signer))
        failed = rec.verdict == "failed"
        claims.settle(c, self.failed if failed else self.done, rec.reason if failed else None)
        if rec.verdict != "duplicate":
            self.record.finished(c.bundle_id, digest)
        self.record.forget_pending(c.name)

    def _defer(self, c: claims.Claim, reason: str) -> str:
        attempts = self.record.attempts(c.name) + 1
        delay = backoff_s(attempts, self.cfg.retry_min_s, self.cfg.retry_max_s)
        self.record.defer(c.name, c.bundle_id, self.now() + delay, receipts.short_reason(reason))
        event = "ingest.pacs_refuses" if reason.startswith("the PACS refuses") else "ingest.pending"
        (log.error if event == "ingest.pacs_refuses" else log.warning)(
            event, bundle=c.bundle_id, attempts=attempts, retry_in_s=round(delay, 1), reason=reason)
        return "pending"


def _failures(outcomes: tuple[InstanceOutcome, ...]) -> str:
    failed = [o for o in outcomes if o.outcome == "failed"]
    if not failed:
        return "the bundle has no instances"
    return f"{len(failed)} of {len(outcomes)} instances not stored; first: {failed[0].reason}"


def _receipt_from_body(body: dict[str, Any]) -> Receipt:
    outcomes = tuple(InstanceOutcome(i["index"], i["outcome"], i.get("class"), i.get("reason"))
                     for i in body["instances"])
    return Receipt(body["bundle_id"], body["bundle_sha256"], body["center"], body["time"],
                   body["verdict"], outcomes, body.get("reason"))


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while piece := os.pread(fd, 1 << 20, offset):
        h.update(piece)
        offset += len(piece)
    return h.hexdigest()


def check_dirs(cfg: Ingest) -> None:
    """The drop folder exists and the state dir is on its file system (claims are renames)."""
    if not cfg.drop_dir.is_dir():
        raise StateError(f"ingest.drop_dir {cfg.drop_dir} does not exist or is not a folder")
    durable.make_dirs(cfg.state_dir)
    if os.stat(cfg.drop_dir).st_dev != os.stat(cfg.state_dir).st_dev:
        raise StateError(f"ingest.state_dir {cfg.state_dir} is not on the file system of "
                         f"ingest.drop_dir {cfg.drop_dir}: a bundle is claimed by renaming it")


def build(cfg: Ingest) -> Ingester:
    """The ingester with its keys and the PACS transport (the composition root)."""
    from appliance.forward.dicom import DicomTransport

    key = crypto.load_private_key(cfg.key)
    signer = receipts.load_signing_key(cfg.signing_key)
    transport = DicomTransport(cfg.pacs, key, local_ae_title=cfg.ae_title,
                               max_instance_bytes=cfg.max_instance_mb << 20)
    return Ingester(cfg, key, signer, transport)
