"""Desired config against a real Mosquitto (the shipped config and ACL, certificates from
`appliance fleet ca`) and a real daemon (`appliance run`, restarted by re-exec): a good
drop-in applied and reported, one that breaks the start rolled back with an event,
refusals reported and audited, the retained message applied once across a reconnect, and
`appliance fleet config push` stopping at a first box that rolls back.

The tests share one box and run in file order (versions grow); each checks its own
outcome. The daemon runs with APPLIANCE_CLOCK_SYNCED=1 (see test_ops_commands.py)."""

from __future__ import annotations

import json
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditTrail
from appliance.core import crypto
from appliance.ops import commands, desired
from tests.mosquitto import MOSQUITTO, Broker, Watcher, fleet_ca, ops_section, sign
from tests.peers import Appliance, base_config, cli, free_port, wait_for
from tests.test_ops_commands import AUDIT_KEY
from tests.test_watchdog import NotifySocket

BOX = "dcfg-box"
TOPIC = f"appliance/{BOX}/config"
WAIT_S = 120  # a restart by re-exec, then CONFIRM_AFTER_S healthy, on a loaded machine

pytestmark = [pytest.mark.peers, pytest.mark.ops,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]


@dataclass
class Site:
    root: Path
    ca: Path
    broker: Broker
    key_path: Path
    key: Ed25519PrivateKey
    box: Appliance
    center: Watcher
    notify: NotifySocket  # the daemon's sd_notify datagrams, as systemd would get them

    def notified(self, since: float) -> list[str]:
        """READY, RELOADING and STOPPING since `since` (monotonic), in order."""
        return [m.split("\n")[0] for when, m in list(self.notify.messages)
                if when >= since and m.startswith(("READY=1", "RELOADING=1", "STOPPING=1"))]

    def publish(self, payload: bytes, topic: str = TOPIC) -> None:
        info = self.center.c.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(20)
        assert info.is_published()

    def signed(self, version: int, text: str, key: Ed25519PrivateKey | None = None, **over: Any) -> bytes:
        k = key or self.key
        body = {**commands.body(BOX, "config", {"version": version, "toml": text}, k,
                                now=time.time(), ttl_s=600), **over}
        return commands.envelope(body, k)

    def events(self, kind: str) -> list[dict[str, Any]]:
        got = (m.json() for m in self.center.on(f"appliance/{BOX}/events"))
        return [d for d in got if d.get("kind") == kind]

    def event(self, kind: str, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events(kind) if all(e.get(k) == v for k, v in match.items())), None)
        got: dict[str, Any] = wait_for(found, WAIT_S, f"event {kind} {match}", poll=0.2,
                                       detail=self.box.log_text)
        return got

    def status(self) -> dict[str, Any]:
        return wait_for(self._status, WAIT_S, "the daemon answers", poll=0.5, detail=self.box.log_text)

    def _status(self) -> dict[str, Any] | None:
        r = cli("status", "--json", "--config", str(self.box.config_path))
        return json.loads(r.stdout) if r.returncode == 0 else None

    def state_config(self) -> dict[str, Any]:
        st = self.center.last(f"appliance/{BOX}/state") or {}
        return dict(st.get("config") or {})

    def audited(self) -> list[str]:
        r = cli("audit", "show", "--config", str(self.box.config_path), check=True)
        out = []
        for line in r.stdout.encode().splitlines():
            desc = ET.fromstring(line).find("EventIdentification/EventOutcomeDescription")  # noqa: S314
            if desc is not None and (desc.text or "").startswith("ops config"):
                out.append(desc.text or "")
        return out

    def log_count(self, event: str) -> int:
        return self.box.log_text().count(f'"event": "{event}"')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("desired")
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    key_path = root / "center" / "command.key"
    broker = Broker(root / "broker", ca).start()
    cfg = base_config(root / "box", free_port())
    cfg["appliance"]["name"] = BOX
    cfg["operations"] = ops_section(root / "box", broker, ca, root / "center", metrics_bind="",
                                    config_deadline_s=60)
    box = Appliance(root / "box", cfg)
    sign(ca, root / "box" / "keys" / "mqtt.csr")
    box.env["APPLIANCE_CLOCK_SYNCED"] = "1"
    notify = NotifySocket(root / "notify.sock")
    box.env["NOTIFY_SOCKET"] = str(notify.path)
    key = crypto.load_private_key_of(key_path, Ed25519PrivateKey, "Ed25519")
    center = Watcher(broker, ca / "ops-center.pem", ca / "ops-center.key")
    s = Site(root, ca, broker, key_path, key, box, center, notify)
    try:
        box.start()
        wait_for(lambda: center.last(f"appliance/{BOX}/state"), WAIT_S, "the box's state",
                 detail=box.log_text)
        yield s
    finally:
        box.stop()
        box.kill9()
        s.center.close()
        notify.close()
        broker.stop()


def test_a_good_dropin_is_applied_by_a_restart_in_the_same_process_and_reported(site: Site) -> None:
    pid = site.status()["pid"]
    since = time.monotonic()
    site.publish(site.signed(1, '[receive]\nae_title = "EDGE2"\n'))
    site.event("config.applied", version=1)
    # systemd (Type=notify) sees a reload of the same main process, never a stop
    assert site.notified(since) == ["RELOADING=1", "READY=1"]
    st = site.status()
    assert (st["ae_title"], st["pid"], st["config"]["version"]) == ("EDGE2", pid, 1)
    assert site.log_count("appliance.restarting") == 1
    wait_for(lambda: site.state_config().get("version") == 1, WAIT_S, "state reports version 1")
    shown = cli("status", "--config", str(site.box.config_path), check=True).stdout
    assert "remote config  version 1 applied" in shown
    assert (site.box.config_path.parent / "remote.d" / desired.REMOTE_NAME).exists()


def test_a_dropin_whose_port_is_taken_is_rolled_back_with_an_event(site: Site) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        since = time.monotonic()
        site.publish(site.signed(2, f'[receive]\nae_title = "EDGE3"\nport = {port}\n'))
        ev = site.event("config.rolled_back", version=2)
        assert (ev["reason"], ev["applied_version"]) == ("did not start", 1)
        st = site.status()
    assert (st["ae_title"], st["listening"][0]["port"]) == ("EDGE2", site.box.port)  # version 1's
    assert site.notified(since) == ["RELOADING=1", "READY=1"]  # the start that failed said nothing
    assert (st["config"]["version"], st["config"]["rolled_back"]) == (1, 2)
    wait_for(lambda: site.state_config().get("rolled_back") == 2, WAIT_S, "state reports the rollback")
    assert "version 2 ROLLED BACK" in cli("status", "--config", str(site.box.config_path)).stdout


@pytest.mark.parametrize(("make", "code", "match"), [
    (lambda s: s.signed(10, '[receive]\nae_title = "X"\n', key=Ed25519PrivateKey.generate()), 403, {}),
    (lambda s: s.signed(11, '[receive]\nae_title = "X"\n', issued_at=1e9, expires_at=1e9 + 60), 410,
     {"version": 11}),
    (lambda s: s.signed(12, '[receive]\nae_title = "X"\n', box="other-box"), 422, {}),
    (lambda s: s.signed(13, "[operations]\nheartbeat_s = 5\n"), 422, {"version": 13, "key": "operations"}),
], ids=["unsigned", "expired", "wrong-box", "forbidden-key"])
def test_a_refused_config_changes_nothing_and_is_reported_and_audited(site: Site, make: Any, code: int,
                                                                      match: dict[str, Any]) -> None:
    before = site.status()
    site.publish(make(site))
    site.event("config.refused", code=code, **match)
    assert [a for a in site.audited() if f": {code} " in a]
    after = site.status()
    assert (after["pid"], after["ae_title"], after["config"]["version"]) == (before["pid"], "EDGE2", 1)
    assert after["uptime_s"] >= before["uptime_s"]  # not restarted


def test_the_retained_config_is_applied_once_across_a_reconnect(site: Site) -> None:
    site.publish(site.signed(3, '[receive]\nae_title = "EDGE4"\n'))
    site.event("config.applied", version=3)
    restarts, connects = site.log_count("appliance.restarting"), site.log_count("ops.connected")
    reconciled = site.log_count("config.reconciled")
    site.broker.stop()
    site.broker.start()  # persistence: the retained config is there again
    wait_for(lambda: site.log_count("ops.connected") > connects, WAIT_S, "the box reconnected",
             detail=site.box.log_text)
    wait_for(lambda: site.log_count("config.reconciled") > reconciled, WAIT_S, "the retained config seen",
             detail=site.box.log_text)
    assert site.log_count("appliance.restarting") == restarts
    assert site.status()["config"]["version"] == 3


def test_a_start_that_died_under_the_new_dropin_is_rolled_back_before_the_config_is_read(site: Site) -> None:
    """The process under probation killed (no word, no exit code: SIGKILL, the watchdog):
    the next start finds the pending record already tried and puts the previous drop-in
    back before it reads the config. The pending state is made with the box's own code,
    as the link would (handle) and the killed start did (at_start), while it is stopped."""
    assert site.box.stop() == 0
    trail = AuditTrail(site.root / "scratch-audit", BOX, "EDGE", AUDIT_KEY, 1 << 20, 2)
    keys = {commands.key_id(site.key.public_key()): site.key.public_key()}
    d = desired.Desired(site.box.config_path, BOX, keys, 60, trail, synced=lambda: True)
    assert d.handle(TOPIC, site.signed(8, '[receive]\nae_title = "DIED"\n'))
    assert desired.at_start(site.box.config_path) is False  # the start that then died
    site.box.start(timeout=WAIT_S)
    ev = site.event("config.rolled_back", version=8)
    assert (ev["reason"], ev["applied_version"]) == ("did not start", 3)
    st = site.status()
    assert (st["ae_title"], st["config"]["version"], st["config"]["rolled_back"]) == ("EDGE4", 3, 8)


def push(site: Site, version: int, text: str, *rest: str) -> tuple[int, dict[str, Any]]:
    f = site.root / f"v{version}.toml"
    f.write_text(text)
    r = cli("fleet", "config", "push", str(f), "--version", str(version), "--box", BOX, "--group", "ward",
            "--boxes", *rest, "--key", str(site.key_path), "--ca", str(site.ca),
            "--port", str(site.broker.port),
            "--timeout", str(WAIT_S if not rest else 60), timeout=3 * WAIT_S + 60)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}


def test_fleet_config_push_goes_on_after_the_first_box_and_stops_when_it_rolls_back(site: Site) -> None:
    site.center.close()  # the push takes the ops-center session (one client per certificate)
    rc, out = push(site, 4, '[receive]\nae_title = "EDGE5"\n', "ghost-box")
    assert (rc, out["boxes"]) == (69, {BOX: "applied", "ghost-box": "no answer"}), out  # ghost: no box
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, out = push(site, 5, f'[receive]\nport = {busy.getsockname()[1]}\n', "ghost-two")
    assert (rc, out["boxes"]) == (1, {BOX: "rolled back", "ghost-two": "not sent"}), out
    site.center = Watcher(site.broker, site.ca / "ops-center.pem", site.ca / "ops-center.key")
    wait_for(lambda: site.center.on("appliance/ghost-box/config"), 30, "the retained config of ghost-box")
    assert site.center.on("appliance/ghost-two/config") == []
    assert site.status()["ae_title"] == "EDGE5"


def test_fleet_config_push_refuses_a_forbidden_key_before_sending(site: Site) -> None:
    rc, out = push(site, 6, '[audit]\nfiles = 3\n', "ghost-three")
    assert rc == 64 and "audit may not be set remotely" in out["stderr"]
