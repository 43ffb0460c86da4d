"""The fleet model (ops/fleet.py), its alarms table and its page and series
(ops/fleetweb.py), fed messages as the broker would deliver them (no broker here:
tests/test_fleet_peers.py runs it against a real Mosquitto and real boxes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.core.errors import KeyFileError
from appliance.ops import fleet as fl
from appliance.ops.fleetweb import FleetApp
from tests.peers import REPO

NOW = 1_800_000_000.0


def state(name: str = "ct-1", **over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "v": 1, "name": name, "ts": NOW - 1, "seq": 3, "boot_id": "b", "conn_seq": 2, "version": "1.0",
        "stages": {"receive": {"state": "idle"}, "forward": {"state": "busy"}},
        "queue": {"items": {"queued": 2}, "oldest_unsent_ts": None, "parked": 0},
        "destinations": [{"name": "pacs", "up": True, "since": None, "last_error": None, "failures": 0}],
        "disk": {"free_bytes": 50 * 2**30, "reserve_bytes": 2 * 2**30},
        "certs": {"mqtt": NOW + 365 * 86400}, "events": {"waiting": 0, "dropped": 0, "last_seq": 4}}
    msg.update(over)
    return msg


def fed(*msgs: tuple[str, dict[str, Any]], at: float = NOW) -> fl.Fleet:
    f = fl.Fleet(heartbeat_s=15)
    for topic, msg in msgs:
        assert f.receive(topic, json.dumps(msg).encode(), at)
    return f


def healthy(name: str = "ct-1", **over: Any) -> fl.Fleet:
    return fed((f"appliance/{name}/online", {"v": 1, "online": True, "conn_seq": 2, "boot_id": "b"}),
               (f"appliance/{name}/state", state(name, **over)))


def test_a_healthy_box_raises_no_alarm() -> None:
    assert healthy().view(NOW)[0]["alarms"] == []


@pytest.mark.parametrize(("over", "alarm"), [
    ({"stages": {"pack": {"state": "stuck"}}}, "stage stuck"),
    ({"stages": {"pack": {"state": "dead"}}}, "stage stuck"),
    ({"destinations": [{"name": "pacs", "up": False}]}, "destination down"),
    ({"queue": {"items": {}, "oldest_unsent_ts": NOW - 31 * 60}}, "oldest unsent"),
    ({"disk": {"free_bytes": 2 * 2**30, "reserve_bytes": 2 * 2**30}}, "disk near reserve"),
    ({"certs": {"mqtt": NOW + 13 * 86400}}, "certificate expiring"),
    ({"events": {"dropped": 3}}, "events dropped"),
])
def test_each_alarm_of_the_table_is_raised_by_its_condition(over: dict[str, Any], alarm: str) -> None:
    assert healthy(**over).view(NOW)[0]["alarms"] == [alarm]


def test_a_destination_an_operator_switched_off_is_not_down_and_has_no_up_series() -> None:
    f = healthy(destinations=[{"name": "pacs", "up": False, "off": True}])
    assert f.view(NOW)[0]["alarms"] == []
    assert "fleet_box_destination_up{" not in scrape(f)[1]
    assert "pacs off (by an operator)" in scrape(f, "/")[1]


def test_a_paused_queue_shows_on_the_page_without_an_alarm() -> None:
    f = healthy(queue={"items": {"queued": 2}, "oldest_unsent_ts": None, "parked": 0, "paused": True})
    assert f.view(NOW)[0]["alarms"] == [] and "PAUSED" in scrape(f, "/")[1]


def test_the_alarms_stay_quiet_below_their_thresholds() -> None:
    f = healthy(queue={"items": {}, "oldest_unsent_ts": NOW - 29 * 60},
                disk={"free_bytes": 3 * 2**30, "reserve_bytes": 2 * 2**30}, certs={"mqtt": NOW + 15 * 86400})
    assert f.view(NOW)[0]["alarms"] == []


def test_a_box_without_a_state_for_three_heartbeats_is_silent_and_last_known() -> None:
    v = healthy().view(NOW + 46)[0]
    assert v["alarms"] == ["silent"] and v["live"] is False
    assert healthy().view(NOW + 44)[0]["live"] is True


def test_the_will_makes_a_box_offline_and_its_values_last_known() -> None:
    f = healthy()
    f.receive("appliance/ct-1/online", b'{"v":1,"online":false,"conn_seq":2,"boot_id":"b"}', NOW + 1)
    v = f.view(NOW + 2)[0]
    assert v["alarms"] == ["offline"] and v["live"] is False and v["queue"] == {"queued": 2}


def test_a_late_will_of_an_older_connection_is_ignored() -> None:
    f = healthy()
    f.receive("appliance/ct-1/online", b'{"v":1,"online":false,"conn_seq":1,"boot_id":"b"}', NOW + 1)
    assert f.view(NOW + 2)[0]["online"] is True


def test_events_sent_again_after_a_reconnect_are_kept_once() -> None:
    f = healthy()
    for seq in (1, 2, 1, 2, 3):
        f.receive("appliance/ct-1/events", json.dumps({"event_seq": seq, "kind": "destination.down",
                                                        "dropped": 0}).encode(), NOW)
    box = f.box("ct-1", NOW)
    assert box is not None and [e["event_seq"] for e in box["events"]] == [1, 2, 3]


def test_an_outbox_made_anew_on_the_box_restarts_its_event_numbers() -> None:
    f = healthy()
    f.receive("appliance/ct-1/events", b'{"event_seq": 40, "kind": "bundle.held"}', NOW)
    f.receive("appliance/ct-1/state", json.dumps(state(events={"dropped": 0, "last_seq": 1})).encode(), NOW)
    f.receive("appliance/ct-1/events", b'{"event_seq": 2, "kind": "bundle.held"}', NOW)
    box = f.box("ct-1", NOW)
    assert box is not None and [e["event_seq"] for e in box["events"]] == [40, 2]


def test_an_event_keeps_only_the_schemas_fields_and_short_strings() -> None:
    f = healthy()
    ev = {"event_seq": 1, "kind": "destination.down", "x": "y", "destination": "d" * 500,
          "stages": list(range(99))}
    f.receive("appliance/ct-1/events", json.dumps(ev).encode(), NOW)
    box = f.box("ct-1", NOW)
    assert box is not None
    ev = box["events"][0]
    assert "x" not in ev and len(ev["destination"]) == fl.TEXT_MAX and len(ev["stages"]) == fl.LABELS_MAX


@pytest.mark.parametrize(("topic", "payload"), [
    ("appliance/CT-1/state", b"{}"),            # not a box name
    ("appliance/ct-1/other", b"{}"),            # not a fleet topic
    ("appliance/ct-1/cmd/result", b"{}"),
    ("appliance/ct-1/state", b"not json"),
    ("appliance/ct-1/state", b"[1, 2]"),        # not an object
    ("appliance/ct-1/state", b"{" + b" " * fl.PAYLOAD_MAX_BYTES + b"}"),
])
def test_a_message_that_is_not_a_box_message_is_refused_and_counted(topic: str, payload: bytes) -> None:
    f = fl.Fleet()
    assert f.receive(topic, payload, NOW) is False
    assert f.refused == 1 and f.view(NOW) == []


def test_names_that_cannot_be_labels_are_left_out() -> None:
    v = healthy(stages={"ok": {"state": "idle"}, 'x"}': {"state": "idle"}},
                destinations=[{"name": "a b", "up": False}, {"name": "pacs", "up": True}]).view(NOW)[0]
    assert list(v["stages"]) == ["ok"] and [d["name"] for d in v["destinations"]] == ["pacs"]


def scrape(f: fl.Fleet, path: str = "/metrics") -> tuple[str, str]:
    got: list[str] = []
    body = b"".join(FleetApp(f, clock=lambda: NOW)({"REQUEST_METHOD": "GET", "PATH_INFO": path},
                                                   lambda status, headers: got.append(status)))
    return got[0], body.decode()


def test_metrics_has_exactly_the_fleet_series() -> None:
    f = healthy(queue={"items": {}, "oldest_unsent_ts": NOW - 60})
    families = {m.name for m in text_string_to_metric_families(scrape(f)[1])}
    assert families == {f"fleet_box_{n}" for n in (
        "online", "state_timestamp_seconds", "last_seen_timestamp_seconds", "oldest_unsent_timestamp_seconds",
        "destination_up", "spool_free_bytes", "spool_reserve_bytes", "certificate_expiry_timestamp_seconds",
        "stage_stuck", "events_dropped")} | {"fleet_boxes"}


def test_metrics_values_and_labels_of_a_box() -> None:
    f = healthy(queue={"items": {}, "oldest_unsent_ts": NOW - 60}, stages={"pack": {"state": "stuck"}})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in text_string_to_metric_families(scrape(f)[1]) for s in m.samples}
    box = (("box", "ct-1"),)
    assert samples[("fleet_box_online", box)] == 1
    assert samples[("fleet_box_oldest_unsent_timestamp_seconds", box)] == NOW - 60
    assert samples[("fleet_box_state_timestamp_seconds", box)] == NOW - 1
    assert samples[("fleet_box_destination_up", (("box", "ct-1"), ("destination", "pacs")))] == 1
    assert samples[("fleet_box_stage_stuck", (("box", "ct-1"), ("stage", "pack")))] == 1
    assert samples[("fleet_box_certificate_expiry_timestamp_seconds", (("box", "ct-1"), ("cert", "mqtt")))] \
        == NOW + 365 * 86400
    assert samples[("fleet_box_events_dropped_total", box)] == 0
    assert samples[("fleet_boxes", ())] == 1


def test_oldest_unsent_is_absent_when_nothing_is_unsent() -> None:
    assert "fleet_box_oldest_unsent_timestamp_seconds{" not in scrape(healthy())[1]


def test_the_page_escapes_what_a_box_sends() -> None:
    f = healthy(version="<script>alert(1)</script>",
                destinations=[{"name": "pacs", "up": False, "last_error": "<img src=x>"}])
    status, page = scrape(f, "/box/ct-1")
    assert status.startswith("200") and "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page


def test_the_fleet_page_marks_a_box_that_needs_a_person() -> None:
    f = healthy(destinations=[{"name": "pacs", "up": False}])
    f.receive("appliance/ct-2/online", b'{"v":1,"online":true,"conn_seq":1,"boot_id":"c"}', NOW)
    f.receive("appliance/ct-2/state", json.dumps(state("ct-2")).encode(), NOW)
    page = scrape(f, "/")[1]
    assert '<tr class="alarm" id="box-ct-1">' in page and '<tr class="ok" id="box-ct-2">' in page


def test_the_detail_labels_values_last_known_when_the_box_is_silent() -> None:
    f = healthy()
    app = FleetApp(f, clock=lambda: NOW + 600)
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/box/ct-1"}, lambda s, h: None)).decode()
    assert "last known at 2027-01-15 08:00:00Z" in body and ">live<" not in body


def test_an_unknown_box_or_path_is_not_found() -> None:
    for path in ("/box/ct-9", "/box/../etc", "/nothing"):
        assert scrape(healthy(), path)[0].startswith("404")



def test_the_fleet_bench_runs() -> None:
    """bench/fleet_bench.py end to end with 10 boxes; speed is not asserted."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "fleet_bench.py"), "--boxes", "10",
                        "--runs", "1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "10 boxes: 20 messages" in r.stdout and "| `/metrics` |" in r.stdout


def test_a_ca_folder_without_the_centers_certificate_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="ops-center-serve.pem/.key.*fleet ca init.*fleet ca center"):
        fl.tls_context(tmp_path, "ops-center-serve")


def test_the_view_subscribes_by_wildcard_and_to_each_rostered_box_by_name() -> None:
    wildcard, exact = fl.subscriptions(["ct-1", "ct-2"])
    assert wildcard == [("appliance/+/online", 1), ("appliance/+/state", 1), ("appliance/+/events", 1)]
    assert exact == [[("appliance/ct-1/online", 1), ("appliance/ct-1/state", 1),
                      ("appliance/ct-2/online", 1), ("appliance/ct-2/state", 1)]]


def test_by_name_subscriptions_come_in_bounded_packets_for_at_most_boxes_max() -> None:
    _, exact = fl.subscriptions([f"ct-{i}" for i in range(fl.BOXES_MAX + 5)])
    assert all(len(packet) <= fl.EXACT_PER_PACKET for packet in exact)
    assert sum(len(packet) for packet in exact) == 2 * fl.BOXES_MAX


def test_a_name_that_is_not_a_box_name_never_becomes_a_filter() -> None:
    _, exact = fl.subscriptions(["ct-1", "+", "#", "a/b", "ct-2"])
    assert [t for packet in exact for t, _ in packet if "ct-" not in t] == []
    assert len(exact[0]) == 4


def test_the_fleet_page_says_when_the_broker_is_not_connected() -> None:
    link = {"connected": False, "since": None, "broker": "127.0.0.1:8883"}
    app = FleetApp(healthy(), clock=lambda: NOW, link=lambda: link)
    page = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h: None)).decode()
    assert "broker 127.0.0.1:8883: NOT CONNECTED" in page


class FakeClient:
    """What the subscriber asks of paho's client: SUBSCRIBE and UNSUBSCRIBE, recorded."""

    def __init__(self) -> None:
        self.subscribed: list[list[tuple[str, int]]] = []
        self.unsubscribed: list[list[str]] = []

    def subscribe(self, filters: list[tuple[str, int]]) -> tuple[int, int]:
        self.subscribed.append(filters)
        return 0, len(self.subscribed)  # (rc, mid)

    def unsubscribe(self, topics: list[str]) -> None:
        self.unsubscribed.append(topics)


class Ok:
    is_failure = False


def connected(tmp_path: Path, roster: str | None) -> tuple[fl.Subscriber, FakeClient, list[str]]:
    from appliance.ops import pki

    pki.ca_init(tmp_path / "ca", ("127.0.0.1",))
    if roster is not None:
        (tmp_path / "ca" / pki.ROSTER).write_text(roster)
    sub = fl.Subscriber(fl.Fleet(), "127.0.0.1", 8883, tmp_path / "ca", pki.SERVE_CN)
    lines: list[str] = []
    sub.on_change = lines.append
    fake = FakeClient()
    sub._on_connect(fake, None, None, Ok(), None)
    return sub, fake, lines


def test_by_name_filters_are_unsubscribed_once_their_suback_came_and_then_it_is_subscribed(
        tmp_path: Path) -> None:
    sub, fake, _ = connected(tmp_path, "ct-1 1 x\nct-2 2 x\n")
    assert [len(f) for f in fake.subscribed] == [3, 4]  # the wildcards, then the roster by name
    sub._on_subscribe(fake, None, 2, [], None)
    assert fake.unsubscribed == [["appliance/ct-1/online", "appliance/ct-1/state",
                                  "appliance/ct-2/online", "appliance/ct-2/state"]]
    assert not sub.subscribed.is_set()  # the wildcards' SUBACK has not come
    sub._on_subscribe(fake, None, 1, [], None)
    assert sub.subscribed.is_set() and len(fake.unsubscribed) == 1  # the wildcards stay


def test_an_unreadable_roster_leaves_the_wildcards_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "roster").mkdir()  # reading it is an OSError (IsADirectoryError)
    sub, fake, lines = connected(tmp_path, None)
    assert [len(f) for f in fake.subscribed] == [3]
    assert any("cannot read" in line and "wildcard only" in line for line in lines), lines


def test_fleet_status_waits_longer_with_more_boxes_in_the_roster(tmp_path: Path) -> None:
    from appliance.ops import fleetcli

    assert fleetcli.default_settle_s(tmp_path) == fleetcli.SETTLE_S  # no roster
    (tmp_path / "roster").write_text("".join(f"ct-{i} 1 x\n" for i in range(2 * fl.BOXES_MAX)))
    assert fleetcli.default_settle_s(tmp_path) == fleetcli.SETTLE_S + fleetcli.SETTLE_PER_BOX_S * fl.BOXES_MAX


def test_an_excluded_box_leaves_the_view_and_its_messages_are_ignored() -> None:
    f = fed(("appliance/ct-1/state", state("ct-1")), ("appliance/ct-2/state", state("ct-2")))
    assert f.exclude(frozenset({"ct-2"})) == ["ct-2"]
    assert not f.receive("appliance/ct-2/state", json.dumps(state("ct-2")).encode(), NOW)
    assert [b["name"] for b in f.view(NOW)] == ["ct-1"] and f.refused == 0


def test_a_box_no_longer_excluded_is_heard_again() -> None:
    f = fl.Fleet()
    f.exclude(frozenset({"ct-2"}))
    f.exclude(frozenset())  # signed anew: not revoked any more
    assert f.receive("appliance/ct-2/state", json.dumps(state("ct-2")).encode(), NOW)


def revoke(ca: Path, tmp_path: Path, name: str) -> None:
    """Sign box `name` into the CA's roster, then revoke its certificate (fleet crl)."""
    from appliance.ops import pki

    pki.box_key_and_csr(name, tmp_path / f"{name}.key", tmp_path / f"{name}.csr")
    pki.sign_csr(pki.load_ca(ca), tmp_path / f"{name}.csr", tmp_path / f"{name}.pem")
    pki.reissue_crl(ca, (tmp_path / f"{name}.pem",))


def test_a_box_revoked_while_the_view_runs_leaves_it_at_the_next_refresh(tmp_path: Path) -> None:
    sub, fake, lines = connected(tmp_path, "ct-1 1 x\nct-2 2 x\n")
    for name in ("ct-1", "ct-2", "ct-3"):
        assert sub.fleet.receive(f"appliance/{name}/state", json.dumps(state(name)).encode(), NOW)
    revoke(tmp_path / "ca", tmp_path, "ct-3")
    sub.refresh()  # what fleet serve does every second: no reconnect
    assert [b["name"] for b in sub.fleet.view(NOW)] == ["ct-1", "ct-2"]
    assert "left the roster (revoked), dropped from the view: ct-3" in lines, lines


def test_the_roster_is_read_again_only_when_the_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.ops import pki

    sub, _, _ = connected(tmp_path, "ct-1 1 x\n")
    reads: list[Path] = []
    monkeypatch.setattr(pki, "revoked_boxes", lambda d: reads.append(d) or [])
    sub.refresh()
    assert reads == []  # unchanged since the connect read it
    with (tmp_path / "ca" / pki.ROSTER).open("a") as f:
        f.write("ct-2 2 x\n")
    sub.refresh()
    assert reads == [tmp_path / "ca"]


def test_a_revoked_box_gets_no_subscription_by_name_at_the_next_connect(tmp_path: Path) -> None:
    sub, fake, _ = connected(tmp_path, None)
    revoke(tmp_path / "ca", tmp_path, "ct-1")
    sub._on_connect(fake, None, None, Ok(), None)
    assert [len(f) for f in fake.subscribed] == [3, 3]  # the wildcards at each connect, nothing by name
    assert sub.fleet.excluded == frozenset({"ct-1"})
