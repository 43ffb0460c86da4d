"""The segment and bundle state machine: which event moves an item from which state to which.

Pure: no I/O, no clock. `queue.store.transition` is the only code that writes a state
column, and it asks `next_state` first; the spool, the packer, the forwarder and the
operator commands (through the daemon's control socket) name an event, never a state.

    receiving --seal--> sealed --packed--> ready --claim--> active --delivered--> delivered
                          |                 ^  ^              |
                          |                 |  +--requeue-----+ (recovery at start, cancelled attempt)
                          +--pack_failed--+ |  +--release/retry--+
                                          v |                    |
                  held <--hold (operator)-- ready, deferred      |
                  held <--refused-------------------------- active (the destination will not take it)
              deferred <--defer---------------------------- active (try again later)
                failed <--quarantined / file_missing ------ any waiting or active state

`delete` (operator) and `expire` (delivered, after the keep period) remove the item.

An event that does not apply to the item's state raises `Invalid`, whose message names
what the event needs, so that an operator command on the wrong item says why.
"""

from __future__ import annotations

STATES = ("receiving", "sealed", "ready", "active", "deferred", "held", "delivered", "failed")

# The states an item waits in for the forwarder or for a human (not in flight, not done).
WAITING = ("ready", "deferred", "held")

GONE = None  # the target of events that remove the item

# event -> {from state: to state}
TABLE: dict[str, dict[str, str | None]] = {
    # the spool and the packer
    "seal": {"receiving": "sealed"},
    "packed": {"sealed": "ready"},
    "pack_failed": {"sealed": "held"},
    # the forwarder
    "claim": {"ready": "active", "deferred": "active"},
    "delivered": {"active": "delivered"},
    "defer": {"active": "deferred"},
    "refused": {"active": "held"},
    "requeue": {"active": "ready"},
    "quarantined": {s: "failed" for s in ("ready", "active", "deferred", "held")},
    "file_missing": {s: "failed" for s in ("ready", "active", "deferred", "held", "failed")},
    # operators (the CLI through the daemon, later the operations center)
    "hold": {"ready": "held", "deferred": "held"},
    "release": {"held": "ready", "deferred": "ready", "failed": "ready"},
    "retry": {"deferred": "ready", "held": "ready", "ready": "ready"},
    "delete": {s: GONE for s in ("ready", "deferred", "held", "delivered", "failed")},
    # housekeeping
    "expire": {"delivered": GONE},
}

# The events an operator may ask for by name.
OPERATOR_EVENTS = ("hold", "release", "retry", "delete")


class Invalid(Exception):
    """The event does not apply to the item's state."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"is {state}; {event} needs one of: {', '.join(allowed_from(event))}")


def allowed_from(event: str) -> tuple[str, ...]:
    """The states in which `event` applies (KeyError for an unknown event)."""
    return tuple(TABLE[event])


def next_state(state: str, event: str) -> str | None:
    """The state after `event`, or None when the event removes the item; raises Invalid."""
    moves = TABLE[event]
    if state not in moves:
        raise Invalid(state, event)
    return moves[state]
