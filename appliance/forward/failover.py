"""Destination health: which destinations are up, which is used, when a down one is probed.

Pure: no I/O, no clock, no randomness of its own. The scheduler passes `now` and a
uniform number for jitter, carries out what comes back (persisting each `Health` through
the queue, logging each `Event`), and runs the probes.

Whose fault counts (`scope`, on `forward.TransportError`): only a failure that is the
destination's - no instance named, not the bundle's own file (`Unreadable`, a bundle file
that vanished) - counts against it: a refused connection, a time-out, a rejected
association or certificate, a missing folder. A failure tied to instances never does
(the PACS refused or choked on those; `forward.policy` deals with them), nor does one of
the bundle itself.

A destination is marked down

* after `down_after` consecutive destination-scoped failures (default 3; a success or an
  answered probe in between starts the count again), or
* at once, when the probe the scheduler sends right after a destination-scoped failure
  does not answer either. A dead PACS refuses the association and its C-ECHO within
  milliseconds, so traffic moves to the next destination within a second or two of the
  first failure instead of after three back-offs; a destination that fails a send but
  answers the probe (a flaky link, one slow attempt) is given the `down_after` chances.

While down it is probed (`Transport.probe`: C-ECHO, folder present, SSH handshake) on a
back-off from `probe_min_s`, doubling to `probe_max_s`, each delay shortened by up to a
fifth at random so that a fleet of boxes does not probe in step. An answered probe, or a
send to it that succeeds after all (an attempt in flight when it was marked down), marks
it up again (failback): new claims go to it; bundles in flight elsewhere finish there.

Destinations are used in config order: `pick` returns the first that is up, or None when
every one is down (then nothing is claimed: items wait without spending attempts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

DOWN_AFTER = 3
PROBE_MIN_S = 5.0
PROBE_MAX_S = 60.0
JITTER = 0.2  # a probe delay is shortened by up to this fraction


@dataclass(frozen=True)
class Settings:
    down_after: int = DOWN_AFTER
    probe_min_s: float = PROBE_MIN_S
    probe_max_s: float = PROBE_MAX_S


@dataclass(frozen=True)
class Health:
    """One destination's health, as kept in the queue index (`destinations` table)."""

    name: str
    up: bool = True
    since: float = 0.0  # when it last changed between up and down (0: never)
    failures: int = 0  # consecutive destination-scoped failures
    probes: int = 0  # probes unanswered since it went down
    last_error: str | None = None  # the class of the last failure (see `reason_class`)
    next_probe: float = 0.0  # while down: when to probe it next

    @property
    def state(self) -> str:
        return "up" if self.up else "down"


@dataclass(frozen=True)
class Event:
    """A change between up and down, for the log and the status (no patient data)."""

    destination: str
    was: str  # up | down
    now: str  # up | down
    reason: str  # a reason class, or "probe answered" / "delivered"


# message fragment -> reason class, first match wins (transports write these phrases)
_CLASSES: tuple[tuple[str, str], ...] = (
    ("time budget", "timeout"),
    ("timed out", "timeout"),
    ("no answer", "timeout"),
    ("within", "timeout"),
    ("refused the connection", "refused"),
    ("connection refused", "refused"),
    ("does not exist", "missing"),
    ("resolve", "unreachable"),
    ("cannot connect", "unreachable"),
    ("reset", "connection lost"),
    ("aborted", "connection lost"),
)


def reason_class(message: str, permanent: bool) -> str:
    """A short class of a failure for status, metrics and the ops link: never the text of a
    peer. A Permanent destination-scoped failure (association or certificate rejected) is
    "rejected" whatever its text."""
    if permanent:
        return "rejected"
    text = message.lower()
    return next((cls for frag, cls in _CLASSES if frag in text), "failed")


def probe_delay(probes: int, s: Settings, u: float) -> float:
    """Seconds until the next probe after `probes` unanswered ones (u uniform in [0, 1))."""
    base = min(s.probe_max_s, s.probe_min_s * 2.0 ** min(probes, 32))
    return base * (1 - JITTER * u)


def _down(h: Health, reason: str, now: float, s: Settings, u: float,
          failures: int) -> tuple[Health, Event]:
    after = dataclasses.replace(h, up=False, since=now, failures=failures, probes=0,
                                last_error=reason, next_probe=now + probe_delay(0, s, u))
    return after, Event(h.name, "up", "down", reason)


def failed(h: Health, reason: str, now: float, s: Settings, u: float,
           answers: bool | None = None) -> tuple[Health, Event | None]:
    """A destination-scoped failure of an attempt on `h`. `answers`: what the probe sent
    right after it said (None: none was sent). Returns the new health and the event when
    it went down."""
    failures = h.failures + 1
    if not h.up:  # an attempt that was in flight when it went down: nothing new
        return dataclasses.replace(h, failures=failures, last_error=reason), None
    if failures >= s.down_after or answers is False:
        return _down(h, reason, now, s, u, failures)
    return dataclasses.replace(h, failures=failures, last_error=reason), None


def answered(h: Health, now: float, why: str) -> tuple[Health, Event | None]:
    """It answered a probe or took a delivery: up, the count starts again."""
    if h.up:
        return dataclasses.replace(h, failures=0), None
    after = dataclasses.replace(h, up=True, since=now, failures=0, probes=0, next_probe=0.0)
    return after, Event(h.name, "down", "up", why)


def unanswered(h: Health, now: float, s: Settings, u: float) -> Health:
    """A probe of a down destination did not answer: probe again later, a little later
    each time."""
    if h.up:
        return h
    probes = h.probes + 1
    return dataclasses.replace(h, probes=probes, next_probe=now + probe_delay(probes, s, u))


def due(healths: Iterable[Health], now: float) -> list[str]:
    """The down destinations whose next probe is due."""
    return [h.name for h in healths if not h.up and h.next_probe <= now]


def pick(order: Sequence[str], healths: Mapping[str, Health]) -> str | None:
    """The destination for a new claim: the first in config order that is up."""
    return next((n for n in order if n not in healths or healths[n].up), None)


def any_up(order: Sequence[str], healths: Mapping[str, Health], but: str | None = None) -> bool:
    """Whether some destination other than `but` is up (somewhere else to go)."""
    return any(n != but and (n not in healths or healths[n].up) for n in order)


def up(order: Sequence[str], healths: Mapping[str, Health]) -> list[str]:
    """The destinations of `order` that are up, in that order."""
    return [n for n in order if n not in healths or healths[n].up]


def chain(order: Sequence[str], route: Sequence[str] | None) -> list[str]:
    """An item's failover chain: the failover destinations (config order) its route names;
    no route: all of them."""
    return list(order) if route is None else [n for n in order if n in route]
