"""The queue's state machine (pure table) and the rule that only the queue writes state."""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
from pathlib import Path

import pytest

from appliance.core.errors import NotFoundError, StateError
from appliance.queue import commands
from appliance.queue import state as machine
from appliance.queue.index import open_index
from appliance.queue.store import Queue, transition
from tests.peers import REPO


def test_every_move_of_the_table_ends_in_a_known_state_or_removes_the_item() -> None:
    for event, moves in machine.TABLE.items():
        for src, dst in moves.items():
            assert src in machine.STATES, (event, src)
            assert dst is machine.GONE or dst in machine.STATES, (event, dst)


def test_every_state_but_receiving_is_reached_by_some_event() -> None:
    reached = {dst for moves in machine.TABLE.values() for dst in moves.values()}
    assert set(machine.STATES) - reached == {"receiving"}  # created by the spool only


def test_operators_never_touch_an_item_in_flight_or_still_being_received() -> None:
    for event in machine.OPERATOR_EVENTS:
        assert not {"active", "receiving", "sealed"} & set(machine.allowed_from(event)), event


def test_a_delivered_item_can_only_be_forgotten() -> None:
    leaving = {e for e, moves in machine.TABLE.items() if "delivered" in moves}
    assert leaving == {"delete", "expire"}
    assert all(machine.TABLE[e]["delivered"] is machine.GONE for e in leaving)


def test_an_event_that_does_not_apply_says_what_it_needs() -> None:
    with pytest.raises(machine.Invalid, match="is active; hold needs one of: ready, deferred"):
        machine.next_state("active", "hold")
    assert machine.next_state("held", "release") == "ready"
    assert machine.next_state("delivered", "expire") is None


def test_only_the_queue_writes_the_state_column() -> None:
    """Spool, pack, forward, the CLI and the daemon name events; none writes `state` (of an
    item or of its deliveries)."""
    writes = re.compile(r"(UPDATE\s+(segments|deliveries)\s+SET[^\"']*\bstate\s*="
                        r"|INSERT\s+INTO\s+(segments|deliveries))", re.I)
    offenders = []
    for path in (REPO / "appliance").rglob("*.py"):
        # the store (queue/store.py, and its transitions in queue/transitions.py), and the
        # index's schema migrations (which carry rows forward)
        if path.relative_to(REPO).as_posix() in ("appliance/queue/store.py", "appliance/queue/transitions.py",
                                                 "appliance/queue/index.py"):
            continue
        offenders += [f"{path.relative_to(REPO)}:{n}" for n, line in
                      enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert offenders == []


# --- items born per kind, and a bundle with copies ------------------------------------


def test_every_kind_of_item_is_born_in_a_state_the_table_moves_on() -> None:
    """A segment, a parked instance, a copy: each starts in a state some event leaves."""
    leaving = {s for moves in machine.TABLE.values() for s in moves}
    assert set(machine.BORN) == {"segment", "parked", "copy"}
    assert all(state in machine.STATES and state in leaving for state in machine.BORN.values())


def test_a_copy_is_born_ready_to_claim() -> None:
    assert machine.next_state(machine.BORN["copy"], "claim") == "active"


@pytest.mark.parametrize(("state", "copies", "overall"), [
    ("delivered", (), "delivered"),
    ("delivered", ("delivered", "delivered"), "delivered"),
    ("delivered", ("delivered", "ready"), "delivered, copies 1/2"),
    ("delivered", ("held",), "delivered, copies 0/1"),
    ("deferred", ("delivered",), "deferred"),  # the chain's own state: a copy never shows as it
    ("active", ("failed",), "active"),
])
def test_a_bundle_is_delivered_only_when_its_chain_and_every_copy_are(
        state: str, copies: tuple[str, ...], overall: str) -> None:
    assert machine.overall(state, copies) == overall


# --- deliveries: an item's record per destination ------------------------------------


def test_every_delivery_move_ends_in_a_known_delivery_state() -> None:
    for event, moves in machine.DELIVERY_TABLE.items():
        for src, dst in moves.items():
            assert src is None or src in machine.DELIVERY_STATES, (event, src)
            assert dst in machine.DELIVERY_STATES, (event, dst)


def test_every_item_event_that_moves_a_delivery_names_a_delivery_event() -> None:
    assert set(machine.DELIVERY_ON) <= set(machine.TABLE)
    assert set(machine.DELIVERY_ON.values()) <= set(machine.DELIVERY_TABLE)
    assert "moved" in machine.DELIVERY_TABLE  # only the forwarder's failover asks for it


@pytest.mark.parametrize(("state", "event", "after"), [
    (None, "claim", "active"), ("waiting", "claim", "active"), ("moved", "claim", "active"),
    ("held", "claim", "active"), ("active", "delivered", "delivered"), ("active", "retry", "waiting"),
    ("active", "moved", "moved"), ("active", "refused", "held"), ("waiting", "failed", "failed"),
])
def test_a_delivery_moves_by_the_table(state: str | None, event: str, after: str) -> None:
    assert machine.next_delivery(state, event) == after


@pytest.mark.parametrize(("state", "event"), [
    ("active", "claim"), ("delivered", "claim"), ("waiting", "delivered"), (None, "moved"),
    ("delivered", "failed"),
])
def test_a_delivery_event_that_does_not_apply_says_what_it_needs(state: str | None, event: str) -> None:
    with pytest.raises(machine.Invalid, match=f"{event} needs one of"):
        machine.next_delivery(state, event)


# --- the store applies the table --------------------------------------------------------


def _queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path, open_index(tmp_path))


def _add(q: Queue, item_id: str, state: str = "ready") -> None:
    now = time.time()
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances, bytes)"
                  " VALUES (?,?,?,?,?,1,10)", (item_id, "k" * 16, state, now, now))
    q.path(item_id).write_bytes(b"bundle")


def test_transition_names_the_item_and_what_the_event_needs(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "aa01", "delivered")
    with q.index.tx() as c, pytest.raises(StateError, match="aa01 is delivered; claim needs one of"):
        transition(c, "aa01", "claim", time.time())
    with q.index.tx() as c, pytest.raises(NotFoundError):
        transition(c, "zz99", "claim", time.time())


def test_claim_next_takes_each_item_once(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    for i in range(3):
        _add(q, f"bb0{i}")
    claimed = [q.claim_next(time.time(), "d") for _ in range(4)]
    assert sorted(i.id for i in claimed if i) == ["bb00", "bb01", "bb02"]
    assert claimed[3] is None
    assert {i.state for i in q.list()} == {"active"}


def test_hold_all_skips_nothing_it_could_hold_and_never_an_item_in_flight(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    _add(q, "cc01")
    _add(q, "cc02", "active")
    _add(q, "cc03", "delivered")
    assert commands.change(q, "hold", None, every=True) == [{"id": "cc01", "result": "hold"}]
    assert [q.get(i).state for i in ("cc01", "cc02", "cc03")] == ["held", "active", "delivered"]
    with pytest.raises(StateError, match="cc02 is active"):
        commands.change(q, "delete", "cc02", every=False)


def test_operator_commands_racing_the_forwarder_never_break_either(tmp_path: Path) -> None:
    """Threads as the daemon runs them: the forwarder claims and delivers while operator
    commands hold, release, retry and delete at random. The forwarder never meets an
    error, and every item ends in exactly one state the table allows."""
    q = _queue(tmp_path)
    ids = [f"dd{i:02d}" for i in range(60)]
    for i in ids:
        _add(q, i)
    stop = threading.Event()
    forward_errors: list[BaseException] = []
    delivered: list[str] = []

    def forwarder() -> None:
        while not stop.is_set():
            try:
                item = q.claim_next(time.time(), "d")
                if item is None:
                    time.sleep(0.001)
                    continue
                q.delivered(item.id, time.time())
                delivered.append(item.id)
            except BaseException as e:  # noqa: BLE001 - any error here is the failure
                forward_errors.append(e)
                return

    def operator(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            verb = rng.choice(machine.OPERATOR_EVENTS)
            # refused when the item is in flight, delivered or deleted, as it should be
            with contextlib.suppress(StateError, NotFoundError):
                commands.change(q, verb, rng.choice(ids), every=False)

    threads = [threading.Thread(target=forwarder)] + [
        threading.Thread(target=operator, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert forward_errors == []
    assert delivered, "the forwarder made no progress at all"
    for item in q.list():  # delivered stays delivered (or was deleted); nothing is left active
        assert item.state == "delivered" if item.id in delivered else item.state in machine.WAITING
