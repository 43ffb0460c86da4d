"""The scheduler: lanes, time budgets, and bad instances set aside while the rest flows.

Real queue index and real bundle files; the destination is the fake (tests/fake_transport.py,
held to the same contract as the real transports by tests/test_transport_contract.py), so
each behaviour - refuse, choke, down - can be placed on exactly one instance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.config import Queue as QueueConfig
from appliance.forward.scheduler import Forwarder
from appliance.queue.index import open_index
from appliance.queue.store import PRIORITY_STAT, Queue
from tests.fake_transport import FakeDestination, FakeTransport
from tests.peers import wait_for
from tests.test_transport_contract import KEY, make_bundle

CFG = QueueConfig(retry_min_s=0.2, retry_max_s=1.0)


class Box:
    def __init__(self, root: Path) -> None:
        self.queue = Queue(root, open_index(root))
        self.dest = FakeDestination()
        self.dest.choke_s = 0.3
        self.fwd = Forwarder(self.queue, [FakeTransport("pacs", self.dest, KEY)], CFG, budget_base_s=60)
        self.uids: dict[str, list[str]] = {}
        self.slices = 0  # each bundle gets slices of its own: distinct SOP instances
        self.threads: list[threading.Thread] = []

    def add(self, item_id: str, n: int = 4, priority: int = 0) -> list[str]:
        _, uids = make_bundle(self.queue.path(item_id), n, first=self.slices)
        self.slices += n
        now = time.time()
        with self.queue.index.tx() as c:
            c.execute("INSERT INTO segments(id, study_key, state, priority, created, updated, instances,"
                      " bytes, bundle_bytes) VALUES (?,?,'ready',?,?,?,?,0,?)",
                      (item_id, "k" * 16, priority, now, now, n, self.queue.path(item_id).stat().st_size))
        self.uids[item_id] = uids
        return uids

    def drain(self, limit: int = 20) -> None:
        """Run one lane until nothing is due now (deferred items wait)."""
        for _ in range(limit):
            if not self.fwd.run_once():
                return
        raise AssertionError("the queue did not settle")

    def state(self, item_id: str) -> str:
        return self.queue.get(item_id).state


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.dest.unchoke.set()
    for t in b.threads:
        t.join(10)
    b.queue.index.close()


def test_an_instance_the_destination_refuses_is_parked_and_the_rest_is_delivered(box: Box) -> None:
    uids = box.add("aa01")
    box.dest.script[uids[1]] = "refuse"
    box.drain()
    item = box.queue.get("aa01")
    assert item.state == "delivered" and item.reason == "delivered without 1 parked instance(s)"
    parked = box.queue.get("aa01p1")
    assert parked.state == "held" and parked.parent == "aa01" and parked.only_index == 1
    assert "refused instance 1" in (parked.reason or "")
    assert [box.dest.stored[u] for u in uids] == [1, 0, 1, 1]
    assert box.queue.parked_count() == 1


def test_an_instance_that_chokes_the_destination_is_parked_after_two_strikes(box: Box) -> None:
    uids = box.add("bb01", n=5)
    box.dest.script[uids[2]] = "choke"
    box.drain()
    assert box.state("bb01") == "delivered"
    assert box.state("bb01p2") == "held"
    assert [box.dest.stored[u] for u in uids] == [1, 1, 0, 1, 1]  # nobody sent twice


def test_a_destination_that_is_down_blames_no_instance(box: Box) -> None:
    box.add("cc01")
    box.dest.down = True
    box.drain()
    assert box.state("cc01") == "deferred"
    assert box.queue.instances_of("cc01") == {} and box.queue.parked_count() == 0


def test_a_choke_on_the_first_instance_with_no_proof_backs_off_without_parking(box: Box) -> None:
    """Nothing of the bundle stored and the PACS does not answer a probe either: it may be
    down, so nobody is struck; the healthy instances go first at the next attempt."""
    uids = box.add("dd01", n=3)
    box.dest.script[uids[0]] = "choke"
    box.dest.echo_fails = True
    box.drain()
    assert box.state("dd01") == "deferred"  # maybe the PACS is down: nobody is struck
    assert box.queue.instances_of("dd01") == {0: ("suspect", 0)}
    wait_for(lambda: box.fwd.run_once(), timeout=5, what="the retry")  # suspects go last now:
    assert [box.dest.stored[u] for u in uids] == [0, 1, 1]  # the healthy ones got through
    box.drain()
    assert box.state("dd01") == "delivered" and box.state("dd01p0") == "held"


def test_a_lone_instance_that_chokes_a_pacs_that_answers_probes_is_parked(box: Box) -> None:
    """A one-instance bundle: nothing else of it can prove the PACS works, but the PACS
    answers a C-ECHO after each failure; two strikes park it instead of retrying forever."""
    [uid] = box.add("gg01", n=1)
    box.dest.script[uid] = "choke"
    box.drain()
    assert box.state("gg01") == "delivered" and box.state("gg01p0") == "held"
    assert box.dest.stored[uid] == 0


def test_a_released_parked_instance_is_delivered_alone_exactly_once(box: Box) -> None:
    uids = box.add("ee01")
    box.dest.script[uids[3]] = "refuse"
    box.drain()
    assert box.state("ee01p3") == "held"
    del box.dest.script[uids[3]]  # the PACS was fixed
    box.queue.release("ee01p3")
    box.drain()
    assert box.state("ee01p3") == "delivered"
    assert [box.dest.stored[u] for u in uids] == [1, 1, 1, 1]
    assert box.queue.instances_of("ee01")[3] == ("delivered", 0)


def test_deleting_a_bundle_deletes_its_parked_instances_and_then_the_file(box: Box) -> None:
    uids = box.add("ff01")
    box.dest.script[uids[0]] = "refuse"
    box.drain()
    box.queue.delete("ff01p0")
    assert box.queue.path("ff01").exists()  # the bundle still holds it until it expires
    assert box.queue.expire_delivered(0, time.time() + 1) == 1
    assert not box.queue.path("ff01").exists()


def _lanes(box: Box, stop: threading.Event, n: int = 2, stat: bool = True) -> list[threading.Thread]:
    def lane(min_priority: int) -> None:
        while not stop.is_set():
            if not box.fwd.run_once(min_priority=min_priority):
                time.sleep(0.01)
    threads = [threading.Thread(target=lane, args=(0,)) for _ in range(n)]
    if stat:
        threads.append(threading.Thread(target=lane, args=(PRIORITY_STAT,)))
    for t in threads:
        t.start()
    box.threads += threads
    return threads


def test_a_hanging_attempt_does_not_hold_back_the_bundles_behind_it(box: Box) -> None:
    box.dest.choke_s = 60  # hangs until its time budget cancels it
    box.fwd.budget_base_s = 3
    box.fwd.cfg = QueueConfig(retry_min_s=0.2, retry_max_s=1.0, min_rate_kbit_s=10_000_000)
    hang = box.add("a000", n=2)
    box.dest.script[hang[0]] = "choke"
    others = [f"b{i:03d}" for i in range(6)]
    for o in others:
        box.add(o, n=2)
    stop = threading.Event()
    _lanes(box, stop)
    try:
        wait_for(lambda: all(box.state(o) == "delivered" for o in others), timeout=10,
                 what="every other bundle, while one attempt hangs")
        assert "a000" in box.dest.sending  # still hanging: the others did not wait for it
        # each attempt is cancelled at its budget; the PACS answers probes, so the instance
        # is struck twice and parked, and the bundle delivered without it
        wait_for(lambda: box.state("a000") == "delivered", timeout=20, what="the rest of it delivered")
    finally:
        stop.set()
    assert box.state("a000p0") == "held" and box.dest.stored[hang[1]] == 1


def test_a_stat_study_goes_while_every_routine_lane_is_stuck(box: Box) -> None:
    box.dest.choke_s = 60
    box.fwd.budget_base_s = 30
    for i in range(2):
        box.dest.script[box.add(f"r{i:03d}", n=1)[0]] = "choke"
    stop = threading.Event()
    _lanes(box, stop, n=2)
    try:
        wait_for(lambda: box.dest.sending == {"r000", "r001"}, what="both routine lanes stuck")
        box.add("s000", n=2, priority=PRIORITY_STAT)
        wait_for(lambda: box.state("s000") == "delivered", timeout=5, what="the stat study")
    finally:
        stop.set()


def test_stop_cuts_a_hanging_send_short_and_leaves_the_bundle_to_be_requeued(box: Box) -> None:
    """Forwarder.stop (the daemon's stop): an attempt hanging on its second instance ends
    within a second or two instead of at its budget; the first instance is recorded as
    delivered, the item stays active for Queue.recover, and nothing is struck, deferred
    or marked down (an interrupted send is no failure of the PACS)."""
    box.dest.choke_s = 60
    uids = box.add("a000", n=3)
    box.dest.script[uids[1]] = "choke"
    stop = threading.Event()
    _lanes(box, stop, n=1, stat=False)
    try:
        wait_for(lambda: "a000" in box.dest.sending and box.dest.stored[uids[0]] == 1,
                 what="the send stuck on instance 1")
        t0 = time.monotonic()
        box.fwd.stop()
        wait_for(lambda: "a000" not in box.dest.sending, timeout=10, what="the attempt cut short")
        assert time.monotonic() - t0 < 5
    finally:
        stop.set()
    box.add("b000", n=1)
    assert box.fwd.run_once() is False  # nothing more is claimed
    item = box.queue.get("a000")
    assert (item.state, item.attempts, item.reason) == ("active", 0, None)
    assert box.queue.instances_of("a000", "pacs") == {0: ("delivered", 0)}
    assert box.fwd.health.get("pacs").up and box.fwd.health.get("pacs").failures == 0
    assert box.queue.recover()["requeued"] == 1 and box.state("a000") == "ready"
