"""What to do when an attempt fails: the pure decisions the scheduler carries out.

A bad instance must not hold back its bundle, nor a bundle the queue. A transport names
the instances a failure is tied to (`TransportError.instances`: the PACS refused it, or
stopped answering or dropped the association while it was being sent). Then:

* the PACS refused them outright (a failure status, a SOP class or syntax it does not
  take): they are parked at once - each becomes a held queue item of its own, with the
  reason - and the rest of the bundle is sent again right away;
* the PACS choked on them (no answer, abort, a transient status): they become suspects,
  sent last from now on, on associations of their own. The failure counts against a
  suspect (a strike) only when the destination demonstrably works - it stored other
  instances of this bundle, in this attempt or before, or it answers a probe (C-ECHO)
  right after the failure; otherwise the destination may simply be down, and the bundle
  waits with back-off as any other. A suspect with `park_after` strikes is parked, and
  the rest goes on.

So a poisoned instance costs its bundle at most `park_after` + 1 attempts, the other
instances are delivered first, and every other bundle goes on meanwhile on the other
lanes. An item that is itself a parked instance (sent alone after an operator released
it) is simply held again on a refusal, or retried with back-off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

PARK_AFTER = 2  # strikes before a suspect is parked

Action = Literal["again", "defer", "refuse"]


@dataclass(frozen=True)
class Failure:
    permanent: bool
    instances: tuple[int, ...]  # what the transport blamed (manifest indexes)
    delivered_now: int  # instances the destination took in this attempt
    delivered_before: int  # ... in earlier attempts
    strikes: Mapping[int, int] = field(default_factory=dict)  # counted so far, by index
    parked_item: bool = False  # the item is a parked instance sent on its own
    answers: bool = False  # the destination answered a probe after this failure


@dataclass(frozen=True)
class Decision:
    action: Action  # again: ready now (the rest goes); defer: back off; refuse: hold
    park: tuple[int, ...] = ()
    suspect: tuple[int, ...] = ()  # send last from now on
    strike: bool = False  # the failure counts against the suspects


def needs_probe(f: Failure) -> bool:
    """Whether a probe of the destination would decide the case (nothing else proves
    that it works)."""
    return (not f.permanent and bool(f.instances) and not f.parked_item
            and f.delivered_now == 0 and f.delivered_before == 0)


def decide(f: Failure, park_after: int = PARK_AFTER) -> Decision:
    if f.parked_item or not f.instances:
        return Decision("refuse" if f.permanent else "defer")
    if f.permanent:
        return Decision("again", park=f.instances)
    if f.delivered_now == 0 and f.delivered_before == 0 and not f.answers:
        return Decision("defer", suspect=f.instances)  # maybe the destination, not them
    park = tuple(i for i in f.instances if f.strikes.get(i, 0) + 1 >= park_after)
    return Decision("again", park=park, suspect=tuple(i for i in f.instances if i not in park),
                    strike=True)
