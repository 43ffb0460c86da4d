"""How the daemon stops its work: the signals that ask for a stop, and the order and the
one deadline by which the receive, pack and forward stages end.

Owns: the stop of the stages that move images (daemon.py calls `stop_work` from its
`finally`, after the ops link and before the index closes): stop accepting associations,
give running associations until the deadline (`receive.dimse_timeout_s` from the start of
the stop) to finish, let the pack and forward loops finish their step (a send still
running after FORWARD_STOP_GRACE_S is cut short: Forwarder.stop), all by that one
deadline whatever a PACS does; then close the transports and the codec pool (a job still
running gets POOL_STOP_GRACE_S, then its worker is killed).

Also: how long such a stop may take (`budget_s`), and `config check`'s warning when that
passes the systemd unit's TimeoutStopSec= (`timeout_warnings`; docs/systemd.md).

Fails: never raises for a thread that does not end in time: it is a daemon thread, left
behind, and the step it was in is redone at the next start (an instance an association
was sending is committed before its Success or not acknowledged at all; a segment being
packed stays sealed; a bundle being sent stays active and is requeued).
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from appliance.audit.repository import STOP_WAIT_S as AUDIT_STOP_WAIT_S
from appliance.core import sandbox
from appliance.ops.link import CONNACK_WAIT_S
from appliance.ops.link import STOP_WAIT_S as LINK_STOP_WAIT_S
from appliance.update.remote import KILL_WAIT_S, TERM_GRACE_S

if TYPE_CHECKING:
    from appliance.core.config import Config
    from appliance.forward.scheduler import Forwarder
    from appliance.pack.pool import CodecPool
    from appliance.receive.scp import Receiver, ReceiveStats

log = structlog.get_logger("appliance.daemon")

POOL_STOP_GRACE_S = 5.0
FORWARD_STOP_GRACE_S = 5.0  # at a stop, a send in progress may finish within this, else it is cut


def join_all(threads: Sequence[threading.Thread], until: float) -> None:
    """Wait for the threads to end, all by one monotonic deadline (a thread never started,
    as after a start that failed, is not waited for)."""
    for t in threads:
        if t.is_alive():
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


# --- how long a stop may take, against what the systemd unit allows ---

SHIPPED_TIMEOUT_STOP_S = 90.0  # systemd/appliance.service TimeoutStopSec= (a test reads it)
SYSTEMD_DEFAULT_TIMEOUT_STOP_S = 90.0  # DefaultTimeoutStopSec=, for an empty assignment
TIMEOUT_DROPIN = "timeout.conf"
_TIMEOUT_LINE = re.compile(r"^\s*(?:TimeoutStopSec|TimeoutSec)\s*=\s*(.*?)\s*$")
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Zµ]*)")
_SPAN_UNITS = {  # systemd.time(7); no unit: seconds
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0, "w": 604800.0, "week": 604800.0,
    "weeks": 604800.0, "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0}


def budget_s(cfg: Config) -> float:
    """The longest the daemon's stop may take with `cfg`: the bounded waits of Daemon.run's
    `finally`, one after the other (the update worker, the ops link, the stages' one
    deadline and the codec pool's grace, the audit repository's sender)."""
    return ((TERM_GRACE_S + 2 * KILL_WAIT_S if cfg.update is not None else 0.0)
            + (LINK_STOP_WAIT_S + CONNACK_WAIT_S if cfg.operations is not None else 0.0)
            + cfg.receive.dimse_timeout_s + POOL_STOP_GRACE_S
            + (AUDIT_STOP_WAIT_S if cfg.audit.syslog_host else 0.0))


def parse_timespan(text: str) -> float | None:
    """A systemd time span in seconds ("90", "1min 30s", "infinity": inf); None if it is
    not one (systemd ignores such an assignment)."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    total, pos = 0.0, 0
    while pos < len(text):
        m = _SPAN_PART.match(text, pos)
        if m is None or m.group(2) not in _SPAN_UNITS:
            return None
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2)]
        pos = m.end()
    return total if text else None


def unit_timeout_stop_s(unit_dirs: tuple[Path, ...] = sandbox.UNIT_SEARCH) -> tuple[float, str] | None:
    """The installed unit's stop timeout and the file that set it last (the unit's file,
    the first found, then its `*.conf` drop-ins by name, as systemd reads them; an empty
    assignment is systemd's default), or None when the unit is not installed."""
    installed = sandbox.unit_lines(sandbox.UNIT_NAME, unit_dirs)
    if installed is None:
        return None
    unit, lines = installed
    found = (SYSTEMD_DEFAULT_TIMEOUT_STOP_S, str(unit))
    for f, line in lines:
        if m := _TIMEOUT_LINE.match(line):
            span = SYSTEMD_DEFAULT_TIMEOUT_STOP_S if not m.group(1) else parse_timespan(m.group(1))
            found = (span, str(f)) if span is not None else found
    return found


def timeout_warnings(cfg: Config, unit_dirs: tuple[Path, ...] = sandbox.UNIT_SEARCH) -> list[str]:
    """`config check`'s warning when a stop may take longer than the unit lets it (the
    installed unit with its drop-ins, else the shipped one): systemd would kill the daemon
    while it stops (SIGKILL: the work cut short is redone at the next start, as after a
    power cut)."""
    need = budget_s(cfg)
    shipped = (SHIPPED_TIMEOUT_STOP_S, f"the shipped {sandbox.UNIT_NAME}")
    limit, where = unit_timeout_stop_s(unit_dirs) or shipped
    if need <= limit:
        return []
    extra = need - cfg.receive.dimse_timeout_s
    return [f"receive.dimse_timeout_s: a stop may take {need:g} s ({cfg.receive.dimse_timeout_s:g} s "
            f"and {extra:g} s of the stop's other waits) but {sandbox.UNIT_NAME} has "
            f"TimeoutStopSec={limit:g}s ({where}): systemd would kill the daemon before it stops; "
            f"lower receive.dimse_timeout_s or add a drop-in {sandbox.UNIT_NAME}.d/{TIMEOUT_DROPIN} "
            f"with [Service] and TimeoutStopSec={math.ceil(need) + 10}s (docs/systemd.md)"]
