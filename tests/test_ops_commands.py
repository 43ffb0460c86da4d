"""Signed commands from the operations center (appliance/ops/commands.py).

In-process: the checks and their codes, with a real AuditTrail and replay record in a
temp dir. Against a real Mosquitto (the shipped config and ACL, certificates from
`appliance fleet ca`) and a real daemon: `appliance fleet send` holds and releases a
bundle, and forged, foreign, expired and replayed commands are refused with their code
and audited. The daemon runs with APPLIANCE_CLOCK_SYNCED=1 (the machine's clock may
not be NTP-synchronised; the in-process test shows what an unsynchronised one does).
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditTrail
from appliance.audit.trail import read
from appliance.core import crypto
from appliance.core.errors import NotFoundError
from appliance.ops import commands
from appliance.ops.cli import publish_and_wait
from tests.mosquitto import MOSQUITTO, Broker, fleet_ca, ops_section, sign
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for
from tests.test_ops_link import CANARY, canary_study

BOX = "cmd-box"
NOW = 1_800_000_000.0


AUDIT_KEY = bytes(range(32))


def opened(path: Path) -> str:
    """The audit file's messages, opened (it is sealed at rest), as one text."""
    return "\n".join(m.decode() for m in read(path, AUDIT_KEY) if m is not None)


pytestmark = pytest.mark.ops  # the ops-center tier (make test-ops)

# --- in-process: the checks ---------------------------------------------------------------


@dataclass
class Local:
    cmds: commands.Commands
    key: Ed25519PrivateKey
    calls: list[tuple[str, dict[str, Any]]]
    audit_log: Path


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    key = Ed25519PrivateKey.generate()
    calls: list[tuple[str, dict[str, Any]]] = []

    def change(args: dict[str, Any]) -> Any:
        calls.append(("queue.change", args))
        if args["id"] == "missing":
            raise NotFoundError("no item missing")
        return [{"id": args["id"], "result": args["verb"]}]

    trail = AuditTrail(tmp_path / "audit", BOX, "EDGE", AUDIT_KEY, 1 << 20, 2)
    seen = commands.Seen(tmp_path)
    c = commands.Commands(BOX, {commands.key_id(key.public_key()): key.public_key()}, seen,
                          {"queue.change": change, "status": lambda a: {}}, trail,
                          summary=lambda snap: {"summary": True}, synced=lambda: True)
    yield Local(c, key, calls, tmp_path / "audit" / "audit.log")
    seen.close()


def signed(key: Ed25519PrivateKey, op: str = "ping", args: dict[str, Any] | None = None,
           **over: Any) -> bytes:
    return commands.envelope({**commands.body(BOX, op, args or {}, key, now=NOW), **over}, key)


TOPIC = f"appliance/{BOX}/cmd"


def test_a_good_ping_answers_200_and_a_queue_op_goes_through_the_control_handler(local: Local) -> None:
    assert local.cmds.handle(TOPIC, signed(local.key), now=NOW)["code"] == 200
    res = local.cmds.handle(TOPIC, signed(local.key, "hold", {"id": "seg-1"}), now=NOW)
    assert res["code"] == 200 and res["result"] == [{"id": "seg-1", "result": "hold"}]
    kid = commands.key_id(local.key.public_key())
    assert local.calls == [("queue.change", {"verb": "hold", "id": "seg-1", "all": False,
                                             "_operator": f"ops-center:{kid}"})]


@pytest.mark.parametrize(("payload", "code"), [
    (lambda k: b"not json", 400),
    (lambda k: json.dumps({"body": json.dumps({"cmd_id": "x"}), "sig": ""}).encode(), 400),
    (lambda k: json.dumps({"body": json.dumps(commands.body(BOX, "ping", {}, k, now=NOW)),  # not canonical
                           "sig": ""}).encode(), 400),
    (lambda k: b"x" * (commands.MAX_COMMAND_BYTES + 1), 400),
    (lambda k: signed(Ed25519PrivateKey.generate()), 403),
    (lambda k: signed(k, key_id="0" * 16), 403),
    (lambda k: signed(k, box="other-box"), 422),
    (lambda k: signed(k, expires_at=NOW + commands.MAX_TTL_S + 10), 422),
    (lambda k: signed(k, issued_at=NOW - 600, expires_at=NOW - 300), 410),
    (lambda k: signed(k, op="shell"), 404),
    (lambda k: signed(k, "hold", {"id": "a", "all": True}), 422),
    (lambda k: signed(k, "hold", {"path": "/etc"}), 422),
    (lambda k: signed(k, issued_at=float("nan")), 400),
    (lambda k: signed(k, "pause", {"for": 60}), 422),
    (lambda k: signed(k, "off", {}), 422),
    (lambda k: signed(k, "off", {"destination": "../etc"}), 422),
    (lambda k: signed(k, "log_level", {"level": "trace"}), 422),
    (lambda k: signed(k, "replay_events", {"since": -1}), 422),
    (lambda k: signed(k, "replay_events", {"since": "1e3"}), 422),
], ids=["not-json", "fields", "not-canonical", "too-big", "unknown-key", "wrong-key-id", "other-box",
        "lifetime", "expired", "unknown-op", "id-and-all", "bad-arg", "nan", "pause-args", "off-no-name",
        "off-bad-name", "log-level", "since-negative", "since-text"])
def test_each_refusal_has_its_code_and_is_audited(local: Local, payload: Any, code: int) -> None:
    res = local.cmds.handle(TOPIC, payload(local.key), now=NOW)
    assert (res["code"], res["ok"]) == (code, False), res
    assert f"{code} " in opened(local.audit_log)


@pytest.mark.parametrize(("op", "args", "handler", "passed"), [
    ("pause", {}, "forward.switch", {"verb": "pause"}),
    ("resume", {}, "forward.switch", {"verb": "resume"}),
    ("off", {"destination": "pacs-a"}, "forward.switch", {"verb": "off", "destination": "pacs-a"}),
    ("on", {"destination": "pacs-a"}, "forward.switch", {"verb": "on", "destination": "pacs-a"}),
    ("log_level", {"level": "warning"}, "log.level", {"level": "warning"}),
    ("replay_events", {"since": "12"}, "events.replay", {"since": 12}),
    ("replay_events", {"since": 0}, "events.replay", {"since": 0}),
])
def test_the_switches_and_the_log_level_go_to_their_control_handler_which_audits_them(
        tmp_path: Path, op: str, args: dict[str, Any], handler: str, passed: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.generate()
    calls: list[tuple[str, dict[str, Any]]] = []

    def record(name: str) -> Any:
        return lambda a: calls.append((name, a)) or {"changed": True}

    trail = AuditTrail(tmp_path / "audit", BOX, "EDGE", AUDIT_KEY, 1 << 20, 2)
    seen = commands.Seen(tmp_path)
    c = commands.Commands(BOX, {commands.key_id(key.public_key()): key.public_key()}, seen,
                          {"forward.switch": record("forward.switch"), "log.level": record("log.level"),
                           "events.replay": record("events.replay")},
                          trail, summary=lambda snap: {}, synced=lambda: True)
    try:
        res = c.handle(TOPIC, signed(key, op, args), now=NOW)
    finally:
        seen.close()
    assert res["code"] == 200, res
    kid = commands.key_id(key.public_key())
    assert calls == [(handler, {**passed, "_operator": f"ops-center:{kid}"})]
    # the daemon's handler audits a change itself; a replay changes nothing and is audited here
    assert (tmp_path / "audit" / "audit.log").exists() == (handler == "events.replay")


def test_an_unknown_item_is_404_from_the_queue_handler_which_audits_it_itself(local: Local) -> None:
    res = local.cmds.handle(TOPIC, signed(local.key, "hold", {"id": "missing"}), now=NOW)
    assert (res["code"], res["detail"]) == (404, "no item missing")
    assert [c[0] for c in local.calls] == ["queue.change"]
    trail = opened(local.audit_log) if local.audit_log.exists() else ""
    assert "ops hold" not in trail  # the daemon's change_audited writes that entry


def test_a_command_on_another_boxs_topic_is_refused_422(local: Local) -> None:
    assert local.cmds.handle("appliance/other-box/cmd", signed(local.key), now=NOW)["code"] == 422


def test_an_unsynchronised_clock_refuses_a_good_command_503(local: Local) -> None:
    local.cmds.synced = lambda: False
    assert local.cmds.handle(TOPIC, signed(local.key), now=NOW)["code"] == 503
    local.cmds.synced = lambda: None  # unknown is not synchronised
    assert local.cmds.handle(TOPIC, signed(local.key), now=NOW)["code"] == 503


def test_a_replay_is_refused_409_even_after_a_restart(local: Local, tmp_path: Path) -> None:
    first = signed(local.key, nonce="N" * 20)
    assert local.cmds.handle(TOPIC, first, now=NOW)["code"] == 200
    assert local.cmds.handle(TOPIC, signed(local.key, nonce="N" * 20), now=NOW)["code"] == 409
    local.cmds.seen.close()
    local.cmds.seen = reopened = commands.Seen(tmp_path)  # the record is on disk
    try:
        assert local.cmds.handle(TOPIC, first, now=NOW)["code"] == 409
    finally:
        reopened.close()


def test_the_replay_record_forgets_expired_commands_and_is_bounded(tmp_path: Path) -> None:
    seen = commands.Seen(tmp_path, limit=2)
    try:
        seen.add("a", "n" * 16, NOW + 10, NOW)
        seen.add("b", "m" * 16, NOW + 10, NOW)
        with pytest.raises(commands.Refused) as full:
            seen.add("c", "o" * 16, NOW + 10, NOW)
        assert full.value.code == 429
        seen.add("c", "o" * 16, NOW + 100, NOW + 11)  # a and b expired and were dropped
    finally:
        seen.close()


# --- a real broker and daemon -----------------------------------------------------------


@dataclass
class Site:
    root: Path
    ca: Path
    broker: Broker
    key_path: Path
    key: Ed25519PrivateKey
    box: Appliance

    def audit(self) -> list[tuple[str, str, str]]:
        """(user, outcome, description) of each audited command."""
        log = self.box.state_dir / "audit" / "audit.log"
        out = []
        shown = cli("audit", "show", "--config", str(self.box.config_path)) if log.exists() else None
        for line in shown.stdout.encode().splitlines() if shown is not None else []:
            m = ET.fromstring(line)  # noqa: S314 - our own output, read back
            desc = m.find("EventIdentification/EventOutcomeDescription")
            who = m.find("ActiveParticipant")
            if desc is not None and who is not None and (desc.text or "").startswith(("ops ", "queue ")):
                ident = m.find("EventIdentification")
                assert ident is not None
                out.append((who.get("UserID", ""), ident.get("EventOutcomeIndicator", ""), desc.text or ""))
        return out

    def send(self, op: str, *args: str) -> tuple[int, dict[str, Any]]:
        r = cli("fleet", "send", BOX, op, *args, "--key", str(self.key_path), "--ca", str(self.ca),
                "--port", str(self.broker.port), "--timeout", "20")
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}

    def raw(self, cmd: dict[str, Any], key: Ed25519PrivateKey | None = None,
            payload: bytes | None = None) -> dict[str, Any]:
        got = publish_and_wait("127.0.0.1", self.broker.port, self.ca, BOX,
                               payload or commands.envelope(cmd, key or self.key), cmd["cmd_id"], 20)
        assert got is not None, self.box.log_text()
        return got


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("commands")
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    key_path = root / "center" / "command.key"
    broker = Broker(root / "broker", ca).start()
    cfg = base_config(root / "box", free_port())
    cfg["appliance"]["name"] = BOX
    cfg["operations"] = ops_section(root / "box", broker, ca, root / "center")
    # the outbox folder is missing: the bundle waits (deferred) until the test makes it
    cfg["queue"] = {"retry_min_s": 120, "retry_max_s": 120, "down_after": 100}
    cfg["pack"] = {"study_quiet_s": 1}
    box = Appliance(root / "box", cfg)  # `keys init`: the box's MQTT key and CSR
    sign(ca, root / "box" / "keys" / "mqtt.csr")
    box.env["APPLIANCE_CLOCK_SYNCED"] = "1"
    box.start()
    try:
        key = crypto.load_private_key_of(key_path, Ed25519PrivateKey, "Ed25519")
        s = Site(root, ca, broker, key_path, key, box)
        wait_for(lambda: s.send("ping")[0] == 0, 60, "the box answers a ping", detail=box.log_text)
        yield s
    finally:
        box.stop()
        box.kill9()
        broker.stop()


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_fleet_send_hold_then_release_delivers_the_held_bundle(site: Site) -> None:
    outbox = Path(site.box.cfg["destinations"][0]["path"])
    assert storescu(site.box.port, canary_study(site.root / "study")).returncode == 0
    wait_for(lambda: site.box.status()["queue"].get("deferred"), 60, "the bundle deferred (no folder)",
             detail=site.box.log_text)
    rc, held = site.send("hold", "--arg", "all=true")
    assert rc == 0 and held["code"] == 200, held
    [item] = held["result"]
    assert item["result"] == "hold"
    assert site.box.status()["queue"].get("held") == 1
    outbox.mkdir()
    rc, released = site.send("release", "--arg", f"id={item['id']}")
    assert rc == 0 and released["code"] == 200, released
    assert released["result"] == [{"id": item["id"], "result": "release"}]
    wait_for(lambda: site.box.status()["queue"].get("delivered") == 1, 60, "the released bundle delivered",
             detail=site.box.log_text)
    assert any(outbox.iterdir())
    kid = commands.key_id(site.key.public_key())
    audited = [(u, d.rsplit(": ", 1)[0]) for u, _, d in site.audit()]
    assert (f"ops-center:{kid}", "queue hold all") in audited
    assert (f"ops-center:{kid}", f"queue release {item['id']}") in audited


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_status_answers_without_patient_data_and_shows_in_appliance_status(site: Site) -> None:
    rc, res = site.send("status")
    assert rc == 0 and res["code"] == 200 and res["result"]["name"] == BOX
    assert {"receive", "pack", "forward", "ops"} <= set(res["result"]["stages"])
    text = json.dumps(res)
    assert not any(v.split("^")[0] in text for v in CANARY.values())
    r = cli("status", "--config", str(site.box.config_path))
    assert "last command status -> 200" in r.stdout, r.stdout


def refused_and_audited(site: Site, res: dict[str, Any], code: int, op: str = "ping") -> None:
    assert (res["code"], res["ok"]) == (code, False), res
    wait_for(lambda: any(o != "0" and d.startswith(f"ops {op} -: {code} ") for _, o, d in site.audit()),
             10, f"the {code} refusal audited")


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_a_command_signed_with_an_unknown_key_is_refused_403(site: Site) -> None:
    other = Ed25519PrivateKey.generate()
    cmd = {**commands.body(BOX, "ping", {}, other, now=time.time()),
           "key_id": commands.key_id(site.key.public_key())}  # claims the center's key
    refused_and_audited(site, site.raw(cmd, other), 403)
    assert rc_of(site.raw(commands.body(BOX, "ping", {}, other, now=time.time()), other)) == 403


def rc_of(res: dict[str, Any]) -> int:
    return int(res["code"])


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_a_command_naming_another_box_is_refused_422(site: Site) -> None:
    cmd = commands.body("other-box", "ping", {}, site.key, now=time.time())
    refused_and_audited(site, site.raw(cmd), 422)


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_an_expired_command_is_refused_410(site: Site) -> None:
    cmd = commands.body(BOX, "ping", {}, site.key, now=time.time() - 120, ttl_s=60)
    refused_and_audited(site, site.raw(cmd), 410)


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_a_replayed_nonce_is_refused_409(site: Site) -> None:
    first = commands.body(BOX, "ping", {}, site.key, now=time.time())
    assert rc_of(site.raw(first)) == 200
    again = {**commands.body(BOX, "ping", {}, site.key, now=time.time()), "nonce": first["nonce"]}
    refused_and_audited(site, site.raw(again), 409)
    assert rc_of(site.raw(first)) == 409  # the very same message again


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_fleet_send_pauses_and_switches_off_through_the_daemon_and_the_box_says_so(site: Site) -> None:
    try:
        assert site.send("pause")[1]["code"] == 200
        rc, off = site.send("off", "--arg", "destination=outbox")
        assert rc == 0 and off["result"] == {"verb": "off", "target": "outbox", "changed": True}, off
        st = site.box.status()
        kid = commands.key_id(site.key.public_key())
        assert st["forward"]["paused"]["by"] == f"ops-center:{kid}"
        assert [d["state"] for d in st["destinations"]] == ["off"]
        assert site.send("off", "--arg", "destination=nowhere")[1]["code"] == 404
        assert site.send("log_level", "--arg", "level=debug")[1]["code"] == 422  # needs a restart
    finally:
        assert site.send("resume")[1]["code"] == 200
        assert site.send("on", "--arg", "destination=outbox")[1]["code"] == 200
    st = site.box.status()
    assert st["forward"]["paused"] is None and [d["state"] for d in st["destinations"]] == ["up"]
    trail = [d for _, _, d in site.audit()]
    assert not [d for d in trail if d.startswith("ops ") and " off " in d]  # the daemon audits these


@pytest.mark.peers
@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")
def test_fleet_send_diagnostics_puts_the_parts_together_and_no_patient_data_is_in_them(site: Site) -> None:
    out = site.root / "diag.json"
    rc, res = site.send("diagnostics", "--out", str(out))
    assert rc == 0 and res["code"] == 200, res
    assert res["result"]["parts"] >= 1 and len(res["result"]["sha256"]) == 64
    doc = json.loads(out.read_text())
    assert doc["name"] == BOX and doc["status"]["name"] == BOX
    assert doc["config"]["operations"]["heartbeat_s"] == 2
    assert "ops.command" in {e["event"] for e in doc["log"]}
    text = out.read_text()
    assert not any(part in text for v in CANARY.values() for part in v.split("^"))
    r = cli("fleet", "send", BOX, "diagnostics", "--key", str(site.key_path), "--ca", str(site.ca),
            "--port", str(site.broker.port))
    assert r.returncode == 64 and "--out" in r.stderr
