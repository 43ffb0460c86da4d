"""The fleet view of tests/test_fleet_peers.py against RabbitMQ's MQTT plugin (a node of
the test's own, tests/rabbitmq.py, with the shipped config/ops-center/rabbitmq files).

RabbitMQ 3.10 sends retained messages only to a subscription of the topic itself
(tests/test_ops_link_rabbitmq.py, test_a_wildcard_subscription_gets_no_retained_message):
`fleet status` sees a box's `online` only because it subscribes to the boxes of the fleet
CA's roster by name (ops/fleet.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import test_fleet_peers as base
from tests.peers import cli
from tests.rabbitmq import SERVER, RabbitBroker
from tests.test_fleet_peers import (  # noqa: F401  (pytest collects the imported tests here)
    NORTH,
    SOUTH,
    Bed,
    settled,
    test_fleet_send_while_serve_runs_leaves_the_page_connected,
    test_fleet_status_against_two_appliances_shows_both,
    test_fleet_status_exits_1_when_a_box_needs_a_person,
    test_fleet_status_while_serve_runs_leaves_the_page_connected,
    test_only_the_ops_center_certificate_gets_a_command_to_a_box,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.peers,
              pytest.mark.skipif(not SERVER.exists(), reason="no rabbitmq-server (make test-rabbitmq)")]

# The fixtures of tests/test_fleet_peers.py, here so that they take this module's make_broker.
bed, served = base.bed, base.served


@pytest.fixture(scope="module")
def make_broker() -> Callable[[Path, Path], RabbitBroker]:
    return lambda root, ca: RabbitBroker(root, ca, boxes=(NORTH, SOUTH))


def test_fleet_status_has_each_box_online_from_its_retained_message(bed: Bed) -> None:
    """`online` is published once per connection and retained: a view that starts later
    has it only from the broker's retained store, which RabbitMQ gives to the by-name
    subscription alone."""
    settled(bed)
    r = cli("fleet", "status", "--json", *bed.fleet_args())
    boxes = {b["name"]: b for b in json.loads(r.stdout)}
    assert boxes[NORTH]["online"] is True and boxes[SOUTH]["online"] is True, r.stdout
    assert boxes[SOUTH]["state_received"] is not None and boxes[SOUTH]["state_received"] <= time.time()


def test_a_revoked_box_leaves_the_fleet_view(bed: Bed, served: base.Served) -> None:
    """Last in this module: south, still connected and publishing, is revoked; the page
    running and `fleet status` leave it out (no by-name subscription, its messages ignored)."""
    settled(bed)
    base.revoked_box_leaves_the_view(bed, served, SOUTH)
