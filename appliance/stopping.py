"""How the daemon stops its work: the signals that ask for a stop, and the order and the
one deadline by which the receive, pack and forward stages end.

Owns: the stop of the stages that move images (daemon.py calls `stop_work` from its
`finally`, after the ops link and before the index closes): stop accepting associations,
give running associations until the deadline (`receive.dimse_timeout_s` from the start of
the stop) to finish, let the pack and forward loops finish their step (a send still
running after FORWARD_STOP_GRACE_S is cut short: Forwarder.stop), all by that one
deadline whatever a PACS does; then close the transports and the codec pool (a job still
running gets POOL_STOP_GRACE_S, then its worker is killed).

Fails: never raises for a thread that does not end in time: it is a daemon thread, left
behind, and the step it was in is redone at the next start (an instance an association
was sending is committed before its Success or not acknowledged at all; a segment being
packed stays sealed; a bundle being sent stays active and is requeued).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from appliance.forward.scheduler import Forwarder
    from appliance.pack.pool import CodecPool
    from appliance.receive.scp import Receiver, ReceiveStats

log = structlog.get_logger("appliance.daemon")

POOL_STOP_GRACE_S = 5.0
FORWARD_STOP_GRACE_S = 5.0  # at a stop, a send in progress may finish within this, else it is cut


def join_all(threads: Sequence[threading.Thread], until: float) -> None:
    """Wait for the threads to end, all by one monotonic deadline."""
    for t in threads:
        t.join(max(0.0, until - time.monotonic()))


def drain(stats: ReceiveStats, timeout: float) -> None:
    """Wait up to `timeout` for the running associations to end."""
    deadline = time.monotonic() + timeout
    while stats.associations_active and time.monotonic() < deadline:
        time.sleep(0.05)


def install_signals(stop_event: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop_event` (the daemon's loop then stops); SIGHUP is ignored."""
    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop_event.set()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)
    with contextlib.suppress(AttributeError):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def stop_work(dimse_timeout_s: float, receiver: Receiver, stats: ReceiveStats,
              wakes: Sequence[threading.Event], lanes: Sequence[threading.Thread],
              workers: Sequence[threading.Thread], forwarder: Forwarder, pool: CodecPool) -> None:
    """Stop the receive, pack and forward stages by one deadline (see the module's
    docstring); `lanes` are the forwarding threads, `workers` every loop's thread."""
    # one deadline for the whole stop (associations, then every stage), not one
    # per thread; a send still running after a short grace is cut short (a hung
    # PACS must not hold the stop past systemd's TimeoutStopSec) and is sent
    # again after the next start
    stop_by = time.monotonic() + dimse_timeout_s
    receiver.stop()
    drain(stats, stop_by - time.monotonic())
    for wake in wakes:
        wake.set()
    join_all(lanes, min(stop_by, time.monotonic() + FORWARD_STOP_GRACE_S))
    forwarder.stop()
    join_all(workers, stop_by)
    forwarder.close()
    # a job still running (the pack loop was not joined in time) is cut short:
    # its segment stays sealed and is packed again at the next start
    pool.close(cancel_futures=True, grace_s=POOL_STOP_GRACE_S)
