"""`appliance fleet send BOX diagnostics --to sftp` end to end: a real Mosquitto (the
shipped config and ACL), a real daemon with [operations.diagnostics] and a real OpenSSH
sshd as the center's SFTP folder (tests/sshd.py). The box uploads the document the MQTT
parts would carry, without the patient data of a study it received, and the result names
the file; with the server gone, the result is a failure with a reason class, in time.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import MOSQUITTO, Broker, fleet_ca, ops_section, sign
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for
from tests.sshd import REMOTE_DIR, Sshd
from tests.test_ops_link import CANARY, canary_study

BOX = "diag-sftp-box"
TIMEOUT_S = 15  # [operations.diagnostics] timeout_s
PING_S = 8  # a ping while an upload hangs must be answered within this (< TIMEOUT_S)

pytestmark = [pytest.mark.ops, pytest.mark.peers,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]


@dataclass
class Site:
    root: Path
    ca: Path
    broker: Broker
    sshd: Sshd
    box: Appliance

    def send(self, *args: str) -> tuple[int, dict[str, Any], str]:
        key = self.root / "center" / "command.key"
        r = cli("fleet", "send", BOX, "diagnostics", *args, "--key", str(key),
                "--ca", str(self.ca), "--port", str(self.broker.port), "--timeout", "60", timeout=90)
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}, r.stderr

    def ping(self, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return cli("fleet", "send", BOX, "ping", "--key", str(self.root / "center" / "command.key"),
                   "--ca", str(self.ca), "--port", str(self.broker.port), "--timeout", str(timeout))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("diagsftp")
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    broker = Broker(root / "broker", ca).start()
    sshd = Sshd(root / "sshd").__enter__()
    try:
        cfg = base_config(root / "box", free_port())
        cfg["appliance"]["name"] = BOX
        cfg["pack"] = {"study_quiet_s": 0.5}
        (root / "box" / "outbox").mkdir(parents=True)
        cfg["operations"] = ops_section(root / "box", broker, ca, root / "center", diagnostics={
            "sftp_host": "127.0.0.1", "sftp_port": sshd.port, "user": "root", "key": str(sshd.client_key),
            "known_hosts": str(sshd.known_hosts), "dir": REMOTE_DIR, "timeout_s": TIMEOUT_S})
        box = Appliance(root / "box", cfg)
        sign(ca, root / "box" / "keys" / "mqtt.csr")
        box.env["APPLIANCE_CLOCK_SYNCED"] = "1"
        box.start()
        try:
            s = Site(root, ca, broker, sshd, box)
            wait_for(lambda: s.ping().returncode == 0, 60, "the box answers a ping", detail=box.log_text)
            assert storescu(box.port, canary_study(root / "study")).returncode == 0
            wait_for(lambda: box.status()["queue"].get("delivered") == 1, 60, "delivered",
                     detail=box.log_text)
            yield s
        finally:
            box.stop()
            box.kill9()
    finally:
        sshd.stop()
        broker.stop()


def test_fleet_send_to_sftp_uploads_the_document_the_parts_carry_without_patient_data(site: Site) -> None:
    rc, res, err = site.send("--to", "sftp")
    assert rc == 0 and res["code"] == 200, (res, err, site.box.log_text())
    r = res["result"]
    name = f"{BOX}-{res['cmd_id']}.json"
    assert r["file"] == f"{REMOTE_DIR}/{name}" and name in err
    raw = (site.sshd.drop / name).read_bytes()
    assert (r["bytes"], r["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    uploaded = json.loads(raw)
    out = site.root / "by-mqtt.json"
    rc, _, err = site.send("--out", str(out))
    assert rc == 0, err
    by_mqtt = json.loads(out.read_text())
    assert set(uploaded) == set(by_mqtt)
    assert set(uploaded["status"]) == set(by_mqtt["status"])
    assert uploaded["config"] == by_mqtt["config"]
    assert uploaded["status"]["receive"]["instances_received"] == 3
    text = raw.decode()
    assert not any(part in text for v in CANARY.values() for part in v.split("^"))


def test_with_the_server_gone_the_result_is_a_failure_class_within_the_bound(site: Site) -> None:
    site.sshd.stop()
    try:
        start = time.monotonic()
        rc, res, err = site.send("--to", "sftp")
        took = time.monotonic() - start
        assert rc == 1, (res, err)
        assert (res["code"], res["result"]) == (502, {"to": "sftp", "reason": "refused"}), res
        assert took < TIMEOUT_S + 20, took  # the CLI's own start and the broker's round trips included
        assert "127.0.0.1" not in json.dumps(res)
    finally:
        site.sshd.start()
    rc, res, _ = site.send("--to", "sftp")
    assert rc == 0 and res["code"] == 200  # and the link carried on


def test_a_server_that_never_answers_gives_a_timeout_within_timeout_s(site: Site) -> None:
    """The port accepts TCP and then says nothing: the box gives up within its timeout_s
    and answers; meanwhile the ops link answers a ping (the upload has its own thread)."""
    site.sshd.stop()
    try:
        with socket.socket() as mute:
            mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            mute.bind(("127.0.0.1", site.sshd.port))
            mute.listen(8)
            got: list[tuple[int, dict[str, Any], str]] = []
            start = time.monotonic()
            upload = threading.Thread(target=lambda: got.append(site.send("--to", "sftp")))
            upload.start()
            mute.settimeout(60)
            conn, _ = mute.accept()  # the box is connected and waits for a banner: the upload runs
            with conn:
                ping = site.ping(PING_S)  # the link is not held by the upload
                upload.join(TIMEOUT_S + 60)
            took = time.monotonic() - start
        assert ping.returncode == 0 and json.loads(ping.stdout)["code"] == 200, ping.stderr
        [(rc, res, err)] = got
        assert rc == 1, (res, err)
        assert (res["code"], res["result"]) == (502, {"to": "sftp", "reason": "timeout"}), res
        assert TIMEOUT_S - 1 < took < TIMEOUT_S + 20, took
    finally:
        site.sshd.start()
