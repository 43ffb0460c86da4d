"""Copy destinations (`mode = "copy"`) and per-rule destinations (`[[rules]] destinations`).

The config checks, the state table's part (items born per kind, a bundle's overall state),
the queue (copy items, routes, claims by route) and the scheduler with fake destinations
(tests/fake_transport.py): the failover chain and a copy never wait on each other, a rule
routes a study to its destinations only, and a restart keeps the route. The daemon with
real peers: tests/test_routing_peers.py.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core import config
from appliance.core.config import Queue as QueueConfig
from appliance.core.errors import ConfigError, StateError
from appliance.forward import failover
from appliance.forward.scheduler import Forwarder
from appliance.queue import index as db
from appliance.queue import routes
from appliance.queue import state as machine
from appliance.queue import store as queue_store
from appliance.queue.index import open_index
from appliance.queue.routes import copy_id
from appliance.queue.store import Queue
from tests.fake_transport import FakeDestination, FakeTransport
from tests.test_transport_contract import KEY, make_bundle

# --- config ------------------------------------------------------------------------------

A = {"name": "center-a", "transport": "directory", "path": "/srv/a"}
B = {"name": "center-b", "transport": "directory", "path": "/srv/b"}
ARCHIVE = {"name": "archive", "transport": "directory", "path": "/srv/archive", "mode": "copy"}


def _parse(dests: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> config.Config:
    return config.parse({"receive": {"accept_any_caller": True}, "destinations": dests,
                         "rules": rules or []}, {}, Path("/etc/a.toml"))


def _problems(dests: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        _parse(dests, rules)
    return e.value.problems


def test_a_destination_is_failover_unless_it_says_copy() -> None:
    cfg = _parse([A, B, ARCHIVE])
    assert [d.mode for d in cfg.destinations] == ["failover", "failover", "copy"]


def test_an_unknown_mode_is_refused_naming_the_key() -> None:
    ps = _problems([A, {**B, "mode": "mirror"}])
    assert any("destinations[1].mode: must be one of failover, copy" in p for p in ps), ps


def test_copies_alone_are_refused() -> None:
    ps = _problems([ARCHIVE])
    assert any('destinations: every entry is mode = "copy"' in p for p in ps), ps


def test_a_rule_takes_the_destinations_it_names() -> None:
    cfg = _parse([A, B, ARCHIVE], [{"name": "b", "priority": "routine",
                                     "destinations": ["center-b", "archive"]}])
    assert cfg.rules[0].destinations == ("center-b", "archive")


def test_a_rule_naming_an_unknown_destination_is_refused() -> None:
    ps = _problems([A, B], [{"name": "b", "priority": "routine", "destinations": ["center-c"]}])
    assert ps == ["/etc/a.toml: rules[0].destinations: names no [[destinations]] entry: 'center-c'"
                  " (known: center-a, center-b)"]


def test_a_rule_naming_only_copies_is_refused() -> None:
    ps = _problems([A, ARCHIVE], [{"name": "x", "priority": "routine", "destinations": ["archive"]}])
    assert any('rules[0].destinations: names only mode = "copy"' in p for p in ps), ps


@pytest.mark.parametrize(("value", "problem"), [
    ([], "must be a non-empty array of destination names"),
    ("center-a", "must be a non-empty array of destination names"),
    (["center-a", "center-a"], "names a destination twice"),
])
def test_a_bad_destinations_list_is_refused(value: Any, problem: str) -> None:
    ps = _problems([A, B], [{"name": "x", "priority": "routine", "destinations": value}])
    assert any(f"rules[0].destinations: {problem}" in p for p in ps), ps


# --- the queue: copy items and routes ----------------------------------------------------


def _ready(q: Queue, item_id: str, n: int = 2, route: str | None = None, first: int = 0) -> list[str]:
    _, uids = make_bundle(q.path(item_id), n, first=first)
    now = time.time()
    with q.index.tx() as c:
        c.execute("INSERT INTO segments(id, study_key, state, priority, created, updated, instances,"
                  " bytes, bundle_bytes, route) VALUES (?,?,'ready',0,?,?,?,0,?,?)",
                  (item_id, "k" * 16, now, now, n, q.path(item_id).stat().st_size, route))
    return uids


def test_each_bundle_gets_one_copy_per_copy_destination_once(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1")
    assert q.make_copies(["archive", "vault"], time.time()) == 2
    assert q.make_copies(["archive", "vault"], time.time()) == 0
    copies = q.copies_of("b1")
    assert sorted(c.copy_to or "" for c in copies) == ["archive", "vault"]
    assert {c.state for c in copies} == {machine.BORN["copy"]}
    assert all(c.parent == "b1" and c.bundle_id == "b1" and c.is_copy for c in copies)


def test_a_routed_bundle_is_copied_only_where_its_rule_says(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1", route=",center-b,archive,")
    q.make_copies(["archive", "vault"], time.time())
    assert [c.copy_to for c in q.copies_of("b1")] == ["archive"]


def test_a_claim_goes_to_the_first_failover_destination_the_route_allows(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1", route=",center-b,")
    assert q.claim_next(time.time(), ["center-a"]) is None  # not routed there: stays
    item = q.claim_next(time.time(), ["center-a", "center-b"])
    assert item is not None and item.id == "b1" and item.destination == "center-b"


def test_a_copy_is_claimed_only_for_its_destination_while_it_is_up(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1")
    q.make_copies(["archive"], time.time())
    first = q.claim_next(time.time(), ["center-a"])  # the chain takes the bundle, not the copy
    assert first is not None and first.id == "b1"
    assert q.claim_next(time.time(), ["center-a"]) is None
    copy = q.claim_next(time.time(), [], copies=["archive"])
    assert copy is not None and copy.id == copy_id("b1", "archive") and copy.destination == "archive"


def test_the_bundle_file_stays_until_the_bundle_and_its_copies_are_gone(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1")
    q.make_copies(["archive"], time.time())
    b = q.claim_next(time.time(), ["center-a"])
    assert b is not None
    q.delivered("b1", time.time())
    assert q.expire_delivered(0, time.time() + 10) == 0  # the copy still needs the file
    assert q.path("b1").exists()
    c = q.claim_next(time.time(), [], copies=["archive"])
    assert c is not None
    q.delivered(c.id, time.time())
    q.expire_delivered(0, time.time() + 10)  # the copy goes
    q.expire_delivered(0, time.time() + 10)  # then the bundle, and its file
    assert not q.path("b1").exists()
    assert q.list() == []


def test_an_instance_parked_from_a_copy_is_parked_for_that_copy_only(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1", n=3)
    q.make_copies(["archive"], time.time())
    cid = copy_id("b1", "archive")
    child = q.park(cid, 1, "refused", time.time())
    assert q.instances_of("b1", "archive", exact=True) == {1: ("parked", 0)}
    assert q.instances_of("b1", "center-a") == {}  # the chain still sends it
    parked = q.get(child)
    assert (parked.parent, parked.only_index, parked.copy_to) == ("b1", 1, "archive")


def test_a_route_set_by_a_rule_reaches_the_studys_later_segments(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    with q.index.tx() as c:
        queue_store.open_segment(c, "s1", "k" * 16, time.time())
        routes.set_route(c, "k" * 16, ("center-b",))
        queue_store.transition(c, "s1", "seal", time.time())
        queue_store.open_segment(c, "s2", "k" * 16, time.time())
    assert q.get("s1").route == q.get("s2").route == ("center-b",)


def test_the_first_route_a_study_gets_stays(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    with q.index.tx() as c:
        queue_store.open_segment(c, "s1", "k" * 16, time.time())
        routes.set_route(c, "k" * 16, ("center-b",))
        assert routes.set_route(c, "k" * 16, ("center-a",)) == 0
    assert q.get("s1").route == ("center-b",)


def test_deleting_a_bundle_whose_copy_is_in_flight_is_refused(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1")
    q.make_copies(["archive"], time.time())
    assert q.claim_next(time.time(), [], copies=["archive"]) is not None
    with pytest.raises(StateError, match="is active"):
        q.delete("b1")
    assert q.get("b1").state == "ready" and q.path("b1").exists()


def test_after_the_upgrade_only_bundles_still_waiting_are_copied(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "queue.db")
    for script in db._SCHEMA[:5]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=5")
    for item_id, state in (("old1", "delivered"), ("old2", "failed"), ("new1", "ready")):
        conn.execute("INSERT INTO segments(id, study_key, state, created, updated, bundle_bytes)"
                     " VALUES (?,?,?,1,2,10)", (item_id, "k" * 16, state))
    conn.commit()
    conn.close()
    q = Queue(tmp_path, open_index(tmp_path))
    assert q.get("new1").route is None and q.get("new1").copy_to is None
    assert q.make_copies(["archive"], time.time()) == 1
    assert [c.parent for c in q.list() if c.is_copy] == ["new1"]


def test_an_item_routed_only_to_a_destination_no_longer_configured_goes_everywhere(
        tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "gone", route=",center-c,")
    _ready(q, "kept", route=",center-b,center-c,")
    assert q.settle_routes(["center-a", "center-b"], []) == {"rerouted": 1, "copies_dropped": 0}
    assert q.get("gone").route is None and q.get("kept").route == ("center-b", "center-c")


def test_a_copy_for_a_copy_destination_no_longer_configured_is_dropped(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    _ready(q, "b1")
    q.make_copies(["archive", "vault"], time.time())
    assert q.settle_routes(["center-a"], ["archive"]) == {"rerouted": 0, "copies_dropped": 1}
    assert [c.copy_to for c in q.copies_of("b1")] == ["archive"]
    assert q.path("b1").exists()


def test_nothing_is_claimable_when_nowhere_is_up() -> None:
    assert routes.claimable([], []) == (None, [])
    assert routes.names(routes.text(("center-b", "archive"))) == ("center-b", "archive")
    assert routes.names(None) is None


def test_failover_chain_is_the_routes_failover_destinations_in_config_order() -> None:
    assert failover.chain(["a", "b", "c"], None) == ["a", "b", "c"]
    assert failover.chain(["a", "b", "c"], ("c", "archive", "a")) == ["a", "c"]


# --- the scheduler: a chain of two and a copy, fake destinations ---------------------------

CFG = QueueConfig(retry_min_s=0.2, retry_max_s=1.0, down_after=3, probe_min_s=5, probe_max_s=60)


class Box:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.a, self.b, self.archive = FakeDestination(), FakeDestination(), FakeDestination()
        self.uids: dict[str, list[str]] = {}
        self.slices = 0
        self.open()

    def open(self) -> None:
        self.queue = Queue(self.root, open_index(self.root))
        self.fwd = Forwarder(self.queue, [FakeTransport("center-a", self.a, KEY),
                                          FakeTransport("center-b", self.b, KEY),
                                          FakeTransport("archive", self.archive, KEY)],
                             CFG, budget_base_s=60, copies=["archive"])

    def restart(self) -> None:
        self.queue.index.close()
        self.open()

    def add(self, item_id: str, route: str | None = None) -> None:
        self.uids[item_id] = _ready(self.queue, item_id, 2, route, first=self.slices % 25)
        self.slices += 2

    def drain(self, limit: int = 30, **kw: Any) -> None:
        for _ in range(limit):
            if not self.fwd.run_once(**kw):
                return
        raise AssertionError("the queue did not settle")

    def at(self, dest: FakeDestination, item_id: str) -> list[int]:
        return [dest.stored[u] for u in self.uids[item_id]]

    def state(self, item_id: str) -> str:
        return self.queue.get(item_id).state


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    for d in (b.a, b.b, b.archive):
        d.unchoke.set()
    b.fwd.close()
    b.queue.index.close()


def test_every_bundle_reaches_the_primary_and_the_copy_once(box: Box) -> None:
    box.add("b1")
    box.drain()
    assert box.at(box.a, "b1") == [1, 1] and box.at(box.archive, "b1") == [1, 1]
    assert box.at(box.b, "b1") == [0, 0]
    assert box.state("b1") == "delivered" and box.state(copy_id("b1", "archive")) == "delivered"


def test_failover_to_b_still_works_with_a_copy_destination(box: Box) -> None:
    box.a.down = True
    box.add("b1")
    box.drain()
    assert box.at(box.b, "b1") == [1, 1] and box.at(box.archive, "b1") == [1, 1]
    assert box.fwd.health.get("center-a").state == "down"
    assert box.state("b1") == "delivered"


def test_a_copy_destination_down_does_not_delay_the_primary(box: Box) -> None:
    box.archive.down = True
    box.add("b1")
    box.add("b2")
    box.drain()
    assert box.state("b1") == box.state("b2") == "delivered"
    assert box.at(box.a, "b1") == [1, 1] and box.at(box.a, "b2") == [1, 1]
    copies = [box.queue.get(copy_id(i, "archive")) for i in ("b1", "b2")]
    assert {c.state for c in copies} <= {"deferred", "ready"}  # waiting for the archive alone
    assert box.queue.get("b1").state == "delivered" and box.queue.path("b1").exists()


def test_a_copy_destination_down_does_not_move_the_copy_to_the_chain(box: Box) -> None:
    box.archive.down = True
    box.add("b1")
    box.drain()
    went = {str(d["destination"]) for d in box.queue.deliveries(copy_id("b1", "archive"))}
    assert went == {"archive"}
    assert box.at(box.b, "b1") == [0, 0]


def test_the_primary_down_does_not_delay_the_copy(box: Box) -> None:
    box.a.down = box.b.down = True
    box.add("b1")
    box.drain()
    assert box.at(box.archive, "b1") == [1, 1]
    assert box.state(copy_id("b1", "archive")) == "delivered"
    assert box.state("b1") in ("deferred", "ready")


def test_a_copy_comes_through_once_its_destination_is_back(box: Box) -> None:
    box.archive.down = True
    box.add("b1")
    box.drain()
    box.archive.down = False
    box.fwd.probe_due(now=1e12)  # the prober finds it answering again
    box.drain()
    assert box.at(box.archive, "b1") == [1, 1]
    assert box.state(copy_id("b1", "archive")) == "delivered"


def test_the_chain_lanes_never_take_a_copy(box: Box) -> None:
    box.add("b1")
    box.drain(copies=False)
    assert box.state("b1") == "delivered" and box.at(box.archive, "b1") == [0, 0]
    box.drain(only="archive")
    assert box.at(box.archive, "b1") == [1, 1]


def test_a_rule_routes_a_study_to_b_only(box: Box) -> None:
    box.add("b1", route=",center-b,")
    box.drain()
    assert box.at(box.b, "b1") == [1, 1]
    assert box.at(box.a, "b1") == [0, 0] and box.at(box.archive, "b1") == [0, 0]


def test_a_routed_study_waits_for_its_own_destination_not_another(box: Box) -> None:
    box.b.down = True
    box.add("b1", route=",center-b,")
    box.drain()
    assert box.at(box.a, "b1") == [0, 0]
    assert box.state("b1") in ("deferred", "ready")


def test_a_restart_keeps_the_route(box: Box) -> None:
    box.b.down = True
    box.add("b1", route=",center-b,archive,")
    box.drain()
    box.restart()
    box.b.down = False
    box.fwd.probe_due(now=1e12)
    box.drain()
    assert box.at(box.b, "b1") == [1, 1] and box.at(box.archive, "b1") == [1, 1]
    assert box.at(box.a, "b1") == [0, 0]


def test_status_says_which_destination_is_a_copy(box: Box) -> None:
    modes = {d["name"]: d["mode"] for d in box.fwd.snapshot(time.time())}
    assert modes == {"center-a": "failover", "center-b": "failover", "archive": "copy"}
