"""The forwarding scheduler: takes due bundles from the queue and hands them to a transport.

Lanes: the daemon runs `queue.lanes` threads that each call `run_once`, plus one lane
that takes only stat items (`min_priority`), so one slow or hanging attempt never blocks
the queue behind it and a stat study never waits behind routine ones. Each lane claims
the next due item (highest priority, then oldest) in one transaction (`claim_next`), so
two lanes never take the same item.

An attempt: the item's plan (instances the destination already holds or that were
parked are left out, suspects go last; a parked instance is sent alone from its bundle's
file), a time budget (`budget`: the transport gives up at its next poll once it is spent),
then `delivered`, or the failure judged by `forward.policy` (after probing the destination
when nothing else shows whether it works): park blamed instances,
strike suspects, and send the rest `again` at once; `defer` with back-off (Retryable:
between queue.retry_min_s and retry_max_s, with jitter); `refused` (Permanent: held with
the reason, until a human releases or deletes it); or `quarantine` (Unreadable: the
bundle file fails authentication; moved to `STATE/quarantine/`, never deleted; the item
is `failed`). Instances the destination took are recorded even when the attempt fails,
so they are not sent again. An unexpected exception in a transport is treated as
retryable and logged with its type, so a bug cannot wedge the queue on one bundle.

Destinations: for now every bundle goes to the first destination; failover across the
ordered list comes with the WAN work and will live here.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from appliance.core import failpoints
from appliance.core.config import Queue as QueueConfig
from appliance.forward import Permanent, Plan, Transport, TransportError, Unreadable, policy
from appliance.queue.store import Item, Queue, backoff

log = structlog.get_logger("appliance.forward")

BUDGET_BASE_S = 120.0  # every attempt gets this much, plus its bytes at queue.min_rate_kbit_s


def budget(bundle_bytes: int, min_rate_kbit_s: float, base_s: float = BUDGET_BASE_S) -> float:
    """Seconds an attempt may take in all before it is cancelled (pure)."""
    return base_s + bundle_bytes * 8 / (min_rate_kbit_s * 1000)


class Forwarder:
    def __init__(self, queue: Queue, transports: Sequence[Transport], cfg: QueueConfig,
                 rng: random.Random | None = None, beat: Callable[[], None] = lambda: None,
                 budget_base_s: float = BUDGET_BASE_S) -> None:
        self.queue = queue
        self.budget_base_s = budget_base_s
        self.transports = list(transports)
        self.cfg = cfg
        self.rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self.beat = beat
        self.last_error: dict[str, str] = {}

    def run_once(self, now: float | None = None, min_priority: int = 0) -> bool:
        """Attempt the next due item; returns False when nothing was due."""
        now = time.time() if now is None else now
        if not self.transports:
            return False
        dest = self.transports[0]
        item = self.queue.claim_next(now, dest.name, min_priority)
        if item is None:
            return False
        self._attempt(item, dest)
        return True

    def _attempt(self, item: Item, dest: Transport) -> None:
        known = {} if item.parent else self.queue.instances_of(item.id)
        delivered: list[int] = []
        plan = Plan(
            skip=frozenset(i for i, (st, _) in known.items() if st in ("delivered", "parked")),
            only=None if item.only_index is None else frozenset({item.only_index}),
            last=frozenset(i for i, (st, _) in known.items() if st == "suspect"),
            delivered=delivered.append)
        size = item.bundle_bytes if item.parent is None else 0
        timer = threading.Timer(budget(size, self.cfg.min_rate_kbit_s, self.budget_base_s),
                                plan.cancelled.set)
        timer.daemon = True
        timer.start()
        t0 = time.monotonic()
        try:
            failpoints.hit("forward.hang")
            dest.send(item.id, self.queue.path(item.bundle_id), self._progress(item.id), plan)
        except Unreadable as e:
            kept = self.queue.quarantine(item.id, str(e))
            self.last_error[dest.name] = str(e)
            log.error("bundle.quarantined", bundle=item.id, destination=dest.name, reason=str(e),
                      file=kept.name)
        except TransportError as e:
            self._record(item, delivered)
            self._failed(item, dest.name, e, known, len(delivered))
        except Exception as e:
            self._record(item, delivered)
            self._defer(item, dest.name, f"internal error ({type(e).__name__})")
            log.exception("bundle.send_crashed", bundle=item.id, destination=dest.name)
        else:
            self._record(item, delivered)
            parked = sum(1 for st, _ in known.values() if st == "parked")
            self.queue.delivered(item.id, time.time(),
                                 reason=f"delivered without {parked} parked instance(s)" if parked else None)
            self.last_error.pop(dest.name, None)
            log.info("bundle.delivered", bundle=item.id, destination=dest.name,
                     bytes=item.bundle_bytes, instances=len(delivered), parked=parked,
                     seconds=round(time.monotonic() - t0, 3))
        finally:
            timer.cancel()

    def _record(self, item: Item, delivered: list[int]) -> None:
        if delivered:
            self.queue.instances_delivered(item.bundle_id, delivered)

    def _failed(self, item: Item, dest: str, e: TransportError, known: dict[int, tuple[str, int]],
                delivered_now: int) -> None:
        reason = str(e)
        failure = policy.Failure(
            permanent=isinstance(e, Permanent), instances=e.instances, delivered_now=delivered_now,
            delivered_before=sum(1 for st, _ in known.values() if st == "delivered"),
            strikes={i: known.get(i, ("", 0))[1] for i in e.instances},
            parked_item=item.parent is not None)
        if policy.needs_probe(failure):
            answers = self._probe(dest)
            log.info("destination.probed", destination=dest, bundle=item.id, answers=answers)
            failure = dataclasses.replace(failure, answers=answers)
        decision = policy.decide(failure)
        now = time.time()
        for i in decision.park:
            child = self.queue.park(item.id, i, f"parked from {item.id} (instance {i}): {reason}", now)
            log.error("instance.parked", bundle=item.id, instance=i, item=child, destination=dest,
                      reason=reason)
        for i in decision.suspect:
            strikes = self.queue.suspect(item.id, i, reason, decision.strike)
            log.warning("instance.suspect", bundle=item.id, instance=i, strikes=strikes, destination=dest)
        self.last_error[dest] = reason
        if decision.action == "again":
            self.queue.requeue(item.id, reason=f"sending the rest again: {reason}")
            log.warning("bundle.again", bundle=item.id, destination=dest, reason=reason,
                        parked=len(decision.park))
        elif decision.action == "refuse":
            self.queue.refused(item.id, reason)
            log.error("bundle.held", bundle=item.id, destination=dest, reason=reason)
        else:
            self._defer(item, dest, reason)

    def _probe(self, name: str) -> bool:
        transport = next(t for t in self.transports if t.name == name)
        try:
            return bool(transport.probe())
        except Exception:  # a probe that breaks proves nothing
            log.exception("destination.probe_failed", destination=name)
            return False

    def _defer(self, item: Item, dest: str, reason: str) -> None:
        with self._rng_lock:
            delay = backoff(item.attempts + 1, self.cfg.retry_min_s, self.cfg.retry_max_s, self.rng)
        self.queue.defer(item.id, reason, delay, time.time())
        self.last_error[dest] = reason
        log.warning("bundle.deferred", bundle=item.id, destination=dest, reason=reason,
                    retry_in_s=round(delay, 1), attempt=item.attempts + 1)

    def _progress(self, item_id: str) -> Callable[[int], None]:
        last = [0.0]

        def report(done: int) -> None:
            self.beat()
            now = time.monotonic()
            if now - last[0] >= 1.0:  # do not turn a fast copy into a stream of commits
                last[0] = now
                self.queue.progress(item_id, done)
        return report

    def close(self) -> None:
        for t in self.transports:
            t.close()
