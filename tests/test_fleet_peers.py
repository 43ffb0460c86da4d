"""The fleet view against a real Mosquitto (the shipped config and ACL, certificates from
`appliance fleet ca`) and two real appliances: `appliance fleet status` (a subprocess)
and `appliance fleet serve` (a subprocess, its page read by headless Chromium).

Box `ct-north` has a PACS that never answers (its destination goes down: a person is
needed) and has received the PHI canary study; `ct-south` delivers to a folder.

The broker lets one client per certificate in: `fleet serve`, `fleet status` and `fleet
send` each have their own (ops-center-serve, ops-center-status, ops-center), so the page
stays connected while the others run. tests/test_fleet_rabbitmq.py runs these tests
against RabbitMQ (the `make_broker` fixture).

Screenshots are kept under the test's tmp dir and, when APPLIANCE_TEST_ARTIFACTS names
a folder, copied there (fleet-page.png, fleet-box.png).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from appliance.core import crypto
from appliance.ops import commands
from tests.mosquitto import MOSQUITTO, Broker, Watcher, fleet_ca, sign
from tests.peers import REPO, Appliance, base_config, cli, free_port, storescu, wait_for
from tests.test_ops_link import CANARY, canary_study

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.peers, pytest.mark.ops,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]

NORTH, SOUTH = "ct-north", "ct-south"
HEARTBEAT_S = 2
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Bed:
    root: Path
    ca: Path
    broker: Any  # tests.mosquitto.Broker or tests.rabbitmq.RabbitBroker
    boxes: dict[str, Appliance]

    def fleet_args(self) -> list[str]:
        return ["--ca", str(self.ca), "--host", "127.0.0.1", "--port", str(self.broker.port),
                "--heartbeat", str(HEARTBEAT_S)]

    def send(self, box: str, op: str) -> subprocess.CompletedProcess[str]:
        return cli("fleet", "send", box, op, "--key", str(self.root / "center" / "command.key"),
                   "--ca", str(self.ca), "--port", str(self.broker.port), "--timeout", "30")


@pytest.fixture(scope="module")
def make_broker() -> Callable[[Path, Path], Any]:
    return Broker


def box(root: Path, ca: Path, broker: Any, name: str, pacs_down: bool) -> Appliance:
    cfg = base_config(root, free_port())
    cfg["appliance"]["name"] = name
    cfg["operations"] = {"host": "127.0.0.1", "port": broker.port, "ca": str(ca / "ca.pem"),
                         "cert": str(root / "keys" / "mqtt.pem"), "key": str(root / "keys" / "mqtt.key"),
                         "heartbeat_s": HEARTBEAT_S, "keepalive_s": 5, "metrics_bind": "",
                         "command_keys": [str(root.parent / "center" / "command.pub")]}
    if pacs_down:
        cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1, "down_after": 1, "probe_min_s": 1}
        cfg["pack"] = {"study_quiet_s": 1}
        cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                                "port": free_port(), "ae_title": "PACS", "plaintext": True, "timeout_s": 5}]
    a = Appliance(root, cfg)  # `keys init`: the box's key and CSR
    sign(ca, root / "keys" / "mqtt.csr")  # and the CA's roster names the box
    a.env["APPLIANCE_CLOCK_SYNCED"] = "1"  # commands (the machine's clock may not be NTP-synced)
    return a.start()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, make_broker: Callable[[Path, Path], Any]) -> Iterator[Bed]:
    root = tmp_path_factory.mktemp("fleetview")
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    broker = make_broker(root / "broker", ca).start()
    boxes: dict[str, Appliance] = {}
    try:
        boxes[NORTH] = box(root / NORTH, ca, broker, NORTH, pacs_down=True)
        boxes[SOUTH] = box(root / SOUTH, ca, broker, SOUTH, pacs_down=False)
        r = storescu(boxes[NORTH].port, canary_study(root / "study"))
        assert r.returncode == 0, r.stderr
        yield Bed(root, ca, broker, boxes)
    finally:
        for a in boxes.values():
            a.stop()
            a.kill9()
        broker.stop()


def status_json(bed: Bed) -> tuple[int, dict[str, dict[str, Any]]]:
    r = cli("fleet", "status", "--json", *bed.fleet_args())
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, {b["name"]: b for b in json.loads(r.stdout)}


def settled(bed: Bed) -> dict[str, dict[str, Any]]:
    """`fleet status --json` once both boxes' state shows the study received and north's PACS down."""
    def ready() -> dict[str, dict[str, Any]] | None:
        _, boxes = status_json(bed)
        north = boxes.get(NORTH)
        ok = (SOUTH in boxes and north is not None and north["queue"]
              and any(not d["up"] for d in north["destinations"]))
        return boxes if ok else None
    return wait_for(ready, 90, "both boxes in fleet status, ct-north's pacs down",
                    detail=lambda: bed.boxes[NORTH].log_text()[-3000:])


def test_fleet_status_against_two_appliances_shows_both(bed: Bed) -> None:
    settled(bed)
    r = cli("fleet", "status", *bed.fleet_args())
    lines = r.stdout.splitlines()
    assert lines[0].startswith("BOX") and "ALARMS" in lines[0]
    north = next(line for line in lines if line.startswith(NORTH))
    south = next(line for line in lines if line.startswith(SOUTH))
    assert "online" in north and "destination down" in north and "0/1 up (pacs down)" in north
    assert "online" in south and south.rstrip().endswith("none") and "1/1 up" in south


def test_fleet_status_exits_1_when_a_box_needs_a_person(bed: Bed) -> None:
    settled(bed)
    code, boxes = status_json(bed)
    assert code == 1
    assert boxes[NORTH]["alarms"] == ["destination down"] and boxes[SOUTH]["alarms"] == []
    assert boxes[SOUTH]["live"] is True and boxes[SOUTH]["certs"]["mqtt"] > time.time()


def test_fleet_status_says_when_the_broker_cannot_be_reached(bed: Bed) -> None:
    r = cli("fleet", "status", "--ca", str(bed.ca), "--port", str(free_port()))
    assert r.returncode == 69 and "cannot reach the broker" in r.stderr, r.stderr


def test_fleet_status_leaves_no_trace_of_the_phi_canary(bed: Bed) -> None:
    settled(bed)
    r = cli("fleet", "status", "--json", *bed.fleet_args())
    t = cli("fleet", "status", *bed.fleet_args())
    assert_no_canary(r.stdout + r.stderr + t.stdout + t.stderr)


def assert_no_canary(text: str) -> None:
    for value in CANARY.values():
        for part in value.split("^"):
            assert part not in text, part
    assert "CANARY" not in text


# --- fleet serve (after the status tests: they share the ops-center certificate) ---

@dataclass
class Served:
    url: str
    proc: subprocess.Popen[str]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:  # noqa: S310 - our loopback
            body: str = r.read().decode()
            return body


@pytest.fixture(scope="module")
def served(bed: Bed) -> Iterator[Served]:
    settled(bed)
    with (bed.root / "serve.log").open("ab") as log:  # its lines about the broker connection
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "fleet", "serve", "--bind", "127.0.0.1:0",
                                 *bed.fleet_args()], stdout=subprocess.PIPE, stderr=log, text=True,
                                cwd=REPO, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the process prints its URL once it serves
        m = re.search(r"serving (http://127\.0\.0\.1:\d+)/", line)
        assert m, line
        s = Served(m.group(1), proc)
        wait_for(lambda: 'fleet_box_online{box="ct-north"} 1.0' in s.get("/metrics")
                 and 'fleet_box_online{box="ct-south"} 1.0' in s.get("/metrics"), 30, "both boxes served")
        yield s
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in text_string_to_metric_families(text) for s in m.samples}


def test_fleet_serve_metrics_has_both_boxes_as_series(served: Served) -> None:
    got = wait_for(lambda: (s := samples(served.get("/metrics"))) and
                   s.get(("fleet_box_destination_up", (("box", NORTH), ("destination", "pacs")))) == 0 and s,
                   30, "north's pacs down in /metrics")
    assert got[("fleet_boxes", ())] == 2
    assert got[("fleet_box_destination_up", (("box", SOUTH), ("destination", "outbox")))] == 1
    for b in (NORTH, SOUTH):
        assert got[("fleet_box_online", (("box", b),))] == 1
        assert abs(got[("fleet_box_last_seen_timestamp_seconds", (("box", b),))] - time.time()) < 30
        assert got[("fleet_box_stage_stuck", (("box", b), ("stage", "forward")))] == 0
        cert = ("fleet_box_certificate_expiry_timestamp_seconds", (("box", b), ("cert", "mqtt")))
        assert got[cert] > time.time()


def serve_kept_its_session(bed: Bed, served: Served, since: str, after: float) -> None:
    """The page connected since `since` all along, and hearing the boxes after `after`."""
    wait_for(lambda: samples(served.get("/metrics"))[("fleet_box_last_seen_timestamp_seconds",
                                                      (("box", SOUTH),))] > after + 1, 60,
             "serve hearing the boxes")
    assert since in served.get("/")
    assert "connection lost" not in (bed.root / "serve.log").read_text()
    assert "Client ops-center-serve already connected" not in bed.broker.log_text()


def connected_since(served: Served) -> str:
    m = re.search(r"connected since [^<]+", served.get("/"))
    assert m, served.get("/")
    return m.group(0)


def test_fleet_send_while_serve_runs_leaves_the_page_connected(bed: Bed, served: Served) -> None:
    """`fleet send` connects with ops-center, `fleet serve` with ops-center-serve: the
    broker has no reason to close the page's session."""
    since = connected_since(served)
    r = bed.send(SOUTH, "ping")
    assert r.returncode == 0 and json.loads(r.stdout)["code"] == 200, r.stdout + r.stderr
    serve_kept_its_session(bed, served, since, time.time())


def test_fleet_status_while_serve_runs_leaves_the_page_connected(bed: Bed, served: Served) -> None:
    since = connected_since(served)
    r = cli("fleet", "status", *bed.fleet_args())
    assert NORTH in r.stdout and SOUTH in r.stdout, r.stdout + r.stderr
    serve_kept_its_session(bed, served, since, time.time())


def test_only_the_ops_center_certificate_gets_a_command_to_a_box(bed: Bed) -> None:
    """The same signed ping published with ops-center-status goes nowhere (the broker
    refuses the write: Mosquitto drops it, RabbitMQ closes the connection); with
    ops-center, the box answers it."""
    key = crypto.load_private_key_of(bed.root / "center" / "command.key", Ed25519PrivateKey, "Ed25519")
    results = f"appliance/{SOUTH}/cmd/result"
    center = Watcher(bed.broker, bed.ca / "ops-center.pem", bed.ca / "ops-center.key", client_id="ops-center",
                     topics=(results,), persistent=False)
    try:
        denied = commands.body(SOUTH, "ping", {}, key, now=time.time())
        reader = Watcher(bed.broker, bed.ca / "ops-center-status.pem", bed.ca / "ops-center-status.key",
                         client_id="ops-center-status", topics=(), persistent=False)
        try:
            sent = reader.c.publish(f"appliance/{SOUTH}/cmd", commands.envelope(denied, key), qos=1)
            with contextlib.suppress(RuntimeError):  # Mosquitto acks (and drops) it; RabbitMQ closes
                sent.wait_for_publish(10)
        finally:
            reader.close()
        allowed = commands.body(SOUTH, "ping", {}, key, now=time.time())
        center.c.publish(f"appliance/{SOUTH}/cmd", commands.envelope(allowed, key), qos=1)
        wait_for(lambda: any(m.json().get("cmd_id") == allowed["cmd_id"] for m in center.on(results)), 30,
                 "the ops-center's ping answered", detail=lambda: bed.boxes[SOUTH].log_text()[-3000:])
        assert not [m for m in center.on(results) if m.json().get("cmd_id") == denied["cmd_id"]]
    finally:
        center.close()


def test_fleet_serve_without_a_broker_says_so_and_stops_on_sigterm(bed: Bed, served: Served) -> None:
    """A second server, with no broker on its port: the page says so; SIGTERM ends it with 0."""
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "fleet", "serve", "--bind", "127.0.0.1:0",
                             "--ca", str(bed.ca), "--port", str(free_port())], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO, start_new_session=True)
    try:
        assert proc.stdout is not None
        m = re.search(r"serving (http://127\.0\.0\.1:\d+)/", proc.stdout.readline())
        assert m
        assert ": NOT CONNECTED</b>" in Served(m.group(1), proc).get("/")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium in its own session and profile under `tmp`, killed as a group at the deadline."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def keep(png: Path) -> None:
    folder = os.environ.get("APPLIANCE_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(folder) / png.name)


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make peers)")


@needs_chromium
def test_the_fleet_page_in_chromium_shows_both_boxes_north_in_red(bed: Bed, served: Served,
                                                                    tmp_path: Path) -> None:
    wait_for(lambda: "destination down" in served.get("/"), 30, "north's alarm on the page")
    dom = chromium(tmp_path, "--dump-dom", served.url + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"broker 127.0.0.1:{bed.broker.port}: connected since" in dom.stdout
    assert re.search(rf'<tr class="alarm" id="box-{NORTH}">', dom.stdout), dom.stdout
    assert re.search(rf'<tr class="ok" id="box-{SOUTH}">', dom.stdout), dom.stdout
    png = tmp_path / "fleet-page.png"
    shot = chromium(tmp_path, f"--screenshot={png}", "--window-size=1600,500", served.url + "/")
    assert shot.returncode == 0 and png.read_bytes()[:8] == PNG, shot.stderr[-2000:]
    keep(png)


def test_the_phi_canary_leaves_no_trace_in_the_page_nor_the_metrics(served: Served) -> None:
    pages = [served.get(p) for p in ("/", f"/box/{NORTH}", f"/box/{SOUTH}", "/fleet.json", "/metrics")]
    assert "ct-north" in pages[0]
    assert_no_canary("\n".join(pages))


@needs_chromium
def test_a_box_detail_in_chromium_shows_an_event_that_came_while_it_served(bed: Bed, served: Served,
                                                                            tmp_path: Path) -> None:
    """North's PACS comes up (DCMTK storescp on its port): the box sends destination.up,
    which the center receives live (events are not retained), and north turns green."""
    port = bed.boxes[NORTH].cfg["destinations"][0]["port"]
    (tmp_path / "pacs").mkdir()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "+xa", "-od", str(tmp_path / "pacs"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "destination.up" in served.get(f"/box/{NORTH}") or None, 90,
                 "destination.up of north on its page", detail=lambda: bed.boxes[NORTH].log_text()[-3000:])
        wait_for(lambda: f'<tr class="ok" id="box-{NORTH}">' in served.get("/"), 30, "north green")
        dom = chromium(tmp_path, "--dump-dom", f"{served.url}/box/{NORTH}")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "destination pacs" in dom.stdout and "destination.up" in dom.stdout
        assert '<td class="src">live</td>' in dom.stdout
        png = tmp_path / "fleet-box.png"
        shot = chromium(tmp_path, f"--screenshot={png}", "--window-size=1000,900",
                        f"{served.url}/box/{NORTH}")
        assert shot.returncode == 0 and png.read_bytes()[:8] == PNG, shot.stderr[-2000:]
        keep(png)
    finally:
        os.killpg(pacs.pid, signal.SIGTERM)
        pacs.wait(10)


def test_a_box_killed_shows_offline_with_its_values_last_known(bed: Bed, served: Served) -> None:
    """Last: it kills ct-south (the broker's will says offline)."""
    bed.boxes[SOUTH].kill9()
    wait_for(lambda: f'fleet_box_online{{box="{SOUTH}"}} 0.0' in served.get("/metrics"), 30,
             "south offline in /metrics")
    detail = served.get(f"/box/{SOUTH}")
    assert "OFFLINE" in detail and "last known at " in detail and "destination outbox" in detail


def revoked_box_leaves_the_view(bed: Bed, served: Served, name: str) -> None:
    """`fleet crl --revoke` of box `name`'s certificate: it leaves the roster, the running
    `fleet serve` (not restarted, its session kept) and `fleet status`, though the broker
    still holds its retained messages."""
    since = connected_since(served)
    r = cli("fleet", "crl", "--ca", str(bed.ca), "--revoke", str(bed.root / name / "keys" / "mqtt.pem"))
    assert r.returncode == 0 and f"left the roster: {name}" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: f'box="{name}"' not in served.get("/metrics"), 30, f"{name} gone from /metrics")
    assert served.proc.poll() is None and connected_since(served) == since
    assert f"dropped from the view: {name}" in (bed.root / "serve.log").read_text()
    _, boxes = status_json(bed)
    assert name not in boxes and set(boxes) == set(bed.boxes) - {name}, boxes


def test_a_killed_box_revoked_leaves_the_fleet_view(bed: Bed, served: Served) -> None:
    """After the test above (south killed, offline on the page): revoking it takes it off
    the page and out of `fleet status`, whose wildcard still gets its retained messages."""
    revoked_box_leaves_the_view(bed, served, SOUTH)
