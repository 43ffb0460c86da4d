"""Operator commands on the queue: show, hold, release, retry, delete.

The daemon runs these on behalf of `appliance queue ...` (through its control socket, see
`health.control`), so the queue keeps one writer; when no daemon runs, the CLI runs the
same functions itself while holding the daemon's lock (`daemon.lock_state_dir`'s file),
so a daemon cannot start in between. Later the operations center reaches them the same
way as a local operator.

What the states allow is the transition table's business (`queue.state`): `--all` takes
every item the verb applies to, and an item that moved meanwhile is reported, not fatal.
Results name items by their opaque id only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from appliance.audit import AuditTrail
from appliance.core.errors import ApplianceError, StateError, UsageError
from appliance.queue import state as machine
from appliance.queue.store import Queue

VERBS = machine.OPERATOR_EVENTS


def show(queue: Queue, item_id: str) -> dict[str, Any]:
    """The item, and where it was tried (`deliveries`: one per destination). A bundle with
    copies also shows each copy (id, destination, state, its deliveries) and `overall`,
    the state of the bundle and its copies together (`queue.state.overall`)."""
    item = queue.get(item_id)
    out: dict[str, Any] = {**dataclasses.asdict(item), "deliveries": queue.deliveries(item_id)}
    out["route"] = list(item.route) if item.route is not None else None
    copies = queue.copies_of(item_id) if item.parent is None else []
    if copies:
        out["overall"] = machine.overall(item.state, tuple(c.state for c in copies))
        out["copies"] = [{"id": c.id, "destination": c.copy_to, "state": c.state,
                          "deliveries": queue.deliveries(c.id)} for c in copies]
    return out


def change(queue: Queue, verb: str, item_id: str | None, every: bool) -> list[dict[str, str]]:
    """Apply `verb` to one item, or with `every` to each item it applies to now.

    Returns one {"id", "result"} per item ("hold", "release", ... or "skipped: <why>" for an
    item of `--all` that changed state meanwhile). Raises NotFoundError / StateError for a
    single item the verb cannot apply to, UsageError for a bad request.
    """
    if verb not in VERBS:
        raise UsageError(f"unknown queue command {verb!r}")
    if every == bool(item_id):
        raise UsageError(f"appliance queue {verb}: give one ID or --all")
    if item_id:
        _apply(queue, verb, item_id)
        return [{"id": item_id, "result": verb}]
    out = []
    for item in queue.list(machine.allowed_from(verb)):
        try:
            _apply(queue, verb, item.id)
        except StateError as e:  # moved on since the list was read (e.g. claimed for sending)
            out.append({"id": item.id, "result": f"skipped: {e}"})
            continue
        out.append({"id": item.id, "result": verb})
    return out


def change_audited(queue: Queue, verb: str, item_id: str | None, every: bool,
                   trail: AuditTrail, operator: str) -> list[dict[str, str]]:
    """`change`, written to the audit trail (who, what, on which item, the outcome)."""
    target = item_id or "all"
    try:
        results = change(queue, verb, item_id, every)
    except ApplianceError as e:
        trail.command(operator, verb, target, False, str(e))
        raise
    done = sum(1 for r in results if r["result"] == verb)
    trail.command(operator, verb, target, True, f"{done} item(s)")
    return results


def _apply(queue: Queue, verb: str, item_id: str) -> None:
    if verb == "hold":
        queue.hold(item_id, "held by operator")
    else:
        getattr(queue, verb)(item_id)
