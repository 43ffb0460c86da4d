"""End-to-end receipts: the appliance learns that the reading center's PACS holds a bundle.

Owns nothing on disk; reads receipts the center's `appliance ingest` writes into the
drop (`<remote_dir>/receipts/<bundle id>.receipt.json`, `ingest.receipt`) back over SFTP
and records what they say with `Queue.record_receipt` (the queue stays the one writer).

Trust: an `sftp` destination with `receipt_key` (the center's Ed25519 public key, PEM)
has receipts; a receipt counts only if its signature verifies with that key, it names
the bundle we sent (`bundle_id`) and the SHA-256 of the very file we uploaded
(`bundle_sha256`). Anything else (a forged or damaged receipt, one signed by another
key, one for another copy of the bundle, one larger than `receipt_cap`) is logged once
(`receipt.ignored`, opaque ids and our own words only) and ignored: the bundle stays
"uploaded" and is checked again later. There is no `receipts = true` without a key: a
receipt anyone who can write to the drop could forge would prove nothing.

When: `ReceiptPoller.step`, run by the daemon on a supervised thread of its own
(stage `receipts`). Per destination, one SFTP connection per round reads the receipts
of the bundles that are due: a bundle delivered `age` seconds ago is checked every
`check_interval(age)` (5 s at first, a quarter of its age, at most every 5 minutes), at
most `PER_ROUND` per round and `MAX_OUTSTANDING` (the most recently delivered) in all.
A round that fails (the center down, the link cut) backs the destination off (5 s
doubling to 5 minutes) without touching its failover health: delivery is the lanes'
business. Every round has a deadline (`round_budget`): the connection is closed when it
passes.

What the center said: `stored` (info), `partial` / `failed` (warnings with the counts),
`duplicate` (the center had it already; its outcomes are the first ingest's). A bundle
delivered longer than `receipt_overdue_s` ago without a receipt is overdue:
`appliance status` counts them per destination (`snapshot`), and each is logged once
(`receipt.overdue`, a warning) when the poller first sees it so.

How it fails: nothing here raises out of `step` for a peer's doing; a bug does, and the
daemon's loop logs it and goes on.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.core.config import Destination
from appliance.forward import TransportError
from appliance.ingest import receipt as receipts
from appliance.ingest.receipt import Receipt, ReceiptError
from appliance.queue.store import AwaitingReceipt, Queue

log = structlog.get_logger("appliance.receipts")

FIRST_CHECK_S: Final = 5.0
MAX_CHECK_S: Final = 300.0
PER_ROUND: Final = 50  # receipts read over one connection at most
MAX_OUTSTANDING: Final = 1000  # bundles awaiting a receipt looked at, per destination
_BASE_CAP: Final = 8192  # receipt bytes besides the per-instance entries
_PER_INSTANCE: Final = 1024  # an entry with a reason of receipt.MAX_REASON characters fits


def check_interval(age_s: float) -> float:
    """How long after a check a bundle delivered `age_s` ago is checked again."""
    return min(MAX_CHECK_S, max(FIRST_CHECK_S, age_s / 4))


def retry_delay(failures: int) -> float:
    """How long a destination whose last `failures` rounds failed waits for the next."""
    return min(MAX_CHECK_S, FIRST_CHECK_S * 2.0 ** max(0, failures - 1))


def receipt_cap(instances: int) -> int:
    """The most bytes the receipt of a bundle of `instances` instances may have."""
    return min(receipts.MAX_RECEIPT, _BASE_CAP + _PER_INSTANCE * max(0, instances))


def round_budget(dest: Destination) -> float:
    """A round's deadline: connect and log in, then PER_ROUND reads, each within timeout_s."""
    return 4 * dest.timeout_s + 60.0


def judge(data: bytes, trusted: Sequence[Ed25519PublicKey], bundle_id: str, cap: int,
          sha256_of: Callable[[], str]) -> Receipt:
    """The receipt if it is one we trust for this bundle; ReceiptError otherwise. The
    bundle's SHA-256 is computed (`sha256_of`) only once the signature verified."""
    if len(data) > cap:
        raise ReceiptError(f"receipt is larger than {cap} bytes, the most for this bundle")
    r = receipts.parse(data, trusted)
    if r.bundle_id != bundle_id:
        raise ReceiptError("receipt names another bundle")
    if r.bundle_sha256 != sha256_of():
        raise ReceiptError("receipt is for another copy of the bundle (its SHA-256 differs)")
    return r


def counts(r: Receipt) -> tuple[int, int]:
    """(instances stored, instances failed) at the center."""
    stored = len(r.stored)
    return stored, len(r.instances) - stored


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ReceiptSource(Protocol):
    """What the poller needs of a transport (`SftpTransport.read_receipts`)."""

    def read_receipts(self, wanted: Sequence[tuple[str, int]], cancelled: threading.Event,
                      beat: Callable[[], None]) -> dict[str, bytes | None]: ...


@dataclass
class _Center:
    """One destination with receipts, and the poller's memory of it (not kept on disk:
    after a restart every awaited bundle is checked once, then on its interval)."""

    dest: Destination
    source: ReceiptSource
    trusted: tuple[Ed25519PublicKey, ...]
    failures: int = 0
    next_round: float = 0.0
    last_error: str | None = None
    checked: dict[str, float] = field(default_factory=dict)  # item id -> last check
    ignored: dict[str, str] = field(default_factory=dict)  # item id -> digest of a bad receipt
    overdue: set[str] = field(default_factory=set)  # item ids logged overdue


def _note_overdue(c: _Center, awaiting: Sequence[AwaitingReceipt], now: float) -> None:
    """Log each bundle once when it has waited longer than receipt_overdue_s."""
    for a in awaiting:
        if a.item_id not in c.overdue and now - a.delivered > c.dest.receipt_overdue_s:
            log.warning("receipt.overdue", bundle=a.item_id, destination=c.dest.name,
                        uploaded_s_ago=round(now - a.delivered))
            c.overdue.add(a.item_id)


class ReceiptPoller:
    def __init__(self, queue: Queue, centers: Sequence[tuple[Destination, ReceiptSource]],
                 beat: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        """`centers`: (destination, its transport) for each destination with receipt_key.
        Loads the keys now: a missing or wrong key file is a KeyFileError at start."""
        self.queue, self.beat, self.clock = queue, beat, clock
        self.centers = [_Center(d, src, (receipts.load_verify_key(d.receipt_key),))
                        for d, src in centers if d.receipt_key is not None]

    def step(self) -> bool:
        """One round for each destination that is due; True if a receipt was recorded."""
        recorded = False
        for c in self.centers:
            if self.clock() >= c.next_round:
                recorded |= self._round(c)
        return recorded

    def _round(self, c: _Center) -> bool:
        now = self.clock()
        awaiting = self.queue.awaiting_receipts(c.dest.name, MAX_OUTSTANDING)
        alive = {a.item_id for a in awaiting}
        for memo in (c.checked, c.ignored):  # forget bundles recorded or expired
            for k in [k for k in memo if k not in alive]:
                del memo[k]
        c.overdue &= alive
        _note_overdue(c, awaiting, now)
        when = {a.item_id: c.checked.get(a.item_id, 0.0) + check_interval(now - a.delivered)
                for a in awaiting}
        due = sorted((a for a in awaiting if when[a.item_id] <= now),
                     key=lambda a: c.checked.get(a.item_id, 0.0))[:PER_ROUND]
        if not due:  # a bundle delivered meanwhile is seen within FIRST_CHECK_S
            c.next_round = min([now + FIRST_CHECK_S, *when.values()])
            return False
        return self._read(c, due, now)

    def _read(self, c: _Center, due: Sequence[AwaitingReceipt], now: float) -> bool:
        """Read the receipts of `due` over one connection, within the round's deadline
        (by bundle id: a copy's receipt is its bundle's, written by the copy's center)."""
        caps = {a.bundle_id: receipt_cap(a.instances) for a in due}
        cancelled = threading.Event()
        timer = threading.Timer(round_budget(c.dest), cancelled.set)
        timer.daemon = True
        timer.start()
        try:
            found = c.source.read_receipts(list(caps.items()), cancelled, self.beat)
        except TransportError as e:
            c.failures += 1
            c.next_round = now + retry_delay(c.failures)
            if c.failures == 1 or str(e) != c.last_error:
                log.warning("receipt.check_failed", destination=c.dest.name, reason=str(e),
                            failures=c.failures)
            c.last_error = str(e)
            return False
        finally:
            timer.cancel()
        if c.failures:
            log.info("receipt.check_resumed", destination=c.dest.name)
        c.failures, c.last_error, c.next_round = 0, None, now + 1.0
        recorded = False
        for a in due:
            c.checked[a.item_id] = now
            data = found.get(a.bundle_id)
            if data is not None:
                recorded |= self._take(c, a, data, caps[a.bundle_id])
            self.beat()
        return recorded

    def _take(self, c: _Center, a: AwaitingReceipt, data: bytes, cap: int) -> bool:
        """Record the receipt `data` for `a` (a bundle, or a copy: the receipt names and
        hashes the bundle, and is recorded for the copy's own delivery)."""
        name, item_id = c.dest.name, a.item_id
        try:
            r = judge(data, c.trusted, a.bundle_id, cap,
                      lambda: file_sha256(self.queue.path(a.bundle_id)))
        except (ReceiptError, OSError) as e:
            digest = hashlib.sha256(data).hexdigest()
            if c.ignored.get(item_id) != digest:  # once per receipt, not once per check
                why = str(e) if isinstance(e, ReceiptError) else "our copy of the bundle is gone"
                log.warning("receipt.ignored", bundle=item_id, destination=name, why=why)
                c.ignored[item_id] = digest
            return False
        stored, failed = counts(r)
        if not self.queue.record_receipt(item_id, name, r.verdict, stored, failed, r.center,
                                         self.clock()):
            return False
        event = {"bundle": item_id, "destination": name, "verdict": r.verdict,
                 "stored": stored, "failed": failed}
        if a.bundle_id != item_id:
            event["copy_of"] = a.bundle_id
        if r.verdict in ("partial", "failed"):
            log.warning(f"receipt.{r.verdict}", **event)
        else:
            log.info("receipt.stored", **event)
        return True

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Per destination with receipts: bundles awaiting one, and how many are overdue."""
        out = []
        for c in self.centers:
            awaiting, overdue = self.queue.receipts_awaited(c.dest.name,
                                                            now - c.dest.receipt_overdue_s)
            out.append({"destination": c.dest.name, "awaiting": awaiting, "overdue": overdue,
                        "overdue_after_s": c.dest.receipt_overdue_s, "last_error": c.last_error})
        return out
