"""What the packer packs while a scanner sends a burst (`pack.during_burst`): by default
a study's first segment, and any segment when nothing packed waits for the link."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core import crypto
from appliance.core.config import Pack
from appliance.pack.packer import Packer
from appliance.pack.policy import Burst, may_pack_now
from appliance.pack.pool import CodecPool
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.spool.store import InstanceMeta, Spool

CFG = Pack(segment_max_age_s=10, during_burst="link-waits")


def test_link_waits_packs_a_first_segment_during_a_burst() -> None:
    assert may_pack_now(100, True, CFG, 101, burst=Burst(first=True))


def test_link_waits_packs_any_segment_when_nothing_waits_for_the_link() -> None:
    assert may_pack_now(100, True, CFG, 101, burst=Burst(link_waits=True))


def test_link_waits_holds_a_later_segment_while_a_bundle_waits_for_the_link() -> None:
    assert not may_pack_now(100, True, CFG, 101, burst=Burst())


def test_never_holds_even_a_first_segment_during_a_burst() -> None:
    cfg = Pack(segment_max_age_s=10, during_burst="never")
    assert not may_pack_now(100, True, cfg, 101, burst=Burst(first=True, link_waits=True))
    assert may_pack_now(100, True, cfg, 110, burst=Burst())  # but not past the segment age


def test_first_packs_only_a_first_segment_during_a_burst() -> None:
    cfg = Pack(segment_max_age_s=10, during_burst="first")
    assert may_pack_now(100, True, cfg, 101, burst=Burst(first=True))
    assert not may_pack_now(100, True, cfg, 101, burst=Burst(link_waits=True))


def test_always_packs_during_a_burst() -> None:
    assert may_pack_now(100, True, Pack(during_burst="always"), 101, burst=Burst())


def test_no_burst_packs_whatever_the_policy() -> None:
    for policy in ("link-waits", "first", "never", "always"):
        assert may_pack_now(100, False, Pack(during_burst=policy), 100, burst=Burst())


@pytest.fixture
def pool() -> Iterator[CodecPool]:
    p = CodecPool(workers=1)
    yield p
    p.close()


class _Box:
    """A spool of one study cut into a sealed first segment (4) and a sealed second (10)."""

    def __init__(self, root: Path, pool: CodecPool, policy: str) -> None:
        key = crypto.create_spool_key(root / "spool.key")
        index = open_index(root)
        self.spool = Spool(root, key, index, 0, segment_max_instances=10, first_segment_instances=4)
        self.queue = Queue(root, index)
        for i in range(15):  # the 15th seals the second segment
            self.spool.store([b"x%d" % i], InstanceMeta("1.2.3", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2",
                                                        "1.2.840.10008.1.2.1", "CT"))
        rows = index.query("SELECT id FROM segments WHERE state='sealed' ORDER BY created")
        self.first, self.second = (r["id"] for r in rows)
        self.packer = Packer(Pack(segment_max_age_s=3600, during_burst=policy), self.spool,
                             self.queue, [], pool, receiving_burst=lambda: True)

    def set_state(self, seg: str, state: str) -> None:
        with self.spool.index.tx() as c:
            c.execute("UPDATE segments SET state=?, updated=? WHERE id=?", (state, time.time(), seg))


def test_packer_takes_the_first_segment_during_a_burst_even_with_a_bundle_waiting(
        tmp_path: Path, pool: CodecPool) -> None:
    box = _Box(tmp_path, pool, "link-waits")
    box.set_state(box.second, "ready")  # the link has work, yet the study's first goes
    assert box.packer._next_sealed() == box.first


def test_packer_holds_a_later_segment_while_a_bundle_is_ready(tmp_path: Path, pool: CodecPool) -> None:
    box = _Box(tmp_path, pool, "link-waits")
    box.set_state(box.first, "ready")
    assert box.packer._next_sealed() is None


def test_packer_takes_a_later_segment_once_the_last_bundle_is_on_the_link(
        tmp_path: Path, pool: CodecPool) -> None:
    box = _Box(tmp_path, pool, "link-waits")
    box.set_state(box.first, "active")  # being sent: nothing ready behind it
    assert box.packer._next_sealed() == box.second


def test_packer_with_never_takes_nothing_during_a_burst(tmp_path: Path, pool: CodecPool) -> None:
    box = _Box(tmp_path, pool, "never")
    assert box.packer._next_sealed() is None


def test_packer_with_first_takes_only_the_first_segment_during_a_burst(
        tmp_path: Path, pool: CodecPool) -> None:
    box = _Box(tmp_path, pool, "first")
    assert box.packer._next_sealed() == box.first
    box.set_state(box.first, "active")  # the link is idle behind it: still not the second
    assert box.packer._next_sealed() is None


def test_the_default_packs_nothing_during_a_burst() -> None:
    """The default keeps receiving at its speed (docs/benchmarks.md, "Keeping a thin link
    full": "first" cost one scanner 13-20 % of its rate, "link-waits" four half)."""
    assert Pack().during_burst == "never"
    assert not may_pack_now(100, True, Pack(), 101, burst=Burst(first=True, link_waits=True))
