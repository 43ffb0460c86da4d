"""The scheduler with two destinations: failover to the backup, failback to the primary.

Real queue index and bundle files; two fake destinations (tests/fake_transport.py, held
to the transport contract by tests/test_transport_contract.py) that fail the ways a
destination fails: refusing the connection, rejecting the association, dying in the
middle of a bundle, answering probes or not.
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
from appliance.queue.store import Queue
from tests.fake_transport import FakeDestination, FakeTransport
from tests.peers import wait_for
from tests.test_transport_contract import KEY, make_bundle

CFG = QueueConfig(retry_min_s=0.2, retry_max_s=1.0, down_after=3, probe_min_s=5, probe_max_s=60)
FAR = 1e12  # a `now` at which every probe is due


class Box:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.a, self.b = FakeDestination(), FakeDestination()
        self.slices = 0
        self.uids: dict[str, list[str]] = {}
        self.threads: list[threading.Thread] = []
        self.open()

    def open(self) -> None:
        self.queue = Queue(self.root, open_index(self.root))
        self.fwd = Forwarder(self.queue, [FakeTransport("primary", self.a, KEY),
                                          FakeTransport("backup", self.b, KEY)], CFG, budget_base_s=60)

    def restart(self) -> None:
        self.queue.index.close()
        self.open()

    def add(self, item_id: str, n: int = 3) -> list[str]:
        _, uids = make_bundle(self.queue.path(item_id), n, first=self.slices % 25)
        self.slices += n
        now = time.time()
        with self.queue.index.tx() as c:
            c.execute("INSERT INTO segments(id, study_key, state, priority, created, updated, instances,"
                      " bytes, bundle_bytes) VALUES (?,?,'ready',0,?,?,?,0,?)",
                      (item_id, "k" * 16, now, now, n, self.queue.path(item_id).stat().st_size))
        self.uids[item_id] = uids
        return uids

    def drain(self, limit: int = 30) -> None:
        for _ in range(limit):
            if not self.fwd.run_once():
                return
        raise AssertionError("the queue did not settle")

    def state(self, item_id: str) -> str:
        return self.queue.get(item_id).state

    def went(self, item_id: str) -> dict[str, str]:
        return {str(d["destination"]): str(d["state"]) for d in self.queue.deliveries(item_id)}

    def health(self, name: str) -> str:
        return self.fwd.health.get(name).state

    def at(self, dest: FakeDestination, item_id: str) -> list[int]:
        return [dest.stored[u] for u in self.uids[item_id]]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.a.unchoke.set()
    b.b.unchoke.set()
    for t in b.threads:
        t.join(10)
    b.queue.index.close()


def test_a_primary_that_fails_and_does_not_answer_a_probe_is_down_at_once(box: Box) -> None:
    box.add("aa01")
    box.a.down = True
    t0 = time.monotonic()
    box.drain()
    took = time.monotonic() - t0
    assert box.health("primary") == "down" and box.health("backup") == "up"
    assert box.state("aa01") == "delivered" and box.at(box.b, "aa01") == [1, 1, 1]
    assert box.went("aa01") == {"primary": "moved", "backup": "delivered"}
    assert box.queue.get("aa01").attempts == 0  # moving on spends no attempt
    assert took < 5, f"the bundle took {took:.1f} s to reach the backup"


@pytest.mark.parametrize(("asked", "waits"), [(0.8, 0.8), (3600.0, CFG.retry_max_s), (None, None)])
def test_a_retry_after_lengthens_the_back_off_up_to_retry_max_s(
        box: Box, asked: float | None, waits: float | None) -> None:
    """A destination that says "not before" (HTTP Retry-After) is not asked again sooner,
    nor later than queue.retry_max_s; without it, the back-off is the queue's own
    (at most retry_min_s for a first attempt)."""
    box.a.flaky, box.a.retry_after_s = True, asked
    box.add("ra01")
    before = time.time()
    box.fwd.run_once()
    item = box.queue.get("ra01")
    assert item.state == "deferred"
    delay = item.next_attempt - before
    if waits is None:
        assert delay <= CFG.retry_min_s + 0.5
    else:
        assert waits - 0.05 <= delay <= waits + 0.5


def test_a_primary_that_answers_probes_is_down_after_three_failures_in_a_row(box: Box) -> None:
    box.a.flaky = True  # sends fail, probes answer: it is given its chances
    for i in range(3):
        box.add(f"bb0{i}")
    box.fwd.run_once()
    box.fwd.run_once()
    assert box.health("primary") == "up" and box.fwd.health.get("primary").failures == 2
    assert {box.state("bb00"), box.state("bb01")} == {"deferred"}
    box.fwd.run_once()  # the third failure in a row
    assert box.health("primary") == "down"
    # the two deferred on the primary became due at once: everything reaches the backup now
    box.drain()
    assert [box.state(f"bb0{i}") for i in range(3)] == ["delivered"] * 3
    assert all(box.went(f"bb0{i}")["backup"] == "delivered" for i in range(3))


def test_a_success_in_between_starts_the_count_again(box: Box) -> None:
    box.a.flaky = True
    box.add("cc01")
    box.add("cc02")
    box.fwd.run_once()
    box.fwd.run_once()
    box.a.flaky = False
    wait_for(lambda: box.fwd.run_once(), timeout=5, what="a retry")  # one delivered to the primary
    assert box.health("primary") == "up" and box.fwd.health.get("primary").failures == 0


def test_new_claims_return_to_the_primary_when_its_probe_answers(box: Box) -> None:
    box.a.down = True
    box.add("dd01")
    box.drain()
    assert box.health("primary") == "down"
    assert box.fwd.probe_due(now=FAR) == 1  # still down: probed again later, a little later
    first = box.fwd.health.get("primary")
    assert first.state == "down" and first.probes == 1
    box.a.down = False
    assert box.fwd.probe_due(now=time.time()) == 0  # not due yet: it is not hammered
    box.fwd.probe_due(now=FAR)
    assert box.health("primary") == "up"
    box.add("dd02")
    box.drain()
    assert box.went("dd02") == {"primary": "delivered"} and box.at(box.a, "dd02") == [1, 1, 1]
    assert box.went("dd01") == {"primary": "moved", "backup": "delivered"}  # not sent twice


def test_a_bundle_in_flight_on_the_backup_finishes_there_after_failback(box: Box) -> None:
    box.a.down = True
    box.add("ee01")
    box.b.slow_s = 0.4  # ~1.2 s on the backup
    box.fwd.run_once()  # fails on the primary, which goes down; the bundle is ready again
    lane = threading.Thread(target=box.fwd.run_once)
    box.threads.append(lane)
    lane.start()
    wait_for(lambda: box.b.sending, timeout=5, what="the bundle in flight on the backup")
    box.a.down = False
    box.fwd.probe_due(now=FAR)
    assert box.health("primary") == "up"
    box.add("ee02")
    box.fwd.run_once()  # a new claim, while ee01 is still in flight on the backup
    lane.join(10)
    assert box.went("ee01") == {"primary": "moved", "backup": "delivered"}
    assert box.went("ee02") == {"primary": "delivered"}
    assert box.at(box.a, "ee01") == [0, 0, 0] and box.at(box.b, "ee01") == [1, 1, 1]


def test_a_restart_keeps_the_primary_down(box: Box) -> None:
    box.a.down = True
    box.add("ff01")
    box.drain()
    down = box.fwd.health.get("primary")
    box.restart()
    assert box.fwd.health.get("primary") == down  # the same health, next probe included
    box.add("ff02")
    box.drain()
    assert box.went("ff02") == {"backup": "delivered"}  # the primary was not tried again


def test_an_instance_scoped_failure_never_marks_a_destination_down(box: Box) -> None:
    for i in range(4):
        uids = box.add(f"gg0{i}")
        box.a.script[uids[1]] = "refuse"  # the PACS refuses one instance of each bundle
    box.drain()
    assert box.health("primary") == "up" and box.fwd.health.get("primary").failures == 0
    assert [box.state(f"gg0{i}") for i in range(4)] == ["delivered"] * 4
    assert box.queue.parked_count() == 4 and box.at(box.b, "gg00") == [0, 0, 0]


def test_a_bundle_failure_never_marks_a_destination_down(box: Box) -> None:
    for i in range(4):
        box.add(f"hh0{i}")
        box.queue.path(f"hh0{i}").unlink()  # the bundle's own file is gone
    box.drain()
    assert box.health("primary") == "up" and box.fwd.health.get("primary").failures == 0
    assert [box.state(f"hh0{i}") for i in range(4)] == ["held"] * 4


def test_a_bundle_the_primary_dropped_midway_is_sent_whole_to_the_backup(box: Box) -> None:
    box.add("ii01", n=4)
    box.a.drop_after = 2  # it stores two instances, then dies on the third
    box.drain()
    assert box.at(box.a, "ii01") == [1, 1, 0, 0]
    assert box.at(box.b, "ii01") == [1, 1, 1, 1]  # the backup holds none of what A held
    assert box.state("ii01") == "delivered" and box.health("primary") == "down"
    assert box.went("ii01") == {"primary": "moved", "backup": "delivered"}


def test_when_every_destination_is_down_nothing_is_claimed_and_no_attempt_is_spent(box: Box) -> None:
    box.a.down = box.b.down = True
    box.add("jj01")
    box.drain()
    assert (box.health("primary"), box.health("backup")) == ("down", "down")
    item = box.queue.get("jj01")
    assert item.state == "deferred" and item.attempts == 1
    with box.queue.index.tx() as c:
        c.execute("UPDATE segments SET next_attempt=0")  # due, but nowhere to go
    assert box.fwd.run_once() is False
    assert box.queue.get("jj01").attempts == 1
    box.b.down = False
    box.fwd.probe_due(now=FAR)
    box.drain()
    assert box.went("jj01") == {"primary": "moved", "backup": "delivered"}


def test_a_backup_coming_up_makes_waiting_items_due_at_once(box: Box) -> None:
    box.a.down = box.b.down = True
    box.add("kk01")
    box.drain()
    assert box.queue.get("kk01").next_attempt > time.time()  # backed off
    box.b.down = False
    box.fwd.probe_due(now=FAR)
    assert box.queue.get("kk01").next_attempt <= time.time()
    box.drain()
    assert box.state("kk01") == "delivered"


def test_a_rejected_association_moves_the_bundle_to_the_backup_instead_of_holding_it(box: Box) -> None:
    box.a.reject = True
    box.add("ll01")
    box.drain()
    assert box.health("primary") == "down"
    assert box.fwd.health.get("primary").last_error == "rejected"
    assert box.went("ll01") == {"primary": "moved", "backup": "delivered"}


def test_status_shows_each_destination_with_its_last_error_class_and_next_probe(box: Box) -> None:
    box.a.down = True
    box.add("mm01")
    box.drain()
    now = time.time()
    primary, backup = box.fwd.snapshot(now)
    assert (primary["name"], primary["state"], primary["last_error"]) == ("primary", "down", "refused")
    assert primary["failures"] == 1 and 0 < primary["next_probe_in_s"] <= CFG.probe_min_s
    assert (backup["name"], backup["state"], backup["next_probe"]) == ("backup", "up", None)


class SlowProbe(FakeTransport):
    """A destination whose C-ECHO takes `delay` seconds (or hangs until released)."""

    def __init__(self, delay: float) -> None:
        super().__init__("slow", FakeDestination(), KEY)
        self.delay = delay
        self.calls = 0
        self.release = threading.Event()

    def probe(self) -> bool:
        self.calls += 1
        self.release.wait(self.delay)
        return True


def _forwarder(tmp_path: Path, t: FakeTransport) -> Forwarder:
    return Forwarder(Queue(tmp_path, open_index(tmp_path)), [t], CFG)


def test_two_lanes_probing_one_destination_at_once_share_one_probe(tmp_path: Path) -> None:
    t = SlowProbe(0.3)
    fwd = _forwarder(tmp_path, t)
    answers: list[bool] = []
    lanes = [threading.Thread(target=lambda: answers.append(fwd._probe(t, 5))) for _ in range(2)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join(10)
    assert answers == [True, True] and t.calls == 1
    fwd.queue.index.close()


def test_a_probe_that_hangs_answers_false_in_time_and_no_second_one_starts(tmp_path: Path) -> None:
    t = SlowProbe(60)
    fwd = _forwarder(tmp_path, t)
    t0 = time.monotonic()
    assert fwd._probe(t, 0.2) is False and fwd._probe(t, 0.2) is False
    assert time.monotonic() - t0 < 5 and t.calls == 1
    t.release.set()
    wait_for(lambda: not fwd._probing["slow"][0].is_alive(), timeout=5, what="the probe to end")
    assert fwd._probe(t, 5) is True and t.calls == 2
    fwd.queue.index.close()


def test_a_choke_that_is_the_third_failure_in_a_row_moves_the_bundle_not_backs_it_off(box: Box) -> None:
    """Two failures of the primary's own, then a bundle whose first instance gets no answer
    and the probe neither: the primary is down, and that bundle goes to the backup now."""
    box.a.flaky = True  # sends refused, probes answered: two failures counted, still up
    box.add("nn01")
    box.add("nn02")
    box.fwd.run_once()
    box.fwd.run_once()
    assert box.fwd.health.get("primary").failures == 2 and box.health("primary") == "up"
    box.a.flaky = False
    uids = box.add("nn03")
    box.a.script[uids[0]] = "choke"
    box.a.echo_fails = True
    box.a.choke_s = 0.2
    with box.queue.index.tx() as c:  # the two deferred ones wait; nn03 goes first
        c.execute("UPDATE segments SET next_attempt=? WHERE id IN ('nn01','nn02')", (time.time() + 600,))
    box.fwd.run_once()
    assert box.health("primary") == "down"
    assert box.state("nn03") == "ready" and box.went("nn03") == {"primary": "moved"}
    box.drain()
    assert box.went("nn03") == {"primary": "moved", "backup": "delivered"}
    assert box.at(box.b, "nn03") == [1, 1, 1]
