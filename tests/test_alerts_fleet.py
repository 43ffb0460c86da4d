"""The shipped alert rules end to end: a real Mosquitto (the shipped config and ACL,
certificates from `appliance fleet ca`), a real appliance with the ops link, `appliance
fleet serve` subscribed with the operations center's certificate, and a real Prometheus
(Debian `prometheus`, tests/prometheus.py) scraping the fleet view every second with the
shipped alerts.yml unchanged. `kill -9` of the appliance must fire BoxOffline (the will
makes `fleet_box_online` 0; the rule's `for: 30s` runs out), and its restart clear it.
A box that received the canary study leaves no trace in Prometheus. Everything on free
loopback ports in temp dirs, stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fleetserve import FleetServe
from tests.mosquitto import MOSQUITTO, Broker, fleet_ca, sign
from tests.peers import Appliance, base_config, free_port, storescu, to_toml, wait_for
from tests.prometheus import PROMETHEUS, Prometheus
from tests.test_ops_link import CANARY, canary_study

pytestmark = [
    pytest.mark.ops,
    pytest.mark.peers,
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)"),
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus not installed (make peers)"),
]

BOX = "ct-alerted"
HEARTBEAT_S, KEEPALIVE_S = 2, 5


@dataclass
class Center:
    root: Path
    ca: Path
    broker: Broker
    serve: FleetServe
    prometheus: Prometheus


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Center]:
    root = tmp_path_factory.mktemp("center")
    ca = fleet_ca(root / "ca")
    broker = Broker(root / "broker", ca).start()
    serve: FleetServe | None = None
    prom: Prometheus | None = None
    try:
        serve = FleetServe(root / "serve", ca, broker, heartbeat_s=HEARTBEAT_S)
        prom = Prometheus(root / "prometheus", f"127.0.0.1:{serve.port}").start()
        yield Center(root, ca, broker, serve, prom)
    finally:
        if prom is not None:
            prom.stop()
        if serve is not None:
            serve.stop()
        broker.stop()


def box(center: Center, name: str) -> Appliance:
    root = center.root / name
    cfg = base_config(root, free_port())
    cfg["appliance"]["name"] = name
    cfg["operations"] = {"host": "127.0.0.1", "port": center.broker.port, "ca": str(center.ca / "ca.pem"),
                         "cert": str(root / "keys" / "mqtt.pem"), "key": str(root / "keys" / "mqtt.key"),
                         "heartbeat_s": HEARTBEAT_S, "keepalive_s": KEEPALIVE_S, "metrics_bind": ""}
    a = Appliance(root, cfg)  # `appliance keys init`: the box's key and CSR
    sign(center.ca, root / "keys" / "mqtt.csr")
    return a


def value(prom: Prometheus, promql: str) -> float | None:
    got = prom.query(promql)
    return float(got[0]["value"][1]) if got else None


def box_offline(prom: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"].get("alertname") == "BoxOffline"
            and a["labels"].get("box") == name]


def test_prometheus_loads_the_shipped_rules(center: Center) -> None:
    groups = center.prometheus.api("rules")["groups"]
    names = {r["name"] for g in groups for r in g["rules"]}
    assert {"BoxOffline", "BoxSilent", "BoxOldestUnsentOver30m", "BoxDestinationDown", "BoxSpoolNearReserve",
            "BoxCertificateExpiresSoon", "BoxStageStuck"} <= names
    assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups


def test_kill9_of_a_box_fires_box_offline_and_its_restart_clears_it(center: Center) -> None:
    prom, a = center.prometheus, box(center, BOX).start()
    try:
        online = f'fleet_box_online{{box="{BOX}"}}'
        wait_for(lambda: value(prom, online) == 1, 60, "Prometheus scrapes the box online from fleet serve",
                 detail=lambda: a.log_text()[-2000:] + center.serve.log_text())
        assert value(prom, f'fleet_box_state_timestamp_seconds{{box="{BOX}"}}') is not None
        assert not box_offline(prom, BOX)

        a.kill9()
        t0 = time.monotonic()
        wait_for(lambda: value(prom, online) == 0, 60, "fleet_box_online 0 after kill -9 (the will)")
        t_offline = time.monotonic() - t0
        firing = f'ALERTS{{alertname="BoxOffline",alertstate="firing",box="{BOX}"}}'
        wait_for(lambda: value(prom, firing) == 1, 120, "BoxOffline firing", detail=prom.log_text)
        t_firing = time.monotonic() - t0
        print(f"kill -9 -> fleet_box_online 0 in Prometheus: {t_offline:.1f} s; -> BoxOffline firing:"
              f" {t_firing:.1f} s")
        # not before the rule's `for: 30s`, and within it plus the will, a scrape and an evaluation
        assert 30 <= t_firing <= 30 + 1.5 * KEEPALIVE_S + 20, t_firing
        (alert,) = box_offline(prom, BOX)
        assert alert["state"] == "firing" and alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"] == f"Box {BOX} is offline"

        a.start()
        wait_for(lambda: not box_offline(prom, BOX), 60, "BoxOffline cleared after the box is back",
                 detail=a.log_text)
        assert value(prom, online) == 1
    finally:
        with contextlib.suppress(Exception):
            a.stop()
        a.kill9()


def test_no_patient_data_reaches_prometheus(center: Center) -> None:
    """A box that received the canary study, and a destination that fails on it: nothing
    Prometheus holds (every series, the alerts, the rules) carries any of its values."""
    prom, name = center.prometheus, "ct-canary"
    a = box(center, name)
    a.cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1", "port": free_port(),
                              "ae_title": "PACS", "plaintext": True, "timeout_s": 5}]
    a.cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1, "down_after": 1, "probe_min_s": 1}
    a.cfg["pack"] = {"study_quiet_s": 0.5}
    a.config_path.write_text(to_toml(a.cfg))
    a.start()
    try:
        assert storescu(a.port, canary_study(a.root / "study")).returncode == 0
        wait_for(lambda: value(prom, f'fleet_box_destination_up{{box="{name}",destination="pacs"}}') == 0,
                 90, "pacs down, scraped", detail=a.log_text)
        wait_for(lambda: value(prom, f'fleet_box_oldest_unsent_timestamp_seconds{{box="{name}"}}'), 60,
                 "the canary study unsent, scraped")
        everything = "\n".join([
            center.serve.get("/metrics").decode(),
            prom.api_text("federate", **{"match[]": '{__name__=~".+"}'}),
            json.dumps(prom.alerts()), json.dumps(prom.api("rules")),
            json.dumps(prom.api("labels")),
        ])
        assert f'box="{name}"' in everything
        for v in CANARY.values():
            for part in v.split("^"):
                assert part not in everything, part
    finally:
        a.stop()
        a.kill9()
