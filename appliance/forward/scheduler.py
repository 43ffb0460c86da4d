"""The forwarding scheduler: takes due bundles from the queue and hands them to a transport.

Order: highest priority first (stat before routine), then oldest. One bundle at a time
per destination. Each attempt is: `claim_next` (ready/deferred -> active, atomically), `send`, then
`delivered`, `defer` (Retryable: back off with jitter between queue.retry_min_s and
retry_max_s), `refused` (Permanent: the reason is shown in `appliance queue list` until a
human releases or deletes it) or `quarantine` (Unreadable: the bundle file fails
authentication; it is moved to `STATE/quarantine/`, never deleted, and the item is
`failed` with the reason). An unexpected exception in a transport is treated as
retryable and logged with its type, so a bug cannot wedge the queue on one bundle.

Destinations: for now every bundle goes to the first destination; failover across the
ordered list is a later step and will live here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import structlog

from appliance.core import failpoints
from appliance.core.config import Queue as QueueConfig
from appliance.forward import Permanent, Retryable, Transport, Unreadable
from appliance.queue.store import Queue, backoff

log = structlog.get_logger("appliance.forward")


class Forwarder:
    def __init__(self, queue: Queue, transports: Sequence[Transport], cfg: QueueConfig,
                 rng: random.Random | None = None, beat: Callable[[], None] = lambda: None) -> None:
        self.queue = queue
        self.transports = list(transports)
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.beat = beat
        self.last_error: dict[str, str] = {}

    def run_once(self, now: float | None = None) -> bool:
        """Attempt the next due bundle; returns False when nothing was due."""
        now = time.time() if now is None else now
        if not self.transports:
            return False
        dest = self.transports[0]
        item = self.queue.claim_next(now, dest.name)
        if item is None:
            return False
        t0 = time.monotonic()
        try:
            failpoints.hit("forward.hang")
            dest.send(item.id, self.queue.path(item.id), self._progress(item.id))
        except Unreadable as e:
            kept = self.queue.quarantine(item.id, str(e))
            self.last_error[dest.name] = str(e)
            log.error("bundle.quarantined", bundle=item.id, destination=dest.name, reason=str(e),
                      file=kept.name)
        except Permanent as e:
            self.queue.refused(item.id, str(e))
            self.last_error[dest.name] = str(e)
            log.error("bundle.held", bundle=item.id, destination=dest.name, reason=str(e))
        except Retryable as e:
            self._defer(item.id, item.attempts, dest.name, str(e))
        except Exception as e:
            self._defer(item.id, item.attempts, dest.name, f"internal error ({type(e).__name__})")
            log.exception("bundle.send_crashed", bundle=item.id, destination=dest.name)
        else:
            self.queue.delivered(item.id, time.time())
            self.last_error.pop(dest.name, None)
            log.info("bundle.delivered", bundle=item.id, destination=dest.name,
                     bytes=item.bundle_bytes, seconds=round(time.monotonic() - t0, 3))
        return True

    def _defer(self, item_id: str, attempts: int, dest: str, reason: str) -> None:
        delay = backoff(attempts + 1, self.cfg.retry_min_s, self.cfg.retry_max_s, self.rng)
        self.queue.defer(item_id, reason, delay, time.time())
        self.last_error[dest] = reason
        log.warning("bundle.deferred", bundle=item_id, destination=dest, reason=reason,
                    retry_in_s=round(delay, 1), attempt=attempts + 1)

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
