"""Forward: the scheduler and one transport per destination kind behind one interface.

A transport sends one bundle to one destination and either returns (delivered), raises
`Retryable` (the destination may work later: connection refused, timeout, disk missing)
or raises `Permanent` (it will not work without a human: SOP class refused, bad
certificate), or its subclass `Unreadable` (the bundle file itself fails authentication:
the scheduler moves it to quarantine). The scheduler owns the queue transitions; transports never touch the
queue. Automatic failover across the ordered destination list comes later; the
scheduler already holds the list, and transports report errors in the shape the
health policy will need.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class TransportError(Exception):
    """A delivery attempt failed; the message is for the operator (no patient data)."""


class Retryable(TransportError):
    """The destination may accept this later."""


class Permanent(TransportError):
    """The destination will not accept this without a human changing something."""


class Unreadable(Permanent):
    """The bundle file fails authentication (altered, truncated, or not sealed for this
    appliance's key): no destination can be given it; it goes to quarantine, kept."""


class Transport(Protocol):
    name: str

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None]) -> None:
        """Deliver the bundle file; raise Retryable or Permanent on failure."""

    def close(self) -> None:
        """Release connections."""
