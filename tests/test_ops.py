"""The ops link's pure and local parts: [operations] config, the outbox, the payloads,
the fleet CA and the certificate checks of `config check` (no broker: test_ops_link.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from appliance.core import config
from appliance.core.errors import ConfigError, UsageError
from appliance.ops import messages, pki
from appliance.ops.outbox import Outbox
from tests.peers import REPO, base_config, cli, to_toml

OPS = {"host": "ops.example", "ca": "/k/ca.pem", "cert": "/k/mqtt.pem", "key": "/k/mqtt.key"}


def parse(**sections: Any) -> config.Config:
    data: dict[str, Any] = {"receive": {"callers": [{"ae_title": "CT"}]}, **sections}
    return config.parse(data, {}, Path("/etc/appliance/appliance.toml"))


def problems(**sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(**sections)
    return e.value.problems


# --- config ---


def test_no_operations_table_means_no_link() -> None:
    assert parse().operations is None


def test_operations_defaults_are_the_issues() -> None:
    o = parse(appliance={"name": "box-1"}, operations=OPS).operations
    assert o is not None
    assert (o.port, o.heartbeat_s, o.keepalive_s, o.command_keys, o.metrics_bind) == \
        (8883, 15.0, 30, (), "127.0.0.1:9110")
    assert o.cert == Path("/k/mqtt.pem")


@pytest.mark.parametrize(("key", "value", "says"), [
    ("port", 0, "operations.port"), ("heartbeat_s", 0, "operations.heartbeat_s"),
    ("keepalive_s", 2, "operations.keepalive_s"), ("metrics_bind", "localhost", "operations.metrics_bind"),
    ("command_keys", "one.pub", "operations.command_keys"), ("colour", "red", "operations.colour"),
])
def test_a_bad_operations_value_names_its_key(key: str, value: Any, says: str) -> None:
    ps = problems(appliance={"name": "box-1"}, operations={**OPS, key: value})
    assert len(ps) == 1 and says in ps[0], ps


def test_operations_requires_host_and_certificates() -> None:
    ps = problems(appliance={"name": "box-1"}, operations={"port": 8883})
    assert {p.split(": ")[1] for p in ps} == {f"operations.{k}" for k in ("host", "ca", "cert", "key")}


def test_metrics_bind_empty_is_off() -> None:
    o = parse(appliance={"name": "box-1"}, operations={**OPS, "metrics_bind": ""}).operations
    assert o is not None and o.metrics_bind == ""


def test_an_uppercase_name_is_refused_only_with_an_ops_link() -> None:
    assert parse(appliance={"name": "Box-1"}).appliance.name == "Box-1"
    ps = problems(appliance={"name": "Box-1"}, operations=OPS)
    assert len(ps) == 1 and "appliance.name" in ps[0] and "lowercase" in ps[0]


# --- outbox ---


def test_outbox_deletes_an_event_only_when_acknowledged(tmp_path: Path) -> None:
    o = Outbox(tmp_path)
    a, b = o.add(1.0, {"kind": "x"}), o.add(2.0, {"kind": "y"})
    assert [s for s, _, _ in o.pending()] == [a, b] == [1, 2]
    o.ack(a)
    assert [s for s, _, _ in o.pending()] == [b]
    o.close()
    assert [s for s, _, _ in Outbox(tmp_path).pending()] == [b]  # on disk


def test_outbox_overflow_drops_the_oldest_and_counts_the_gap(tmp_path: Path) -> None:
    o = Outbox(tmp_path, max_events=3)
    for i in range(5):
        o.add(float(i), {"kind": "x", "i": i})
    assert [s for s, _, _ in o.pending()] == [3, 4, 5]
    assert o.counts() == {"waiting": 3, "dropped": 2, "last_seq": 5}


def test_acknowledged_events_are_kept_up_to_keep_acked_for_a_replay(tmp_path: Path) -> None:
    o = Outbox(tmp_path, keep_acked=3)
    for i in range(6):
        o.ack(o.add(float(i), {"kind": "x", "i": i}))
    assert o.pending() == [] and o.counts()["waiting"] == 0
    got = o.replay(since=4)
    assert got == {"replayed": 2, "first": 4, "last_seq": 6}  # 1-3 are gone: the center sees first=4
    assert [s for s, _, _ in o.pending()] == [5, 6]
    assert o.replay(since=0)["replayed"] == 1  # 4 (5 and 6 wait already)
    assert [s for s, _, _ in o.pending()] == [4, 5, 6]


def test_a_replay_never_drops_and_kept_events_do_not_count_against_max_events(tmp_path: Path) -> None:
    o = Outbox(tmp_path, max_events=2, keep_acked=10)
    for i in range(4):
        o.ack(o.add(float(i), {"kind": "x"}))
    o.add(9.0, {"kind": "y"})
    o.add(9.0, {"kind": "y"})
    assert o.counts() == {"waiting": 2, "dropped": 0, "last_seq": 6}


def test_an_outbox_of_the_version_before_keeps_its_waiting_events(tmp_path: Path) -> None:
    import sqlite3
    (tmp_path / "ops").mkdir()
    db = sqlite3.connect(tmp_path / "ops" / "outbox.db")
    db.executescript("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, body TEXT NOT NULL);"
                     "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
                     "INSERT INTO events VALUES (7, 1.0, '{\"kind\":\"x\"}');"
                     "INSERT INTO meta VALUES ('event_seq', 7);")
    db.commit()
    db.close()
    o = Outbox(tmp_path)
    assert [s for s, _, _ in o.pending()] == [7] and o.add(2.0, {"kind": "y"}) == 8


def test_conn_seq_grows_across_reopen(tmp_path: Path) -> None:
    o = Outbox(tmp_path)
    first = [o.next_conn_seq(), o.next_conn_seq()]
    o.close()
    assert Outbox(tmp_path).next_conn_seq() == first[-1] + 1 == 3


def test_event_seq_continues_after_every_event_was_acknowledged(tmp_path: Path) -> None:
    o = Outbox(tmp_path)
    o.ack(o.add(1.0, {"kind": "x"}))
    o.close()
    assert Outbox(tmp_path).add(2.0, {"kind": "x"}) == 2


# --- payloads ---


def test_an_event_keeps_only_its_listed_fields() -> None:
    body = messages.event_body("instance.parked", {"bundle": "b1", "item": "b1p3", "destination": "pacs",
                                                    "reason": "peer said DOE^JANE", "event": "x"})
    assert body == {"kind": "instance.parked", "bundle": "b1", "item": "b1p3", "destination": "pacs"}


def test_a_destination_reason_leaves_only_as_a_known_class() -> None:
    down = messages.event_body("destination.down", {"destination": "pacs", "reason": "timeout"})
    odd = messages.event_body("destination.down", {"destination": "pacs", "reason": "DOE^JANE"})
    assert down is not None and down["reason"] == "timeout"
    assert odd is not None and odd["reason"] == "other"


def test_every_failover_reason_class_is_a_known_class() -> None:
    from appliance.forward import failover

    classes = {cls for _, cls in failover._CLASSES} | {failover.reason_class("x", True),
                                                        failover.reason_class("x", False)}
    assert classes <= messages.REASON_CLASSES


def test_every_reason_an_update_step_gives_is_a_known_class() -> None:
    """The update worker and the root install side name reasons in their result records
    (update/*.py); one missing from REASON_CLASSES would reach the center as "other"."""
    import re

    from tests.peers import REPO

    said = {m for p in (REPO / "appliance" / "update").glob("*.py")
            for m in re.findall(r'(?:"reason": |reason=)"([^"]+)"', p.read_text())}
    assert said and said <= messages.REASON_CLASSES, said - messages.REASON_CLASSES


def test_a_log_event_not_listed_is_not_an_ops_event() -> None:
    assert messages.event_body("instance.stored", {"bundle": "b1"}) is None


def test_a_stuck_stage_event_names_the_stages_only() -> None:
    problems = ["pack: segment without progress for 300 s"]
    body = messages.event_body("watchdog.withheld", {"problems": problems})
    assert body == {"kind": "watchdog.withheld", "stages": ["pack"]}


def snapshot(refusals: int = 2) -> dict[str, Any]:
    return {"name": "box-1", "version": "0.1.0", "problems": [],
            "stages": {"pack": {"state": "stuck", "since_progress_s": 400.0, "progress": 7}},
            "queue": {"ready": 2}, "oldest_waiting_s": 60.0, "forward": {"parked": 1},
            "destinations": [{"name": "pacs", "state": "down", "since": 5.0, "last_error": "refused",
                              "failures": 3}],
            "spool": {"free_bytes": 10, "reserve_bytes": 5, "instances": 1, "bytes": 2},
            "receive": {"instances_received": 4,
                        "instances_refused": {f"reason-{i:04d}": i for i in range(refusals)}}}


def state(snap: dict[str, Any], now: float = 1000.0) -> dict[str, Any]:
    return messages.state(snap, seq=1, now=now, boot_id="b", conn_seq=2, certs={"mqtt": 9.0},
                          time_synced=True, outbox={"waiting": 0, "dropped": 0, "last_seq": 0})


def test_state_shows_a_stuck_stage_and_a_down_destination_by_class() -> None:
    st = state(snapshot())
    assert st["stages"]["pack"]["state"] == "stuck"
    assert st["destinations"] == [{"name": "pacs", "up": False, "off": False, "since": 5.0,
                                   "last_error": "refused", "failures": 3}]
    assert st["queue"] == {"items": {"ready": 2}, "oldest_unsent_ts": 940, "parked": 1, "paused": False}


def test_state_never_exceeds_8_kb() -> None:
    st = state(snapshot(refusals=2000))
    assert len(messages.dumps(st)) <= messages.STATE_MAX_BYTES and st["truncated"] is True


def test_state_change_ignores_the_clock_and_counters() -> None:
    later = {**snapshot(refusals=5), "oldest_waiting_s": 63.0}  # the same oldest item, 3 s on
    a, b = state(snapshot(), 1000.0), state(later, 1003.0)
    assert messages.comparable(a) == messages.comparable(b)
    c = snapshot()
    c["stages"]["pack"]["state"] = "idle"
    assert messages.comparable(a) != messages.comparable(state(c, 1003.0))


# --- fleet CA and certificates ---


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca") / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    return d


def test_keys_init_csr_carries_the_box_name_and_the_signed_cert_passes(ca: Path, tmp_path: Path) -> None:
    pki.box_key_and_csr("box-1", tmp_path / "mqtt.key", tmp_path / "mqtt.csr")
    assert (tmp_path / "mqtt.key").stat().st_mode & 0o077 == 0
    assert pki.sign_csr(pki.load_ca(ca), tmp_path / "mqtt.csr", tmp_path / "mqtt.pem") == "box-1"
    assert pki.cert_problems(tmp_path / "mqtt.pem", "box-1", ca / "ca.pem") == ([], [])


def test_a_second_keys_init_keeps_key_and_csr(tmp_path: Path) -> None:
    pki.box_key_and_csr("box-1", tmp_path / "k", tmp_path / "c")
    before = (tmp_path / "k").read_bytes(), (tmp_path / "c").read_bytes()
    lines = pki.box_key_and_csr("box-1", tmp_path / "k", tmp_path / "c")
    assert all("kept" in line for line in lines)
    assert ((tmp_path / "k").read_bytes(), (tmp_path / "c").read_bytes()) == before


@pytest.mark.parametrize("cn", ["Box-1", "ops-center", "ops-center-serve", "ops-center-x", "a/b", "box+1"])
def test_sign_refuses_a_cn_that_is_not_a_box_name(ca: Path, tmp_path: Path, cn: str) -> None:
    key = pki.new_key(tmp_path / "k")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    (tmp_path / "c.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(UsageError, match="CN must be one box name"):
        pki.sign_csr(pki.load_ca(ca), tmp_path / "c.csr", tmp_path / "c.pem")


def test_a_certificate_for_another_name_is_an_error(ca: Path, tmp_path: Path) -> None:
    pki.box_key_and_csr("box-2", tmp_path / "k", tmp_path / "c.csr")
    pki.sign_csr(pki.load_ca(ca), tmp_path / "c.csr", tmp_path / "c.pem")
    errors, _ = pki.cert_problems(tmp_path / "c.pem", "box-1", ca / "ca.pem")
    assert len(errors) == 1 and "'box-2'" in errors[0] and "'box-1'" in errors[0]


def test_a_certificate_expiring_within_30_days_warns(ca: Path, tmp_path: Path) -> None:
    pki.box_key_and_csr("box-1", tmp_path / "k", tmp_path / "c.csr")
    pki.sign_csr(pki.load_ca(ca), tmp_path / "c.csr", tmp_path / "c.pem", days=20)
    errors, warnings = pki.cert_problems(tmp_path / "c.pem", "box-1", ca / "ca.pem")
    assert errors == [] and len(warnings) == 1 and "expires" in warnings[0]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=21)
    assert "expired" in pki.cert_problems(tmp_path / "c.pem", "box-1", ca / "ca.pem", later)[0][0]


def test_a_certificate_from_another_ca_is_an_error(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.ca_init(other, ("127.0.0.1",))
    pki.box_key_and_csr("box-1", tmp_path / "k", tmp_path / "c.csr")
    pki.sign_csr(pki.load_ca(other), tmp_path / "c.csr", tmp_path / "c.pem")
    errors, _ = pki.cert_problems(tmp_path / "c.pem", "box-1", ca / "ca.pem")
    assert errors and "not signed by the fleet CA" in errors[0]


def test_fleet_ca_init_never_overwrites(ca: Path) -> None:
    with pytest.raises(UsageError, match="already holds a fleet CA"):
        pki.ca_init(ca, ("127.0.0.1",))


def test_fleet_ca_init_issues_one_client_certificate_per_center_client(ca: Path) -> None:
    names = [pki.common_name(pki.load_cert(ca / f"{cn}.pem").subject) for cn in pki.CENTER_CNS]
    assert names == ["ops-center", "ops-center-serve", "ops-center-status"]
    for cn in pki.CENTER_CNS:
        pki.load_cert(ca / f"{cn}.pem").verify_directly_issued_by(pki.load_ca(ca).cert)
        assert (ca / f"{cn}.key").stat().st_mode & 0o077 == 0


def test_fleet_ca_center_adds_the_missing_center_certificates_to_an_older_ca(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    for cn in ("ops-center-serve", "ops-center-status"):
        (d / f"{cn}.pem").unlink()
        (d / f"{cn}.key").unlink()  # a CA made before there were three
    before = (d / "ops-center.pem").read_bytes()
    lines = pki.center_init(d)
    assert lines[0].endswith("exists, kept") and all(line.endswith("created") for line in lines[1:])
    assert (d / "ops-center.pem").read_bytes() == before
    assert pki.common_name(pki.load_cert(d / "ops-center-status.pem").subject) == "ops-center-status"
    assert all(line.endswith("exists, kept") for line in pki.center_init(d))


def test_fleet_sign_enrols_each_box_once_in_the_roster_in_order(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    assert pki.read_roster(d) == []
    for name in ("ct-2", "ct-1", "ct-2"):  # ct-2 signed again (renewed)
        pki.box_key_and_csr(name, tmp_path / f"{name}.key", tmp_path / f"{name}.csr")
        pki.sign_csr(pki.load_ca(d), tmp_path / f"{name}.csr", tmp_path / f"{name}.pem")
    assert pki.read_roster(d) == ["ct-2", "ct-1"]
    lines = (d / pki.ROSTER).read_text().splitlines()
    serial = f"{pki.load_cert(tmp_path / 'ct-1.pem').serial_number:x}"
    assert lines[0].startswith("#") and len(lines) == 4 and lines[2].split(" ")[:2] == ["ct-1", serial]


FLEET_DEFINITIONS = REPO / "config" / "ops-center" / "rabbitmq" / "fleet-definitions"


@pytest.mark.parametrize("name", ["ops-center", "ops-center-serve", "ops-center-any"])
def test_fleet_definitions_refuse_a_center_name_for_a_box(name: str) -> None:
    r = subprocess.run(["sh", str(FLEET_DEFINITIONS), "ct-1", name], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and f"not a box name for RabbitMQ: {name}" in r.stderr


def test_fleet_definitions_let_only_ops_center_write_and_the_views_read_telemetry_only() -> None:
    r = subprocess.run(["sh", str(FLEET_DEFINITIONS), "ct-1"], capture_output=True, text=True, timeout=30)
    topics = {t["user"]: t for t in json.loads(r.stdout)["topic_permissions"]}
    assert set(topics) == {*pki.CENTER_CNS, "ct-1"}
    writes = {u: [k for k in ("appliance.ct-1.cmd", "appliance.ct-1.config", "appliance.ct-1.state")
                  if re.search(t["write"], k)] for u, t in topics.items() if u != "ct-1"}
    assert writes == {"ops-center": ["appliance.ct-1.cmd", "appliance.ct-1.config"],
                      "ops-center-serve": [], "ops-center-status": []}
    for view in ("ops-center-serve", "ops-center-status"):
        read = topics[view]["read"]
        assert [k for k in ("appliance.*.online", "appliance.ct-1.state", "appliance.*.events",
                            "appliance.ct-1.config", "appliance.ct-1.cmd.result", "appliance.#")
                if re.search(read, k)] == ["appliance.*.online", "appliance.ct-1.state", "appliance.*.events"]


def test_a_roster_line_that_is_not_a_box_name_is_skipped(tmp_path: Path) -> None:
    (tmp_path / pki.ROSTER).write_text("# comment\nct-1 1 x\n+ 2 x\n# 3\nops-center 4 x\nCT 5 x\n\nct-2\n")
    assert pki.read_roster(tmp_path) == ["ct-1", "ct-2"]


def signed(d: Path, tmp: Path, name: str, n: int = 1) -> Path:
    """Box `name` signed by the CA in `d` (its n-th certificate); the certificate."""
    key, csr, pem = tmp / f"{name}-{n}.key", tmp / f"{name}-{n}.csr", tmp / f"{name}-{n}.pem"
    pki.box_key_and_csr(name, key, csr)
    pki.sign_csr(pki.load_ca(d), csr, pem)
    return pem


def test_revoking_a_boxs_only_certificate_takes_it_out_of_the_roster(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    ct1, _ = signed(d, tmp_path, "ct-1"), signed(d, tmp_path, "ct-2")
    out = pki.reissue_crl(d, (ct1,))
    assert pki.read_roster(d) == ["ct-2"] and pki.revoked_boxes(d) == ["ct-1"]
    assert "left the roster: ct-1 (no unrevoked certificate; the fleet view drops it)" in out, out
    serial = f"{pki.load_cert(ct1).serial_number:x}"
    assert f"{pki.REVOKED_PREFIX}ct-1 {serial} " in (d / pki.ROSTER).read_text()


def test_a_box_with_a_newer_unrevoked_certificate_stays_in_the_roster(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    old, _ = signed(d, tmp_path, "ct-1", 1), signed(d, tmp_path, "ct-1", 2)  # renewed
    out = pki.reissue_crl(d, (old,))
    assert pki.read_roster(d) == ["ct-1"] and pki.revoked_boxes(d) == []
    assert "stays in the roster: ct-1 (a certificate of it is not revoked)" in out
    assert not any(line.startswith("left the roster") for line in out), out
    assert len((d / pki.ROSTER).read_text().splitlines()) == 3  # header, revoked line, the newer one


def test_a_roster_written_before_is_pruned_by_serial_and_keeps_a_name_alone(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    ct1 = signed(d, tmp_path, "ct-1")
    serial = pki.load_cert(ct1).serial_number
    (d / pki.ROSTER).write_text(f"ct-1 {serial:X} 2029-01-01T00:00:00Z\nct-0\n")  # upper-case hex, no header
    pki.reissue_crl(d, (ct1,))
    assert pki.read_roster(d) == ["ct-0"] and pki.revoked_boxes(d) == ["ct-1"]
    assert (d / pki.ROSTER).read_text().endswith("\nct-0\n")


def test_a_box_signed_anew_after_its_revocation_is_back_in_the_roster(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    pki.reissue_crl(d, (signed(d, tmp_path, "ct-1", 1),))
    signed(d, tmp_path, "ct-1", 2)
    assert pki.read_roster(d) == ["ct-1"] and pki.revoked_boxes(d) == []


def test_an_unwritable_roster_still_revokes_and_says_to_run_fleet_crl_again(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    ct1 = signed(d, tmp_path, "ct-1")
    (d / pki.ROSTER).unlink()
    (d / pki.ROSTER).mkdir()  # reading it is an OSError (IsADirectoryError)
    out = pki.reissue_crl(d, (ct1,))
    assert out[-1].startswith("roster: cannot update") and "run `fleet crl` again" in out[-1], out
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(pki.load_cert(ct1).serial_number) is not None


def test_fleet_crl_also_prunes_what_an_earlier_crl_revoked(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    ct1 = signed(d, tmp_path, "ct-1")
    before = (d / pki.ROSTER).read_bytes()
    pki.reissue_crl(d, (ct1,))
    (d / pki.ROSTER).write_bytes(before)  # a roster from before pruning, with a CRL that revokes ct-1
    assert "left the roster: ct-1" in " ".join(pki.reissue_crl(d))
    assert pki.read_roster(d) == []


# --- through the CLI ---


def test_config_check_fails_until_the_signed_cert_is_installed(ca: Path, tmp_path: Path) -> None:
    cfg = base_config(tmp_path, 11112)
    cfg["appliance"]["name"] = "box-1"
    keys = tmp_path / "keys"
    cfg["operations"] = {"host": "127.0.0.1", "ca": str(ca / "ca.pem"), "cert": str(keys / "mqtt.pem"),
                         "key": str(keys / "mqtt.key")}
    main = tmp_path / "appliance.toml"
    main.write_text(to_toml(cfg))
    r = cli("keys", "init", "--config", str(main))
    assert r.returncode == 0 and "mqtt csr" in r.stdout, r.stderr
    r = cli("config", "check", "--config", str(main))
    assert r.returncode == 78 and "operations.cert" in r.stderr
    r = cli("fleet", "sign", str(keys / "mqtt.csr"), "--ca", str(ca), "--days", "10")
    assert r.returncode == 0 and r.stdout.startswith("box-1:"), r.stderr
    r = cli("config", "check", "--config", str(main), "--json")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "expires" in r.stderr
    assert json.loads(r.stdout)["operations"]["port"] == 8883


def test_config_check_names_a_command_key_that_is_not_an_ed25519_public_key(ca: Path, tmp_path: Path) -> None:
    from appliance.core import crypto

    cfg = base_config(tmp_path, 11112)
    cfg["appliance"]["name"] = "box-1"
    keys = tmp_path / "keys"
    crypto.create_keypair(tmp_path / "x25519.key", tmp_path / "x25519.pub")  # the wrong kind
    cfg["operations"] = {"host": "127.0.0.1", "ca": str(ca / "ca.pem"), "cert": str(keys / "mqtt.pem"),
                         "key": str(keys / "mqtt.key"), "command_keys": [str(tmp_path / "x25519.pub")]}
    main = tmp_path / "appliance.toml"
    main.write_text(to_toml(cfg))
    assert cli("keys", "init", "--config", str(main)).returncode == 0
    assert cli("fleet", "sign", str(keys / "mqtt.csr"), "--ca", str(ca)).returncode == 0
    r = cli("config", "check", "--config", str(main))
    assert r.returncode == 78
    assert "operations.command_keys[0]" in r.stderr and "Ed25519" in r.stderr, r.stderr


@pytest.mark.parametrize(("kind", "fields", "body"), [
    ("spool.reserve_reached", {"free_bytes": 5, "reserve_bytes": 9, "path": "/x"},
     {"kind": "spool.reserve_reached", "free_bytes": 5, "reserve_bytes": 9}),
    ("forward.loop_error", {"error_type": "OperationalError", "exception": "Traceback ... DOE^JOHN"},
     {"kind": "forward.loop_error", "error_type": "OperationalError"}),
    ("destination.off", {"destination": "pacs", "by": "ops-center:k1"},
     {"kind": "destination.off", "destination": "pacs", "by": "ops-center:k1"}),
    ("log.level_changed", {"level": "warning", "was": "info", "by": "root"},
     {"kind": "log.level_changed", "level": "warning", "was": "info", "by": "root"}),
])
def test_the_reserve_a_stage_loop_error_and_an_operators_switch_are_ops_events(
        kind: str, fields: dict[str, Any], body: dict[str, Any]) -> None:
    assert messages.event_body(kind, fields) == body


def test_fleet_crl_through_the_cli_says_which_box_left_the_roster(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    assert cli("fleet", "ca", "init", str(d), "--broker-host", "127.0.0.1").returncode == 0
    for name in ("ct-1", "ct-2"):
        pki.box_key_and_csr(name, tmp_path / f"{name}.key", tmp_path / f"{name}.csr")
        r = cli("fleet", "sign", str(tmp_path / f"{name}.csr"), "--ca", str(d),
                "--out", str(tmp_path / f"{name}.pem"))
        assert r.returncode == 0, r.stderr
    r = cli("fleet", "crl", "--ca", str(d), "--revoke", str(tmp_path / "ct-2.pem"))
    assert r.returncode == 0, r.stderr
    assert "left the roster: ct-2" in r.stdout and "ct-1" not in r.stdout, r.stdout
    assert pki.read_roster(d) == ["ct-1"]


def test_fleet_ca_center_through_the_cli_issues_what_is_missing(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    pki.ca_init(d, ("127.0.0.1",))
    (d / "ops-center-serve.pem").unlink()
    (d / "ops-center-serve.key").unlink()
    r = cli("fleet", "ca", "center", str(d))
    assert r.returncode == 0 and "ops-center-serve: " in r.stdout and "created" in r.stdout, r.stderr
    assert pki.common_name(pki.load_cert(d / "ops-center-serve.pem").subject) == "ops-center-serve"
