"""Forward: the scheduler and one transport per destination kind behind one interface.

A transport sends one bundle to one destination and either returns (delivered), raises
`Retryable` (the destination may work later: connection refused, timeout, disk missing)
or raises `Permanent` (it will not work without a human: SOP class refused, bad
certificate), or its subclass `Unreadable` (the bundle file itself fails authentication:
the scheduler moves it to quarantine). The scheduler owns the queue transitions;
transports never touch the queue.

Whose fault: a failure that the transport can tie to instances of the bundle names their
manifest indexes in `instances` (the PACS refused instance 7, or stopped answering while
instance 7 was being sent); the scheduler then sets those aside (`forward.policy`) and
delivers the rest. A failure of the bundle itself says so with `bundle=True` (its file
vanished or cannot be read here; `Unreadable` always is); any other failure without
instances is the destination's (refused, timed out, rejected, not mounted), and counts
towards marking it down (`forward.failover`). `scope` names which of the three it is.

One attempt, and what the scheduler asks of it (`Plan`): which instances to leave out
(stored there by an earlier attempt, or parked), which to send alone (a parked instance
released by an operator), which to send last (suspects of an earlier failure, so that the
healthy ones go first); a callback for each instance the destination now holds; and an
event set when the attempt's time budget has run out, on which the transport stops at
its next poll and raises `Retryable`. Transports poll it at least every second.

A `Retryable` may carry `retry_after_s`, the destination's own "not before" (an HTTP
Retry-After): the scheduler then waits at least that long, but never longer than
`queue.retry_max_s` (a peer cannot park the queue for a day).

`probe()` asks whether the destination answers at all (C-ECHO, folder present): proof,
after a failure tied to an instance, that the fault is the instance's and not the
destination's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

Scope = Literal["destination", "bundle", "instance"]


class TransportError(Exception):
    """A delivery attempt failed; the message is for the operator (no patient data).

    `instances`: the manifest indexes of the instances the failure is tied to (empty when
    it is the destination's or the whole bundle's). `bundle`: the fault is this bundle's
    own (its file), not the destination's.
    """

    def __init__(self, message: str, *, instances: tuple[int, ...] = (), bundle: bool = False) -> None:
        super().__init__(message)
        self.instances = instances
        self.bundle = bundle

    @property
    def scope(self) -> Scope:
        """Whose fault: an instance's (named), the bundle's, or else the destination's."""
        if self.instances:
            return "instance"
        if self.bundle or isinstance(self, Unreadable):
            return "bundle"
        return "destination"


class Retryable(TransportError):
    """The destination may accept this later; `retry_after_s`: not before this many
    seconds, when the destination said so (an HTTP Retry-After)."""

    def __init__(self, message: str, *, instances: tuple[int, ...] = (), bundle: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, instances=instances, bundle=bundle)
        self.retry_after_s = retry_after_s


class Permanent(TransportError):
    """The destination will not accept this without a human changing something."""


class Unreadable(Permanent):
    """The bundle file fails authentication (altered, truncated, or not sealed for this
    appliance's key): no destination can be given it; it goes to quarantine, kept."""


def _nothing(index: int) -> None:
    pass


@dataclass(frozen=True)
class Answer:
    """A destination's answer to `check()`: whether it answers, and what an operator on
    site reads (`appliance echo`): "C-ECHO answered", "connection refused", ... Our own
    words and the transport's error text; shown locally, never logged or sent."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Plan:
    """What one attempt sends of a bundle (see the module docstring)."""

    skip: frozenset[int] = frozenset()
    only: frozenset[int] | None = None
    last: frozenset[int] = frozenset()
    delivered: Callable[[int], None] = _nothing
    cancelled: threading.Event = field(default_factory=threading.Event)

    def wants(self, index: int) -> bool:
        return index not in self.skip and (self.only is None or index in self.only)


class Transport(Protocol):
    name: str

    def probe(self) -> bool:
        """Does the destination answer at all (a C-ECHO, the folder is there)? Within the
        transport's own time limit; never raises. The scheduler asks after a failure that
        blames an instance when nothing else shows that the destination works.
        (`check().ok`.)"""

    def check(self) -> Answer:
        """The probe with its reason, for `appliance echo`; the same limits, never raises."""

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        """Deliver the bundle file (what `plan` asks of it; all of it by default); raise
        Retryable or Permanent on failure."""

    def close(self) -> None:
        """Release connections."""
