"""The forwarder's send rate per destination (`Forwarder.link`), what the packer's codec
choice asks with (pack/pace.py): whole deliveries only, of the first destination up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_forward_failover import Box


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path)
    yield b
    b.queue.index.close()


def test_no_rate_is_known_before_a_delivery(box: Box) -> None:
    assert box.fwd.link() == ("primary", None)


def test_a_delivery_gives_the_destination_a_rate_of_its_bytes_over_its_time(box: Box) -> None:
    box.a.slow_s = 0.2  # per instance: 3 instances take at least 0.6 s
    box.add("aa01")
    box.drain()
    name, rate = box.fwd.link()
    assert name == "primary" and rate is not None
    assert 0 < rate <= box.queue.get("aa01").bundle_bytes / 0.6


def test_a_failed_send_gives_no_rate(box: Box) -> None:
    box.a.flaky = True
    box.add("bb01")
    box.fwd.run_once()
    assert box.state("bb01") == "deferred"
    assert box.fwd.link() == ("primary", None)


def test_the_link_is_the_first_destination_up(box: Box) -> None:
    box.a.down = True
    box.add("cc01")
    box.drain()  # the primary fails, does not answer its probe: down; the backup takes it
    name, rate = box.fwd.link()
    assert name == "backup" and rate is not None and rate > 0


def test_the_link_is_never_a_copy_destination(tmp_path: Path) -> None:
    """An archive listed first as a copy is not where the packer's bundles must go fast."""
    from appliance.forward.scheduler import Forwarder
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue
    from tests.fake_transport import FakeDestination, FakeTransport
    from tests.test_forward_failover import CFG
    from tests.test_transport_contract import KEY

    q = Queue(tmp_path, open_index(tmp_path))
    try:
        fwd = Forwarder(q, [FakeTransport("archive", FakeDestination(), KEY),
                            FakeTransport("center", FakeDestination(), KEY)], CFG,
                        copies=["archive"])
        assert fwd.link() == ("center", None)
    finally:
        q.index.close()
