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

Destinations (`forward.failover`): each claim goes to the first destination in config
order that is up; when every one is down nothing is claimed (items wait without spending
attempts). A failure that is the destination's (`TransportError.scope`) counts against
it, and a probe is sent right after it (bounded by LANE_PROBE_WAIT_S, so a lane is never
held for long); a destination is marked down after `queue.down_after` such failures in a
row, or at once when that probe does not answer either. The failed item then moves on:
ready again at once, its delivery at the down destination marked `moved`, and the next
claim takes it to the next destination that is up. Only when none is up is it deferred
(or held, for a Permanent failure) as before. While down, `probe_due` (the daemon's
prober thread) probes it on the failover back-off; when it answers it is up again, new
claims go to it, and items deferred for want of a destination become due at once.
Items in flight elsewhere finish where they are. Every change between up and down is
logged (`destination.down`, `destination.up`) and saved in the queue index, so a restart
keeps it. What a destination holds of a bundle is recorded per destination: a bundle
that moves sends all its instances to the next one.

Routes and copies: an item whose study a rule routed (`Item.route`) fails over only
along the failover destinations the rule named, in config order. A destination with
`mode = "copy"` is outside the chain: each bundle gets a copy item for it (`make_copies`,
before every claim), pinned to it, claimed only while it is up and retried, deferred,
parked or held on its own; its failures never move or defer the bundle, nor the other
way round. The daemon gives each copy destination a lane of its own and the chain's
lanes never take copies (`run_once(copies=False)` / `run_once(only=name)`), so a copy
destination that hangs holds no lane of the chain.

Send rate (read-only, for the packer's codec choice, `pack.pace`): each destination's
recent bundle bytes per second of busy time over its whole deliveries (`link`).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from appliance.core import failpoints
from appliance.core.config import Queue as QueueConfig
from appliance.forward import Permanent, Plan, Transport, TransportError, Unreadable, failover, policy
from appliance.forward.controls import Controls
from appliance.forward.failover import Event, Health
from appliance.pack.pace import Throughput
from appliance.queue.store import DestinationRow, Item, Queue, backoff

log = structlog.get_logger("appliance.forward")

BUDGET_BASE_S = 120.0  # every attempt gets this much, plus its bytes at queue.min_rate_kbit_s
LANE_PROBE_WAIT_S = 5.0  # a lane waits this long at most for a probe after a failure (a healthy
# PACS answers a C-ECHO well within it even over a slow satellite link; one that does not
# is not healthy enough to keep sending to)
PROBE_WAIT_S = 60.0  # the prober waits this long at most for one probe of a down destination


def budget(bundle_bytes: int, min_rate_kbit_s: float, base_s: float = BUDGET_BASE_S) -> float:
    """Seconds an attempt may take in all before it is cancelled (pure)."""
    return base_s + bundle_bytes * 8 / (min_rate_kbit_s * 1000)


class Destinations:
    """The live health of every destination (`forward.failover`), saved through the queue
    on every change; loaded from it at start, so a restart keeps a down primary down."""

    def __init__(self, queue: Queue, order: Sequence[str], settings: failover.Settings) -> None:
        self.queue = queue
        self.order = list(order)
        self.settings = settings
        self._lock = threading.Lock()
        saved = queue.destinations()
        self._health = {n: _health(n, saved.get(n)) for n in self.order}

    def get(self, name: str) -> Health:
        with self._lock:
            return self._health[name]

    def all(self) -> list[Health]:
        with self._lock:
            return [self._health[n] for n in self.order]

    def pick(self) -> str | None:
        with self._lock:
            return failover.pick(self.order, self._health)

    def up(self, order: Sequence[str]) -> list[str]:
        with self._lock:
            return failover.up(order, self._health)

    def elsewhere(self, name: str, order: Sequence[str] | None = None) -> bool:
        """Whether a destination other than `name` is up (of `order`; default all)."""
        with self._lock:
            return failover.any_up(self.order if order is None else order, self._health, but=name)

    def down(self) -> list[str]:
        with self._lock:
            return [n for n in self.order if not self._health[n].up]

    def change(self, name: str,
               step: Callable[[Health], tuple[Health, Event | None] | Health]) -> Event | None:
        """Apply a failover step to `name`'s health and save the result."""
        with self._lock:
            out = step(self._health[name])
            h, event = out if isinstance(out, tuple) else (out, None)
            if h != self._health[name]:
                self._health[name] = h
                self.queue.save_destination(h.name, h.up, h.since, h.failures, h.probes,
                                            h.last_error, h.next_probe)
            return event


def not_before(delay: float, e: TransportError | None, max_s: float) -> float:
    """The back-off `delay`, lengthened to what the destination asked for (a Retryable's
    `retry_after_s`), but never beyond `max_s` (queue.retry_max_s)."""
    asked = getattr(e, "retry_after_s", None)
    if asked is None:
        return delay
    return max(delay, min(float(asked), max_s))


def _ask(transport: Transport, answer: list[bool]) -> None:
    try:
        answer.append(bool(transport.probe()))
    except Exception:  # a probe that breaks proves nothing
        log.exception("destination.probe_failed", destination=transport.name)


def _health(name: str, row: DestinationRow | None) -> Health:
    if row is None:
        return Health(name)
    return Health(name, up=row.up, since=row.since, failures=row.failures, probes=row.probes,
                  last_error=row.last_error, next_probe=row.next_probe)


class Audit(Protocol):
    """What the audit trail is told (the daemon's adapter to appliance.audit)."""

    def sent(self, item: Item, destination: str, instances: int, problem: str | None) -> None: ...


class Forwarder:
    def __init__(self, queue: Queue, transports: Sequence[Transport], cfg: QueueConfig,
                 rng: random.Random | None = None, beat: Callable[[], None] = lambda: None,
                 budget_base_s: float = BUDGET_BASE_S, wake: Callable[[], None] = lambda: None,
                 lane_probe_wait_s: float = LANE_PROBE_WAIT_S,
                 probe_wait_s: float = PROBE_WAIT_S, copies: Sequence[str] = (),
                 audit: Audit | None = None, controls: Controls | None = None) -> None:
        self.queue = queue
        self.controls = controls  # the operator's switches: paused, destinations off
        self.audit = audit  # told of each delivery and parked instance (appliance.audit)
        self.budget_base_s = budget_base_s
        self.transports = list(transports)
        self.by_name = {t.name: t for t in self.transports}
        self.copies = [t.name for t in self.transports if t.name in copies]  # mode = "copy"
        self.chain = [t.name for t in self.transports if t.name not in copies]  # failover
        self.cfg = cfg
        self.rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self.beat = beat
        self.wake = wake  # the lanes: somewhere to send to came up
        self.lane_probe_wait_s = lane_probe_wait_s
        self.probe_wait_s = probe_wait_s
        self.last_error: dict[str, str] = {}
        self.health = Destinations(queue, [t.name for t in self.transports], failover.Settings(
            cfg.down_after, cfg.probe_min_s, cfg.probe_max_s))
        self._probing: dict[str, tuple[threading.Thread, list[bool]]] = {}
        self._probing_lock = threading.Lock()
        self.sent = {t.name: Throughput() for t in self.transports}  # whole bundles only
        self.stopping = threading.Event()  # set by `stop`: no new claims, sends cut short
        self._in_flight: set[threading.Event] = set()  # the `cancelled` of each running attempt
        self._in_flight_lock = threading.Lock()

    def link(self) -> tuple[str | None, float | None]:
        """The destination a bundle packed now would go to (the first of the failover chain
        that is up; copies are not waited for) and its recent send rate in bundle bytes/s
        (None until a whole bundle was delivered there)."""
        name = next(iter(self._up(self.chain)), None)
        return name, None if name is None else self.sent[name].rate()

    def run_once(self, now: float | None = None, min_priority: int = 0,
                 copies: bool = True, only: str | None = None) -> bool:
        """Attempt the next due item on the first destination of its chain that is up (or
        a copy on its copy destination); returns False when nothing was due (or nowhere
        to send it is up). `copies=False`: chain items only; `only`: copies for that copy
        destination only (its lane)."""
        if self.stopping.is_set():
            return False
        now = time.time() if now is None else now
        self.queue.make_copies(self.copies, now)
        if self.controls is not None and self.controls.paused is not None:
            return False  # paused by an operator: a send in progress finishes, none starts
        if only is not None:
            up, copy_up = [], self._up([only])
        else:
            up, copy_up = self._up(self.chain), self._up(self.copies) if copies else []
        item = self.queue.claim_next(now, up, min_priority, copies=copy_up)
        if item is None:
            return False
        self._attempt(item, self.by_name[str(item.destination)])
        return True

    def _elsewhere(self, item: Item, name: str) -> bool:
        """Whether the item can move on from `name`: another destination of its chain is
        up (a copy has nowhere else to go)."""
        if item.copy_to is not None:
            return False
        return any(n != name for n in self._up(failover.chain(self.chain, item.route)))

    def _up(self, order: Sequence[str]) -> list[str]:
        """The destinations of `order` that are up and not switched off by an operator."""
        up = self.health.up(order)
        if self.controls is None:
            return up
        off = self.controls.off()
        return [n for n in up if n not in off]

    # --- the operator's switches (forward/controls.py) ---

    def pause(self, by: str) -> bool:
        assert self.controls is not None
        changed = self.controls.pause(by)
        if changed:
            log.warning("forward.paused", by=by)
        return changed

    def resume(self) -> bool:
        assert self.controls is not None
        changed = self.controls.resume()
        if changed:
            log.warning("forward.resumed")
            self.wake()
        return changed

    def switch_off(self, name: str, by: str) -> bool:
        """Switch `name` off: deferred items waiting for it become due now, so that they
        move on to the next destination of their chain."""
        assert self.controls is not None
        changed = self.controls.switch_off(name, by)
        if changed:
            log.warning("destination.off", destination=name, by=by)
            self.queue.due_now([name], time.time())
            self.wake()
        return changed

    def switch_on(self, name: str) -> bool:
        assert self.controls is not None
        changed = self.controls.switch_on(name)
        if changed:
            log.warning("destination.on", destination=name)
            self.wake()
        return changed

    def stop(self) -> None:
        """The daemon is stopping: no lane claims anything more, and every attempt in
        flight is cancelled as its time budget would cancel it (each transport gives up at
        its next poll, within about a second; a DICOM association is aborted). What the
        destination took is recorded; the item stays active and `Queue.recover` requeues
        it at the next start. An interrupted attempt is no failure of the destination nor
        of an instance: it strikes nothing, defers nothing and marks nothing down."""
        self.stopping.set()
        with self._in_flight_lock:
            for cancelled in self._in_flight:
                cancelled.set()

    def _attempt(self, item: Item, dest: Transport) -> None:
        known = ({} if item.only_index is not None else
                 self.queue.instances_of(item.bundle_id, dest.name, exact=item.is_copy))
        delivered: list[int] = []
        plan = Plan(
            skip=frozenset(i for i, (st, _) in known.items() if st in ("delivered", "parked")),
            only=None if item.only_index is None else frozenset({item.only_index}),
            last=frozenset(i for i, (st, _) in known.items() if st == "suspect"),
            delivered=delivered.append)
        size = item.bundle_bytes if item.only_index is None else 0
        timer = threading.Timer(budget(size, self.cfg.min_rate_kbit_s, self.budget_base_s),
                                plan.cancelled.set)
        timer.daemon = True
        timer.start()
        with self._in_flight_lock:
            self._in_flight.add(plan.cancelled)
            if self.stopping.is_set():  # `stop` came between the claim and here
                plan.cancelled.set()
        t0 = time.monotonic()
        whole = item.parent is None and not plan.skip  # bytes on the wire = bundle_bytes
        meter = self.sent[dest.name]
        meter.begin()
        sent = 0
        try:
            failpoints.hit("forward.hang")
            dest.send(item.id, self.queue.path(item.bundle_id), self._progress(item.id), plan)
        except Exception as e:
            if self.stopping.is_set() and plan.cancelled.is_set():  # cut short by `stop`
                self._record(item, dest.name, delivered)
                log.info("bundle.interrupted", bundle=item.id, destination=dest.name,
                         instances=len(delivered))
            else:
                self._judge(item, dest, e, known, delivered)
        else:
            self._record(item, dest.name, delivered)
            self._answered(dest.name, "delivered")
            parked = sum(1 for st, _ in known.values() if st == "parked")
            self.queue.delivered(item.id, time.time(),
                                 reason=f"delivered without {parked} parked instance(s)" if parked else None)
            self.last_error.pop(dest.name, None)
            sent = item.bundle_bytes if whole else 0
            self._audit(item, dest.name, len(delivered), None)
            log.info("bundle.delivered", bundle=item.id, destination=dest.name,
                     bytes=item.bundle_bytes, instances=len(delivered), parked=parked,
                     seconds=round(time.monotonic() - t0, 3))
        finally:
            timer.cancel()
            meter.end(sent)
            with self._in_flight_lock:
                self._in_flight.discard(plan.cancelled)

    def _judge(self, item: Item, dest: Transport, e: Exception, known: dict[int, tuple[str, int]],
               delivered: list[int]) -> None:
        """A failed attempt: quarantine, the failure judged (forward.policy), or - for an
        exception that is no TransportError, a bug - deferred. Called while `e` is handled."""
        if isinstance(e, Unreadable):
            kept = self.queue.quarantine(item.id, str(e))
            self.last_error[dest.name] = str(e)
            log.error("bundle.quarantined", bundle=item.id, destination=dest.name, reason=str(e),
                      file=kept.name)
        elif isinstance(e, TransportError):
            self._record(item, dest.name, delivered)
            if e.scope == "destination":
                self._destination_failed(item, dest, e)
            else:
                self._failed(item, dest.name, e, known, len(delivered))
        else:
            self._record(item, dest.name, delivered)
            self._defer(item, dest.name, f"internal error ({type(e).__name__})")
            log.exception("bundle.send_crashed", bundle=item.id, destination=dest.name)

    def _audit(self, item: Item, dest: str, instances: int, problem: str | None) -> None:
        if self.audit is None or not instances:
            return
        try:
            self.audit.sent(item, dest, instances, problem)
        except Exception:  # an audit failure never changes what happens to the bundle
            log.exception("audit.sent_failed", bundle=item.id, destination=dest)

    def _record(self, item: Item, dest: str, delivered: list[int]) -> None:
        if delivered:
            self.queue.instances_delivered(item.bundle_id, dest, delivered)

    def _failed(self, item: Item, dest: str, e: TransportError, known: dict[int, tuple[str, int]],
                delivered_now: int) -> None:
        reason = str(e)
        failure = policy.Failure(
            permanent=isinstance(e, Permanent), instances=e.instances, delivered_now=delivered_now,
            delivered_before=sum(1 for st, _ in known.values() if st == "delivered"),
            strikes={i: known.get(i, ("", 0))[1] for i in e.instances},
            parked_item=item.only_index is not None)
        if policy.needs_probe(failure):
            answers = self._probe(self.by_name[dest], self.lane_probe_wait_s)
            log.info("destination.probed", destination=dest, bundle=item.id, answers=answers)
            failure = dataclasses.replace(failure, answers=answers)
            if not answers:  # it failed on an instance and then on a probe: one failure of its own
                self._announce(self.health.change(dest, lambda h: failover.failed(
                    h, "unreachable", time.time(), self.health.settings, self._uniform())))
        if failure.answers or delivered_now:
            self._answered(dest, "probe answered" if failure.answers else "delivered")
        decision = policy.decide(failure)
        now = time.time()
        for i in decision.park:
            child = self.queue.park(item.id, i, f"parked from {item.id} (instance {i}): {reason}", now)
            self._audit(item, dest, 1, f"instance {i} parked: {reason}")
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
        elif not self.health.get(dest).up and self._elsewhere(item, dest):
            self.queue.requeue(item.id, reason=f"moved on: {dest} is down ({reason})", moved=True)
            log.warning("bundle.moved", bundle=item.id, destination=dest, reason=reason)
        else:
            self._defer(item, dest, reason, e)

    def _destination_failed(self, item: Item, dest: Transport, e: TransportError) -> None:
        """A failure that is the destination's: count it (probing right away while the
        destination is up), then move the item on when the destination is now down and
        another is up; else defer or hold it as before."""
        reason = str(e)
        permanent = isinstance(e, Permanent)
        answers = self._probe(dest, self.lane_probe_wait_s) if self.health.get(dest.name).up else None
        cls = failover.reason_class(reason, permanent)
        event = self.health.change(dest.name, lambda h: failover.failed(
            h, cls, time.time(), self.health.settings, self._uniform(), answers))
        self.last_error[dest.name] = reason
        self._announce(event)
        if not self.health.get(dest.name).up and self._elsewhere(item, dest.name):
            self.queue.requeue(item.id, reason=f"moved on: {dest.name} is down ({reason})", moved=True)
            log.warning("bundle.moved", bundle=item.id, destination=dest.name, reason=reason)
        elif permanent:
            self.queue.refused(item.id, reason)
            log.error("bundle.held", bundle=item.id, destination=dest.name, reason=reason)
        else:
            self._defer(item, dest.name, reason, e)

    def _answered(self, name: str, why: str) -> None:
        self._announce(self.health.change(name, lambda h: failover.answered(h, time.time(), why)))

    def _announce(self, event: Event | None) -> None:
        """Log a change between up and down; items deferred on a destination that is down
        (or that just came up) become due now when somewhere is up to take them."""
        if event is None:
            return
        h = self.health.get(event.destination)
        if event.now == "down":
            log.error("destination.down", destination=event.destination, reason=event.reason,
                      failures=h.failures, next_probe_in_s=round(h.next_probe - time.time(), 1))
        else:
            log.warning("destination.up", destination=event.destination, reason=event.reason)
        if self.health.pick() is not None:
            moved = self.queue.due_now({*self.health.down(), event.destination}, time.time())
            if moved:
                log.info("destination.items_due", destination=event.destination, items=moved)
            self.wake()

    def probe_due(self, now: float | None = None, beat: Callable[[], None] = lambda: None) -> int:
        """Probe each down destination whose next probe is due (the daemon's prober
        thread; each probe bounded by `probe_wait_s`). Returns how many were probed."""
        names = failover.due(self.health.all(), time.time() if now is None else now)
        off = self.controls.off() if self.controls is not None else {}
        names = [n for n in names if n not in off]  # off: not probed until switched on
        for name in names:
            answers = self._probe(self.by_name[name], self.probe_wait_s)
            log.info("destination.probed", destination=name, answers=answers)
            if answers:
                self._answered(name, "probe answered")
            else:
                self.health.change(name, lambda h: failover.unanswered(
                    h, time.time(), self.health.settings, self._uniform()))
            beat()
        return len(names)

    def _probe(self, transport: Transport, wait_s: float) -> bool:
        """Ask `transport.probe()` on a thread of its own and wait at most `wait_s`. One
        probe per destination at a time: a caller that finds one running waits for its
        answer instead of starting another, so a probe that hangs past its own time limit
        answers False and piles nothing up."""
        with self._probing_lock:
            running = self._probing.get(transport.name)
            if running is None or not running[0].is_alive():
                answer: list[bool] = []
                thread = threading.Thread(target=_ask, args=(transport, answer),
                                          name=f"probe-{transport.name}", daemon=True)
                running = self._probing[transport.name] = (thread, answer)
                thread.start()
        thread, answer = running
        thread.join(wait_s)
        return bool(answer and answer[0])

    def _uniform(self) -> float:
        with self._rng_lock:
            return self.rng.random()

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Each destination for `appliance status`: its mode, up or down, since when, the
        class of its last failure, failures in a row, and when it is probed next."""
        off = self.controls.off() if self.controls is not None else {}
        return [{"name": h.name, "state": "off" if h.name in off else h.state,
                 "since": off[h.name].since if h.name in off else (h.since or None),
                 "mode": "copy" if h.name in self.copies else "failover",
                 "failures": h.failures, "last_error": h.last_error,
                 "next_probe": h.next_probe if not h.up and h.name not in off else None,
                 "next_probe_in_s": (round(max(0.0, h.next_probe - now), 1)
                                     if not h.up and h.name not in off else None),
                 **({"off_by": off[h.name].by} if h.name in off else {})}
                for h in self.health.all()]

    def _defer(self, item: Item, dest: str, reason: str, e: TransportError | None = None) -> None:
        with self._rng_lock:
            delay = backoff(item.attempts + 1, self.cfg.retry_min_s, self.cfg.retry_max_s, self.rng)
        delay = not_before(delay, e, self.cfg.retry_max_s)
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
