"""The Prometheus metrics endpoint (appliance/health/metrics.py).

The daemon-level tests run the appliance as a subprocess with [operations] and a
metrics_bind, and no broker at all (metrics do not need the ops link to be connected),
scrape it over HTTP and parse the text with prometheus_client's own parser; DCMTK's
storescu sends the PHI canary study. The server's bounds are tested on a bare
MetricsServer.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from appliance.core.listener import REFUSALS
from appliance.health import metrics
from appliance.queue.state import STATES
from appliance.receive.scp import REJECTIONS
from tests.mosquitto import fleet_ca, sign
from tests.peers import Appliance, base_config, echoscu, free_port, storescu, wait_for
from tests.test_ops_link import CANARY, canary_study

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # noqa: S310
        assert r.status == 200
        return str(r.read().decode())


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Appliance, int]]:
    """A box with [operations] whose broker is not there, metrics on a free port and the
    default directory destination."""
    root = tmp_path_factory.mktemp("metrics")
    ca = fleet_ca(root / "ca")
    cfg = base_config(root / "box", free_port())
    cfg["pack"] = {"study_quiet_s": 1}
    (root / "box" / "outbox").mkdir(parents=True)
    mport = free_port()
    cfg["operations"] = {"host": "127.0.0.1", "port": free_port(), "ca": str(ca / "ca.pem"),
                         "cert": str(root / "box" / "keys" / "mqtt.pem"),
                         "key": str(root / "box" / "keys" / "mqtt.key"),
                         "metrics_bind": f"127.0.0.1:{mport}"}
    a = Appliance(root / "box", cfg)
    sign(ca, root / "box" / "keys" / "mqtt.csr")
    a.start()
    try:
        wait_for(lambda: _answers(mport), 30, "the metrics endpoint")
        yield a, mport
    finally:
        a.stop()
        a.kill9()


def _answers(port: int) -> bool:
    try:
        scrape_text(port)
    except OSError:
        return False
    return True


# --- the daemon ---

def test_every_series_is_there_from_the_start_at_zero(box: tuple[Appliance, int]) -> None:
    a, port = box
    s = samples(scrape_text(port))  # the module's first scrape: nothing sent yet
    assert value(s, "appliance_instances_received_total") == 0
    assert value(s, "appliance_received_bytes_total") == 0
    for r in REJECTIONS:
        assert value(s, "appliance_associations_rejected_total", reason=r) == 0
    for r in REFUSALS:
        assert value(s, "appliance_connections_refused_total", reason=r) == 0
    for r in metrics.REFUSED:
        assert value(s, "appliance_instances_refused_total", reason=r) == 0
    for st in STATES:
        assert value(s, "appliance_queue_items", state=st) == 0
        assert value(s, "appliance_queue_bytes", state=st) == 0
    assert value(s, "appliance_destination_up", destination="outbox") == 1
    assert value(s, "appliance_destination_sent_bytes_total", destination="outbox") == 0
    assert value(s, "appliance_destination_failovers_total", destination="outbox") == 0
    assert value(s, "appliance_queue_oldest_unsent_timestamp_seconds") == 0
    for stage in ("receive", "pack", "forward", "failover", "ops"):
        assert value(s, "appliance_stage_up", stage=stage) == 1
        assert value(s, "appliance_stage_stuck", stage=stage) == 0
    assert value(s, "appliance_ops_link_connected") == 0  # no broker: metrics all the same
    assert value(s, "appliance_spool_free_bytes") > 0


def test_certificate_expiry_is_the_mqtt_certificates_not_after(box: tuple[Appliance, int]) -> None:
    from appliance.ops import pki

    a, port = box
    want = pki.load_cert(a.root / "keys" / "mqtt.pem").not_valid_after_utc.timestamp()
    s = samples(scrape_text(port))
    assert value(s, "appliance_certificate_expiry_timestamp_seconds", certificate="mqtt") == want


def test_build_info_names_the_version(box: tuple[Appliance, int]) -> None:
    from appliance import __version__

    infos = [dict(labels) for name, labels in samples(scrape_text(box[1])) if name == "appliance_build_info"]
    assert [i["version"] for i in infos] == [__version__]


def test_a_study_moves_the_counters_and_leaves_no_phi(box: tuple[Appliance, int]) -> None:
    a, port = box
    r = storescu(a.port, canary_study(a.root / "study"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: value(samples(scrape_text(port)), "appliance_destination_bundles_delivered_total",
                           destination="outbox") >= 1, 60, "the canary study delivered")
    text = scrape_text(port)
    s = samples(text)
    assert value(s, "appliance_instances_received_total") == 3
    assert value(s, "appliance_received_bytes_total") > 0
    assert value(s, "appliance_destination_sent_bytes_total", destination="outbox") > 0
    assert value(s, "appliance_pack_segments_total") >= 1
    assert value(s, "appliance_pack_in_bytes_total") > 0
    assert value(s, "appliance_pack_compression_ratio") > 0
    assert value(s, "appliance_pack_rate_bytes_per_second") > 0
    assert value(s, "appliance_queue_items", state="delivered") >= 1
    for v in (*CANARY.values(), "MODALITY"):
        assert v not in text


def test_an_unknown_ae_title_is_a_reason_never_a_label(box: tuple[Appliance, int]) -> None:
    a, port = box
    before = value(samples(scrape_text(port)), "appliance_associations_rejected_total", reason="calling_ae")
    echoscu(a.port, aet="STRANGERAE77")
    text = scrape_text(port)
    assert value(samples(text), "appliance_associations_rejected_total", reason="calling_ae") == before + 1
    assert "STRANGERAE77" not in text


def test_promtool_accepts_the_scrape(box: tuple[Appliance, int]) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make peers installs Debian's prometheus"
    r = subprocess.run([promtool, "check", "metrics"], input=scrape_text(box[1]), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- pure: the collector's labels ---

def _collector(snapshot: dict[str, Any], tally: metrics.Tally) -> metrics.DaemonCollector:
    certs = metrics.Certificates({"mqtt": Path("/nonexistent")}, lambda paths: {})
    return metrics.DaemonCollector(lambda: snapshot, lambda: {}, tally, certs, ["receive"], ["pacs"])


def _labels(c: metrics.DaemonCollector) -> set[tuple[str, str, str]]:
    return {(s.name, k, v) for fam in c.collect() for s in fam.samples for k, v in s.labels.items()}


def test_a_destination_not_in_the_config_is_never_a_label() -> None:
    tally = metrics.Tally(["pacs"])
    tally.on_log("bundle.delivered", {"destination": "1.2.3.4.5", "bytes": 10})
    tally.on_log("bundle.moved", {"destination": "elsewhere"})
    snap = {"destinations": [{"name": "stranger", "state": "down"}]}
    assert {v for _, k, v in _labels(_collector(snap, tally)) if k == "destination"} == {"pacs"}


def test_a_refusal_outside_the_table_counts_as_other() -> None:
    snap = {"receive": {"instances_refused": {"1.2.840.99": 2, "spool_full": 1}}}
    fams = {f.name: f for f in _collector(snap, metrics.Tally([])).collect()}
    got = {s.labels["reason"]: s.value for s in fams["appliance_instances_refused"].samples
           if s.name.endswith("_total")}
    assert got["other"] == 2 and got["spool_full"] == 1
    assert set(got) == {*metrics.REFUSED, "other"}


def test_delivered_bytes_and_failovers_count_per_destination() -> None:
    tally = metrics.Tally(["pacs"])
    tally.on_log("bundle.delivered", {"destination": "pacs", "bytes": 1000})
    tally.on_log("bundle.delivered", {"destination": "pacs", "bytes": 24})
    tally.on_log("bundle.moved", {"destination": "pacs", "reason": "timeout"})
    v = tally.view()
    assert (v["sent_bytes"]["pacs"], v["delivered"]["pacs"], v["moved"]["pacs"]) == (1024, 2, 1)


# --- the HTTP server's bounds ---

class _One(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("x", "x", value=1)


@pytest.fixture
def server() -> Iterator[metrics.MetricsServer]:
    s = metrics.MetricsServer(f"127.0.0.1:{free_port()}", _One())
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_a_silent_client_is_dropped_after_the_client_timeout(server: metrics.MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as c:
        t0 = time.monotonic()
        assert c.recv(100) == b""  # closed by the server, not by our timeout
        assert time.monotonic() - t0 < metrics.CLIENT_TIMEOUT_S + 10


def test_a_trickling_client_is_cut_at_the_connection_deadline(server: metrics.MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as c:
        t0 = time.monotonic()
        c.setblocking(False)
        got = None
        while got != b"" and time.monotonic() - t0 < metrics.CONNECTION_DEADLINE_S + 20:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                c.send(b"G")  # one byte a second: never silent for CLIENT_TIMEOUT_S
            try:
                got = c.recv(100)
            except BlockingIOError:
                got = None
            except ConnectionResetError:
                got = b""
            time.sleep(1)
        assert got == b"", "the server never cut the connection"
        assert metrics.CONNECTION_DEADLINE_S - 1 < time.monotonic() - t0 < metrics.CONNECTION_DEADLINE_S + 10


def test_connections_beyond_the_cap_are_closed_and_served_again_later(server: metrics.MetricsServer) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
            for _ in range(metrics.MAX_CLIENTS)]
    try:
        wait_for(lambda: server.busy == metrics.MAX_CLIENTS, 30, "the server holding every slot")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as extra:
            t0 = time.monotonic()
            assert extra.recv(100) == b""
            assert time.monotonic() - t0 < metrics.CLIENT_TIMEOUT_S / 2
    finally:
        for c in held:
            c.close()
    wait_for(lambda: _answers(server.port), 30, "the endpoint free again")


def test_only_metrics_is_served(server: metrics.MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/admin", timeout=10)  # noqa: S310
    e.value.close()
    assert e.value.code == 404
