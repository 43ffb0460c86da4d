"""The segment and bundle state machine: which event moves an item from which state to which.

Pure: no I/O, no clock. `queue.store.transition` is the only code that writes a state
column, and it asks `next_state` first; the spool, the packer, the forwarder and the
operator commands (through the daemon's control socket) name an event, never a state.

    receiving --seal--> sealed --packed--> ready --claim--> active --delivered--> delivered
                         ^  |                ^  ^              |
         release/retry   |  |                |  +--requeue-----+ (recovery at start, the rest of a
                         |  +--pack_failed--> unpackable          bundle after instances were parked)
                         +------------------ (images still in the spool; delete is refused)
                                             |  +--release/retry--+
                  held <--hold (operator)-- ready, deferred      |
                  held <--refused-------------------------- active (the destination will not take it)
              deferred <--defer---------------------------- active (try again later)
                failed <--quarantined / file_missing ------ any waiting or active state

`delete` (operator) and `expire` (delivered, after the keep period) remove the item.

Items are born in the state `BORN` names: a segment receiving; a parked instance held
(a human decides); a copy of a bundle for a `mode = "copy"` destination ready. A copy is
an item of its own with this same table, pinned to its destination, so that the copy
and the failover chain never wait on each other; the bundle's file stays while any of
them needs it. `overall` says what the bundle and its copies mean together.

An event that does not apply to the item's state raises `Invalid`, whose message names
what the event needs, so that an operator command on the wrong item says why.
"""

from __future__ import annotations

STATES = ("receiving", "sealed", "unpackable", "ready", "active", "deferred", "held", "delivered",
          "failed")

# The states an item waits in for the forwarder or for a human (not in flight, not done).
WAITING = ("ready", "deferred", "held", "unpackable")

GONE = None  # the target of events that remove the item

# event -> {from state: to state}
TABLE: dict[str, dict[str, str | None]] = {
    # the spool and the packer
    "seal": {"receiving": "sealed"},
    "packed": {"sealed": "ready"},
    "pack_failed": {"sealed": "unpackable"},
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
    "release": {"held": "ready", "deferred": "ready", "failed": "ready", "unpackable": "sealed"},
    "retry": {"deferred": "ready", "held": "ready", "ready": "ready", "unpackable": "sealed"},
    "delete": {s: GONE for s in ("ready", "deferred", "held", "delivered", "failed")},
    # housekeeping
    "expire": {"delivered": GONE},
}

# kind of item -> the state it is created in (by an insert, not an event)
BORN = {"segment": "receiving", "parked": "held", "copy": "ready"}

# The events an operator may ask for by name.
OPERATOR_EVENTS = ("hold", "release", "retry", "delete")


class Invalid(Exception):
    """The event does not apply to the item's state."""

    def __init__(self, state: str, event: str, allowed: tuple[str, ...] | None = None) -> None:
        self.state = state
        self.event = event
        needs = allowed if allowed is not None else allowed_from(event)
        super().__init__(f"is {state}; {event} needs one of: {', '.join(needs)}")


def overall(state: str, copies: tuple[str, ...]) -> str:
    """The state of a bundle counting its copies (`copies`: the state of each copy item):
    delivered only when the failover chain and every copy delivered; while the chain is
    done and a copy is not, "delivered, copies N/M" (the file is kept for the copies);
    otherwise the bundle's own state (a copy never holds the chain up, nor shows as it)."""
    if not copies or state != "delivered":
        return state
    done = sum(1 for c in copies if c == "delivered")
    return "delivered" if done == len(copies) else f"delivered, copies {done}/{len(copies)}"


def allowed_from(event: str) -> tuple[str, ...]:
    """The states in which `event` applies (KeyError for an unknown event)."""
    return tuple(TABLE[event])


def next_state(state: str, event: str) -> str | None:
    """The state after `event`, or None when the event removes the item; raises Invalid."""
    moves = TABLE[event]
    if state not in moves:
        raise Invalid(state, event)
    return moves[state]


# --- deliveries: an item's record per destination (forward.failover) ---
#
# Each time an item is claimed for a destination, its row for (item, destination) becomes
# active; the item's own outcome moves that row too, in the same transaction
# (`queue.store.transition`), so the two never disagree:
#
#     (none), waiting, moved, held, failed --claim--> active --delivered--> delivered
#                                                        |--retry--> waiting (back-off, or ready again)
#                                                        |--moved--> moved (the destination went down:
#                                                        |            the item goes on to the next one)
#                                                        +--refused--> held
#     active, waiting, moved, held, failed --failed--> failed (quarantined, file missing)

DELIVERY_STATES = ("active", "waiting", "moved", "held", "delivered", "failed")

DELIVERY_TABLE: dict[str, dict[str | None, str]] = {
    "claim": {s: "active" for s in (None, "waiting", "moved", "held", "failed")},
    "delivered": {"active": "delivered"},
    "retry": {"active": "waiting"},
    "moved": {"active": "moved"},
    "refused": {"active": "held"},
    "failed": {s: "failed" for s in ("active", "waiting", "moved", "held", "failed")},
}

# item event -> the delivery event it means for the item's current destination
DELIVERY_ON: dict[str, str] = {
    "claim": "claim", "delivered": "delivered", "defer": "retry", "requeue": "retry",
    "refused": "refused", "quarantined": "failed", "file_missing": "failed",
}


def next_delivery(state: str | None, event: str) -> str:
    """The delivery's state after `event` (state None: no row yet); raises Invalid."""
    moves = DELIVERY_TABLE[event]
    if state not in moves:
        raise Invalid(state or "(no delivery)", event,
                      tuple(s or "(no delivery)" for s in moves))
    return moves[state]
