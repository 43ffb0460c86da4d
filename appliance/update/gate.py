"""The health gate of a boot: keep the slot, wait, or reject it. Pure: observations in,
a verdict out; the mark-good unit (cli/update.py `gate`) observes and acts.

A slot is kept when the daemon has sent READY (its unit is active), the supervisor
reports no problem, the config checks clean, no spool entry newly fails authentication
(update/spoolcheck.py: counted by the old software before the install and by the new one
on the trial boot) and, if the ops link was up before the update, it is up again. It is
rejected at once when the config does not check, more spool entries fail authentication
than before, the daemon's unit has failed for good or has been restarted `MAX_RESTARTS`
times, and when the deadline passes without the conditions for keeping it. Verdict reasons name
conditions, never data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEADLINE_S = 600.0  # the issue: keep within 10 minutes of boot, or fall back
MAX_RESTARTS = 3  # a daemon that crashes this often after an update will not settle

Verdict = Literal["keep", "wait", "reject"]


@dataclass(frozen=True)
class Observation:
    unit_state: str  # systemd ActiveState of appliance.service: active, activating, failed...
    restarts: int  # NRestarts of appliance.service since boot
    problems: tuple[str, ...] | None  # the supervisor's problems; None: the daemon did not answer
    config_ok: bool
    ops_link_up: bool | None  # None: no ops link configured, or the daemon did not answer
    ops_link_was_up: bool  # recorded by `appliance update` before the install
    # Spool entries failing authentication (spoolcheck.SpoolAuth.failures): before the
    # install (the trial record; None: a record from a release that did not count) and on
    # this boot (None: not counted, e.g. the spool key unreadable).
    spool_failures_before: int | None = None
    spool_failures_now: int | None = None


def judge(o: Observation, elapsed_s: float, deadline_s: float = DEADLINE_S) -> tuple[Verdict, str]:
    """The verdict and the condition it rests on."""
    if not o.config_ok:
        return "reject", "the config does not check"
    newly = _newly_failing(o)
    if newly:
        what = "entry newly fails" if newly == 1 else "entries newly fail"
        return "reject", f"{newly} spool {what} authentication"
    if o.unit_state == "failed":
        return "reject", "appliance.service failed"
    if o.restarts >= MAX_RESTARTS:
        return "reject", f"appliance.service restarted {o.restarts} times"
    waiting = _waiting_for(o)
    if waiting is None:
        return "keep", "ready and healthy"
    if elapsed_s >= deadline_s:
        return "reject", f"not healthy within {deadline_s:.0f} s: {waiting}"
    return "wait", waiting


def _newly_failing(o: Observation) -> int:
    if o.spool_failures_before is None or o.spool_failures_now is None:
        return 0
    return max(0, o.spool_failures_now - o.spool_failures_before)


def _waiting_for(o: Observation) -> str | None:
    """The first condition for keeping the slot that is not met yet, or None."""
    if o.unit_state != "active":
        return f"appliance.service is {o.unit_state}, not ready"
    if o.problems is None:
        return "the daemon does not answer on its control socket"
    if o.problems:
        return f"the supervisor reports {len(o.problems)} problem(s)"
    if o.spool_failures_before is not None and o.spool_failures_now is None:
        return "the spool's authentication was not checked on this slot"
    if o.ops_link_was_up and not o.ops_link_up:
        return "the ops link was up before the update and is not up again"
    return None
