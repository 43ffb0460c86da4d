"""Diagnostics by SFTP (appliance/ops/diagdrop.py, [operations.diagnostics]).

Without peers: the config table (keys, pins, ranges) and `config check`'s look at its
files; the reason classes of the transport's failures. Against a real OpenSSH sshd
(tests/sshd.py): the uploaded document is the one the MQTT parts carry, without the
patient data a log event tried to carry; a changed host key is refused; a server that
never answers fails within timeout_s; and the command handler (ops/commands.py) defers
the upload and answers it, or refuses `to: sftp` with no place configured (422).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditTrail
from appliance.core import config
from appliance.core.config import DiagnosticsPlace
from appliance.core.errors import ConfigError
from appliance.forward import Permanent, Retryable
from appliance.ops import commands, diagdrop, diagnostics
from appliance.ops.messages import REASON_CLASSES
from tests.peers import base_config, cli, to_toml
from tests.sshd import REMOTE_DIR, Sshd, fingerprint, keygen
from tests.test_ops_link import CANARY

BOX = "diag-box"
MAIN = Path("/etc/appliance/appliance.toml")
FP = "SHA256:" + "A" * 43


# --- the config table (no peers) ------------------------------------------------------


def ops_with(place: dict[str, Any]) -> dict[str, Any]:
    return {"appliance": {"name": BOX}, "receive": {"callers": [{"ae_title": "CT"}]},
            "operations": {"host": "ops.example", "ca": "/k/ca.pem", "cert": "/k/c.pem",
                           "key": "/k/c.key", "diagnostics": place}}


PLACE = {"sftp_host": "10.8.0.1", "user": "diag", "key": "/k/diag_ed25519", "known_hosts": "/k/kh"}


def problems(place: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(ops_with(place), {}, MAIN)
    return list(e.value.problems)


def test_the_place_parses_with_its_documented_defaults() -> None:
    ops = config.parse(ops_with(PLACE), {}, MAIN).operations
    assert ops is not None and ops.diagnostics == DiagnosticsPlace(
        sftp_host="10.8.0.1", user="diag", key=Path("/k/diag_ed25519"), known_hosts=Path("/k/kh"),
        sftp_port=22, dir=".", timeout_s=30.0, link_timeout_s=6.0)


def test_without_the_table_there_is_no_place() -> None:
    data = ops_with(PLACE)
    del data["operations"]["diagnostics"]
    ops = config.parse(data, {}, MAIN).operations
    assert ops is not None and ops.diagnostics is None


def test_a_place_without_a_host_key_pin_is_refused_naming_the_key() -> None:
    place = {k: v for k, v in PLACE.items() if k != "known_hosts"}
    assert problems(place) == ["/etc/appliance/appliance.toml: operations.diagnostics.known_hosts:"
                               " or host_key_sha256 is required (the server's host key)"]


def test_a_place_with_both_pins_is_refused() -> None:
    [p] = problems({**PLACE, "host_key_sha256": FP})
    assert "operations.diagnostics.host_key_sha256: and known_hosts are both set" in p


def test_a_fingerprint_not_in_ssh_keygen_form_is_refused() -> None:
    place = {k: v for k, v in PLACE.items() if k != "known_hosts"}
    [p] = problems({**place, "host_key_sha256": "SHA256:short"})
    assert "operations.diagnostics.host_key_sha256: must be SHA256: and 43 base64" in p


@pytest.mark.parametrize(("key", "value", "says"), [
    ("sftp_port", 0, "must be"), ("timeout_s", 1, "must be"), ("link_timeout_s", 1, "must be"),
    ("sftp_host", "not a host!", "DNS name"), ("sftp_login", "x", "unknown key")])
def test_each_bad_key_is_named(key: str, value: Any, says: str) -> None:
    [p] = problems({**PLACE, key: value})
    assert f"operations.diagnostics.{key}: " in p and says in p


def test_config_check_names_a_missing_key_file_and_a_known_hosts_without_the_server(tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "box", 11112)
    (tmp_path / "box" / "outbox").mkdir(parents=True)
    other = tmp_path / "kh"
    other.write_text("[10.9.9.9]:2222 ssh-ed25519"
                     " AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    cfg["appliance"]["name"] = BOX
    cfg["operations"] = {"host": "127.0.0.1", "ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "c.pem"),
                         "key": str(tmp_path / "c.key"),
                         "diagnostics": {**PLACE, "key": str(tmp_path / "nokey"), "known_hosts": str(other)}}
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    cli("keys", "init", "--config", str(path), check=True)
    r = cli("config", "check", "--config", str(path))
    assert r.returncode != 0
    assert f"operations.diagnostics.key: key file {tmp_path / 'nokey'} does not exist" in r.stderr, r.stderr
    assert f"operations.diagnostics.known_hosts: {other} has no key for 10.8.0.1" in r.stderr, r.stderr


# --- reason classes (pure) -----------------------------------------------------------


@pytest.mark.parametrize(("error", "reason"), [
    (Permanent("the server's host key ssh-ed25519 SHA256:x is not the pinned host_key_sha256"), "host key"),
    (Permanent("the server refused this box's key (ssh-ed25519 SHA256:x) for user 'd'"), "rejected"),
    (Retryable("127.0.0.1:22 did not answer within 5 s while doing the SSH handshake"), "timeout"),
    (Retryable("127.0.0.1:22 refused the connection (is the SFTP server running?)"), "refused"),
    (Retryable("cannot resolve sftp.example: Name or service not known"), "unreachable"),
    (Retryable("the connection to h:22 failed while uploading: Connection reset by peer"), "connection lost"),
    (Retryable("the server denied access while uploading"), "failed")])
def test_a_transport_failure_becomes_a_reason_class_the_ops_link_may_send(error: Exception,
                                                                          reason: str) -> None:
    assert isinstance(error, Permanent | Retryable)
    assert diagdrop.failure_class(error) == reason
    assert reason in REASON_CLASSES


# --- against a real sshd ---------------------------------------------------------------


def place_of(server: Sshd, **over: Any) -> DiagnosticsPlace:
    d = server.destination()
    assert d.host and d.port and d.key
    kw: dict[str, Any] = {"sftp_host": d.host, "sftp_port": d.port, "user": d.user or "", "key": d.key,
                          "known_hosts": d.known_hosts, "dir": REMOTE_DIR, "timeout_s": 10.0, **over}
    return DiagnosticsPlace(**kw)


def document() -> dict[str, Any]:
    """A diagnostics document whose log ring was handed patient data (a peer's text)."""
    recent = diagnostics.Recent()
    recent("forward.failed", {"level": "warning", "reason": f"PACS: patient {CANARY['PatientName']} refused",
                              "bundle": "b-1"})
    recent("forward.failed", {"level": "warning", "detail": f"{CANARY['StudyDescription']} for"
                              f" {CANARY['PatientID']}, {CANARY['AccessionNumber']}"})
    snap = {"name": BOX, "queue": {"delivered": 1}}
    return diagnostics.collect(snap, {"operations": {"host": "ops.example"}}, recent.events(), now=1.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Sshd]:
    with Sshd(tmp_path / "sshd") as s:
        yield s


def test_the_uploaded_document_is_the_one_the_mqtt_parts_carry_without_patient_data(server: Sshd) -> None:
    drop = diagdrop.Drop(BOX, place_of(server))
    doc = document()
    assert drop.reserve()
    res = drop.upload(doc, "c0ffee01")
    uploaded = server.drop / f"{BOX}-c0ffee01.json"
    assert res["file"] == f"{REMOTE_DIR}/{BOX}-c0ffee01.json" and res["to"] == "sftp"
    raw = uploaded.read_bytes()
    assert res["bytes"] == len(raw)
    assert res["sha256"] == hashlib.sha256(raw).hexdigest()
    assembler = diagnostics.Assembler("c0ffee01")
    for part in diagnostics.parts(diagnostics.pack(doc), "c0ffee01")[0]:
        assembler.add(part)
    assert json.loads(raw) == assembler.document()
    assert not list(server.drop.glob("*.part"))
    text = raw.decode()
    assert not any(part in text for v in CANARY.values() for part in v.split("^"))
    assert [e["event"] for e in json.loads(raw)["log"]] == ["forward.failed", "forward.failed"]
    assert drop.reserve()  # the slot is free again


def test_a_changed_host_key_is_refused_and_nothing_is_uploaded(server: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host")
    kh = tmp_path / "known_hosts.changed"
    kh.write_text(server.known_hosts_line(other.with_suffix(".pub")))
    drop = diagdrop.Drop(BOX, place_of(server, known_hosts=kh))
    assert drop.reserve()
    with pytest.raises(diagdrop.Failed) as e:
        drop.upload(document(), "c0ffee02")
    assert e.value.reason == "host key"
    assert list(server.drop.iterdir()) == []


def test_a_changed_fingerprint_pin_is_refused_too(server: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host")
    drop = diagdrop.Drop(BOX, place_of(server, known_hosts=None,
                                       host_key_sha256=fingerprint(other.with_suffix(".pub"))))
    assert drop.reserve()
    with pytest.raises(diagdrop.Failed) as e:
        drop.upload(document(), "c0ffee03")
    assert e.value.reason == "host key"


def test_a_server_that_never_answers_fails_within_timeout_s() -> None:
    """TCP is accepted (the kernel's backlog) but no SSH banner ever comes."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        place = DiagnosticsPlace(sftp_host="127.0.0.1", sftp_port=mute.getsockname()[1], user="root",
                                 key=Path("/nonexistent"), host_key_sha256=FP, dir="/drop",
                                 timeout_s=5.0, link_timeout_s=3.0)
        drop = diagdrop.Drop(BOX, place)
        assert drop.reserve()
        start = time.monotonic()
        with pytest.raises(diagdrop.Failed) as e:
            drop.upload(document(), "c0ffee04")
        took = time.monotonic() - start
    assert e.value.reason == "timeout"
    assert took < 5.0 + 3.0, took


# --- the command handler (ops/commands.py) ------------------------------------------------


AUDIT_KEY = bytes(range(32))


def handler(tmp_path: Path, drop: diagdrop.Drop | None) -> tuple[commands.Commands, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    trail = AuditTrail(tmp_path / "audit", BOX, "EDGE", AUDIT_KEY, 1 << 20, 2)
    c = commands.Commands(BOX, {commands.key_id(key.public_key()): key.public_key()},
                          commands.Seen(tmp_path), {"diagnostics": lambda a: document()}, trail,
                          summary=lambda snap: snap, synced=lambda: True, drop=drop)
    return c, key


def run(c: commands.Commands, key: Ed25519PrivateKey, args: dict[str, Any]) -> dict[str, Any]:
    cmd = commands.body(BOX, "diagnostics", args, key, now=time.time())
    return c.handle(f"appliance/{BOX}/cmd", commands.envelope(cmd, key))


def test_to_sftp_without_a_place_is_refused_422(tmp_path: Path) -> None:
    c, key = handler(tmp_path, None)
    res = run(c, key, {"to": "sftp"})
    assert (res["code"], res["ok"]) == (422, False)
    assert "no [operations.diagnostics]" in res["detail"] and "_later" not in res


def test_to_anything_but_sftp_is_refused_422(tmp_path: Path) -> None:
    c, key = handler(tmp_path, None)
    assert run(c, key, {"to": "ftp"})["code"] == 422


def test_to_sftp_defers_the_upload_and_its_result_names_the_file(server: Sshd, tmp_path: Path) -> None:
    c, key = handler(tmp_path, diagdrop.Drop(BOX, place_of(server)))
    first = run(c, key, {"to": "sftp"})
    assert set(first) == {"_later"}
    assert run(c, key, {"to": "sftp"})["code"] == 429  # one upload at a time
    res = first["_later"]()
    assert (res["code"], res["ok"]) == (200, True), res
    name = res["result"]["file"].rsplit("/", 1)[1]
    assert name == f"{BOX}-{res['cmd_id']}.json"
    assert (server.drop / name).stat().st_size == res["result"]["bytes"]
    assert "_parts" not in res


def test_a_failed_upload_answers_502_with_a_reason_class_only(server: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host")
    drop = diagdrop.Drop(BOX, place_of(server, known_hosts=None,
                                       host_key_sha256=fingerprint(other.with_suffix(".pub"))))
    c, key = handler(tmp_path, drop)
    res = run(c, key, {"to": "sftp"})["_later"]()
    assert (res["code"], res["result"]) == (502, {"to": "sftp", "reason": "host key"})
    assert "SHA256" not in json.dumps(res) and "127.0.0.1" not in json.dumps(res)
