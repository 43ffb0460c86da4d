"""The telemetry tests of tests/test_ops_link.py against RabbitMQ's MQTT plugin (a node of
the test's own, tests/rabbitmq.py, with the shipped config/ops-center/rabbitmq files)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import test_ops_link as base
from tests.mosquitto import Watcher, client_cert, fleet_ca
from tests.peers import Appliance, wait_for
from tests.rabbitmq import SERVER, RabbitBroker
from tests.test_ops_link import (  # noqa: F401  (pytest collects the imported tests here)
    BOX,
    Fleet,
    test_a_frozen_box_goes_offline_within_one_and_a_half_keepalives,
    test_a_revoked_box_is_refused_by_the_broker,
    test_a_stuck_stage_shows_in_state_within_two_heartbeats,
    test_broker_away_loses_no_event_and_sends_each_once,
    test_clean_stop_publishes_offline_itself,
    test_conn_seq_grows_across_restarts,
    test_destination_down_arrives_as_an_event_with_a_sequence,
    test_kill9_flips_online_false_through_the_will,
    test_no_patient_data_in_any_topic,
    test_online_arrives_with_conn_seq,
    test_replay_sends_the_kept_events_again_with_their_own_numbers,
    test_state_carries_the_supervisors_view_within_8kb,
    test_status_shows_the_ops_link_connected,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.peers,
              pytest.mark.skipif(not SERVER.exists(), reason="no rabbitmq-server (make test-rabbitmq)")]

# The fixtures of tests/test_ops_link.py, here so that they take this module's make_broker.
fleet, box = base.fleet, base.box

# Every certificate CN the tests use: RabbitMQ needs a user (fleet-definitions) for each.
BOXES = ("mobile-ct-07", "killed-box", "frozen-box", "stopped-box", "restarted-box", "other-box",
         "stuck-box", "lab-box", "revoked-box", "good-box", "reader-box", "writer-box", "taker-box")


@pytest.fixture(scope="module")
def make_broker() -> Callable[[Path, Path], RabbitBroker]:
    return lambda root, ca: RabbitBroker(root, ca, boxes=BOXES)


@pytest.fixture(scope="module")
def keepalives_to_offline() -> float:
    """RabbitMQ 3.10 lets a silent client go longer than 1.5 keepalives: a frozen box went
    offline 15 s after it froze at keepalive 5 s (3 keepalives; Mosquitto ~7.5 s)."""
    return 3


@pytest.fixture(scope="module")
def late_center_topics() -> tuple[str, ...]:
    """RabbitMQ 3.10 sends a retained message only to a subscription without wildcards
    (test_a_wildcard_subscription_gets_no_retained_message): the center subscribes to
    the box's online by name too."""
    return ("appliance/#", "appliance/lab-box/online")


# Where RabbitMQ differs from Mosquitto (docs/operations.md, "A clustered broker"): the
# ACL test of tests/test_ops_link.py in three parts, each asserting what RabbitMQ does.

def refusals(broker: RabbitBroker, user: str) -> list[str]:
    return [line for line in broker.log_text().splitlines()
            if "access_refused" in line or "refused for user" in line if f"user '{user}'" in line]


def test_a_box_cannot_read_another_box_its_connection_is_closed(fleet: Fleet, box: Appliance) -> None:
    """RabbitMQ answers a subscription its topic permissions refuse by closing the
    connection (Mosquitto grants nothing, SUBACK 0x80, and keeps it)."""
    wait_for(lambda: fleet.center.last(f"appliance/{BOX}/state"), 30, "victim's state")
    cert, key = client_cert(fleet.ca, "reader-box", fleet.root)
    intruder = Watcher(fleet.broker, cert, key, client_id="reader-box", topics=(f"appliance/{BOX}/#",))
    try:
        broker = fleet.broker
        assert isinstance(broker, RabbitBroker)
        wait_for(lambda: [r for r in refusals(broker, "reader-box") if f"appliance.{BOX}.#" in r],
                 20, "the subscription refused")
        n = len(fleet.center.on(f"appliance/{BOX}/state"))
        wait_for(lambda: len(fleet.center.on(f"appliance/{BOX}/state")) >= n + 2, 20,
                 "the victim publishing on")
        assert intruder.messages == []  # not even the retained state and online
    finally:
        intruder.close()


def test_a_box_cannot_write_another_box_its_connection_is_closed(fleet: Fleet, box: Appliance) -> None:
    """A publish the topic permissions refuse closes the connection (Mosquitto drops the
    message silently); nothing forged arrives, and the retained state stays the box's own."""
    wait_for(lambda: fleet.center.last(f"appliance/{BOX}/state"), 30, "victim's state")
    cert, key = client_cert(fleet.ca, "writer-box", fleet.root)
    intruder = Watcher(fleet.broker, cert, key, client_id="writer-box", topics=("appliance/writer-box/#",))
    try:
        broker = fleet.broker
        assert isinstance(broker, RabbitBroker)
        intruder.c.publish(f"appliance/{BOX}/state", b'{"forged": true}', qos=1, retain=True)
        wait_for(lambda: [r for r in refusals(broker, "writer-box") if f"appliance.{BOX}.state" in r],
                 20, "the publish refused")
        intruder.close()
        n = len(fleet.center.on(f"appliance/{BOX}/state"))
        wait_for(lambda: len(fleet.center.on(f"appliance/{BOX}/state")) >= n + 1, 20,
                 "the victim publishing on")
        assert not [m for m in fleet.center.messages if b"forged" in m.payload]
    finally:
        intruder.close()


def test_a_box_asking_for_another_box_client_id_is_refused_but_knocks_it_off(fleet: Fleet,
                                                                            box: Appliance) -> None:
    """RabbitMQ 3.10 cannot tie the client id to the certificate's CN (Mosquitto's
    use_username_as_clientid). A box connecting with another box's client id is refused
    its session (fleet-definitions gives each user only its own session queues), but the
    broker has already disconnected the holder of that id, as MQTT 3.1.1 says, without its
    will: the victim reconnects (a new conn_seq) within a second, each time the intruder
    tries."""
    online = f"appliance/{BOX}/online"
    first = wait_for(lambda: (m := fleet.center.last(online)) and m["online"] and m, 30, "victim online")
    cert, key = client_cert(fleet.ca, "taker-box", fleet.root)
    with pytest.raises(AssertionError, match="watcher connected"):
        Watcher(fleet.broker, cert, key, client_id=BOX, topics=("appliance/taker-box/#",), persistent=False,
                connect_timeout=5)
    broker = fleet.broker
    assert isinstance(broker, RabbitBroker)
    assert [r for r in refusals(broker, "taker-box") if f"mqtt-subscription-{BOX}qos1" in r]
    back = wait_for(lambda: (m := fleet.center.last(online)) and m["online"] and
                    m["conn_seq"] > first["conn_seq"] and m, 60, "the victim reconnected",
                    detail=box.log_text)
    assert back["boot_id"] == first["boot_id"]  # the link reconnected; the daemon did not restart
    # Knocked off by the broker, the victim's will is not published: no online false.
    assert [m for m in fleet.center.on(online) if not m.json()["online"]] == []
    assert box.status()["ops"]["connected"] is True


def test_a_box_cannot_resume_the_operations_centers_session(tmp_path: Path, make_broker: Any) -> None:
    """The operations center's session queue holds every box's telemetry while it is away.
    A box connecting with the client id `ops-center` and clean_session false would resume
    it; the per-user queue permissions of fleet-definitions refuse that."""
    ca = fleet_ca(tmp_path / "ca")
    broker = make_broker(tmp_path / "broker", ca).start()
    try:
        center = Watcher(broker, ca / "ops-center.pem", ca / "ops-center.key", client_id="ops-center")
        center.close()  # away: its queue stays, bound to appliance/#
        cert, key = client_cert(ca, "lab-box", tmp_path)
        lab = Watcher(broker, cert, key, client_id="lab-box", topics=("appliance/lab-box/#",))
        lab.c.publish("appliance/lab-box/events", b'{"kind": "queued"}', qos=1).wait_for_publish(10)
        lab.close()
        thief_cert, thief_key = client_cert(ca, "other-box", tmp_path)
        thief: Watcher | None = None
        with contextlib.suppress(AssertionError):  # refused at CONNECT or right after it
            thief = Watcher(broker, thief_cert, thief_key, client_id="ops-center", topics=(),
                            connect_timeout=10)
        try:
            wait_for(lambda: [r for r in refusals(broker, "other-box")
                              if "mqtt-subscription-ops-centerqos1" in r],
                     20, "the center's queue refused to other-box", detail=broker.log_text)
            assert thief is None or thief.messages == []
        finally:
            if thief is not None:
                thief.close()
        center = Watcher(broker, ca / "ops-center.pem", ca / "ops-center.key", client_id="ops-center")
        try:
            got = wait_for(lambda: center.on("appliance/lab-box/events"), 20, "the queued event, still there")
            assert got[0].json() == {"kind": "queued"}
        finally:
            center.close()
    finally:
        broker.stop()


def test_a_wildcard_subscription_gets_no_retained_message(fleet: Fleet, box: Appliance) -> None:
    """RabbitMQ 3.10 keeps retained messages, but sends them only to a subscription of the
    topic itself; Mosquitto sends them to every matching subscription."""
    wait_for(lambda: fleet.center.last(f"appliance/{BOX}/online"), 30, "victim online")
    cert, key = client_cert(fleet.ca, "reader-box", fleet.root)
    own = "appliance/reader-box/online"
    setter = Watcher(fleet.broker, cert, key, client_id="reader-box", topics=(), persistent=False)
    setter.c.publish(own, b'{"online": true}', qos=1, retain=True).wait_for_publish(10)
    setter.close()
    wildcard = Watcher(fleet.broker, cert, key, client_id="reader-box", topics=("appliance/reader-box/#",),
                       persistent=False)
    try:
        n = len(fleet.center.on(f"appliance/{BOX}/state"))
        wait_for(lambda: len(fleet.center.on(f"appliance/{BOX}/state")) >= n + 2, 20, "two more states")
        assert wildcard.messages == []
    finally:
        wildcard.close()
    exact = Watcher(fleet.broker, cert, key, client_id="reader-box", topics=(own,), persistent=False)
    try:
        got = wait_for(lambda: exact.on(own), 20, "the retained online on its own topic")
        assert got[0].retain
    finally:
        exact.close()
