"""Desired config (appliance/ops/desired.py), in-process: the checks and their codes, the
records, the start-time rollback and the probation, with a real config file, real
drop-ins and a real AuditTrail in a temp dir. The daemon and Mosquitto side is in
tests/test_ops_desired_live.py."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditTrail
from appliance.core import config
from appliance.ops import commands, desired, messages
from tests.peers import base_config, to_toml
from tests.test_ops_commands import AUDIT_KEY, opened

BOX = "cfg-box"
NOW = 1_800_000_000.0
TOPIC = f"appliance/{BOX}/config"
GOOD = '[receive]\nae_title = "EDGE2"\n'


@dataclass
class Local:
    main: Path
    d: desired.Desired
    key: Ed25519PrivateKey
    audit_log: Path

    def msg(self, version: int, text: str = GOOD, key: Ed25519PrivateKey | None = None,
            now: float = NOW, **over: Any) -> bytes:
        k = key or self.key
        body = {**commands.body(BOX, "config", {"version": version, "toml": text}, k, now=now), **over}
        return commands.envelope(body, k)

    def dropin(self) -> str | None:
        p = desired.paths(self.main).dropin
        return p.read_text() if p.exists() else None


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    cfg = base_config(tmp_path, 11112)
    cfg["appliance"]["name"] = BOX
    main = tmp_path / "appliance.toml"
    main.write_text(to_toml(cfg))
    key = Ed25519PrivateKey.generate()
    trail = AuditTrail(tmp_path / "audit", BOX, "EDGE", AUDIT_KEY, 1 << 20, 2)
    d = desired.Desired(main, BOX, {commands.key_id(key.public_key()): key.public_key()}, 60.0, trail,
                        synced=lambda: True)
    yield Local(main, d, key, tmp_path / "audit" / "audit.log")


def applied(local: Local, version: int, text: str = GOOD) -> None:
    """Handled, restarted under (at_start) and kept."""
    assert local.d.handle(TOPIC, local.msg(version, text), now=NOW)
    assert desired.at_start(local.main) is False
    assert local.d.check(True, desired.CONFIRM_AFTER_S, now=NOW + 1) == "applied"


def test_a_good_config_is_written_with_a_pending_record_and_kept_once_healthy(local: Local) -> None:
    assert local.d.handle(TOPIC, local.msg(1), now=NOW) is True
    assert local.dropin() == GOOD
    assert config.load(local.main).receive.ae_title == "EDGE2"
    assert desired.status(local.main)["pending"] == 1
    assert desired.at_start(local.main) is False  # the restart under it
    assert local.d.check(healthy=True, uptime_s=desired.CONFIRM_AFTER_S + 1, now=NOW + 10) == "applied"
    assert desired.status(local.main) == {"version": 1, "pending": None, "rolled_back": None,
                                               "rolled_back_at": None, "refused": None, "refused_code": None,
                                               "cleared": None, "cleared_at": None}


def test_not_yet_healthy_waits_and_past_the_deadline_restores_the_previous_dropin(local: Local) -> None:
    applied(local, 1)
    assert local.d.handle(TOPIC, local.msg(2, '[receive]\nae_title = "EDGE3"\n'), now=NOW + 2)
    desired.at_start(local.main)
    assert local.d.check(healthy=False, uptime_s=30, now=NOW + 30) is None  # within 60 s
    assert local.d.check(healthy=True, uptime_s=1, now=NOW + 31) is None  # healthy, but too soon
    assert local.d.check(healthy=False, uptime_s=90, now=NOW + 63) == "rolled back"
    assert local.dropin() == GOOD
    st = desired.status(local.main)
    assert (st["version"], st["pending"], st["rolled_back"]) == (1, None, 2)


def test_a_first_config_rolled_back_leaves_no_dropin(local: Local) -> None:
    assert local.d.handle(TOPIC, local.msg(1), now=NOW)
    assert desired.rollback(local.main, "did not start", now=NOW + 1)
    assert local.dropin() is None
    assert desired.status(local.main)["rolled_back"] == 1


def test_a_start_already_tried_under_the_pending_config_rolls_it_back(local: Local) -> None:
    assert local.d.handle(TOPIC, local.msg(1), now=NOW)
    assert desired.at_start(local.main) is False  # the first start under it: marked tried
    assert local.dropin() == GOOD
    assert desired.at_start(local.main) is True  # that start never confirmed: back
    assert local.dropin() is None
    assert desired.at_start(local.main) is False  # nothing pending any more


def test_the_same_retained_message_is_applied_once_even_after_a_rollback(local: Local) -> None:
    m = local.msg(1)
    assert local.d.handle(TOPIC, m, now=NOW)
    assert not local.d.handle(TOPIC, m, now=NOW)  # while pending
    desired.rollback(local.main, "did not start")
    assert not local.d.handle(TOPIC, m, now=NOW)  # rolled back: not tried again
    assert local.dropin() is None
    applied(local, 2)  # a newer version is
    assert not local.d.handle(TOPIC, local.msg(2), now=NOW)  # re-signed, same version: 409


def refused(local: Local, payload: bytes, code: int, topic: str = TOPIC) -> dict[str, Any]:
    assert local.d.handle(topic, payload, now=NOW) is False
    assert local.dropin() is None
    assert desired.pending(local.main) is None
    assert "ops config" in opened(local.audit_log) and f": {code} " in opened(local.audit_log)
    return desired.status(local.main)


@pytest.mark.parametrize(("make", "code"), [
    (lambda lo: b"not json", 400),
    (lambda lo: lo.msg(1, key=Ed25519PrivateKey.generate()), 403),
    (lambda lo: lo.msg(1, box="other-box"), 422),
    (lambda lo: lo.msg(1, issued_at=NOW - 600, expires_at=NOW - 300), 410),
    (lambda lo: lo.msg(1, op="ping"), 404),
    (lambda lo: lo.msg(0), 422),
    (lambda lo: lo.msg(1, "[receive\n"), 422),
    (lambda lo: lo.msg(1, "[receive]\nport = 0\n"), 422),
    (lambda lo: lo.msg(1, "[receive]\nno_such_key = 1\n"), 422),
], ids=["malformed", "unsigned", "other-box", "expired", "not-config", "version-0", "not-toml",
        "out-of-range", "unknown-key"])
def test_each_refusal_has_its_code_writes_nothing_and_is_audited(local: Local, make: Any, code: int) -> None:
    st = refused(local, make(local), code)
    assert st["refused_code"] == (None if code == 403 else code)


def test_a_config_signed_a_week_ago_for_a_box_that_was_off_is_applied(local: Local) -> None:
    """A config lives up to desired.MAX_TTL_S (its version, not a replay record, stops a
    replay): `fleet config push`'s default week reaches a box that was off for six days."""
    m = commands.envelope(commands.body(BOX, "config", {"version": 1, "toml": GOOD}, local.key,
                                        now=NOW - 6 * 86400, ttl_s=desired.PUSH_TTL_S), local.key)
    assert local.d.handle(TOPIC, m, now=NOW)
    assert local.dropin() == GOOD


def test_a_config_older_than_its_lifetime_or_signed_for_longer_than_30_days_is_refused(
        local: Local) -> None:
    refused(local, commands.envelope(commands.body(
        BOX, "config", {"version": 1, "toml": GOOD}, local.key, now=NOW - 8 * 86400,
        ttl_s=desired.PUSH_TTL_S), local.key), 410)
    refused(local, commands.envelope(commands.body(
        BOX, "config", {"version": 2, "toml": GOOD}, local.key, now=NOW,
        ttl_s=desired.MAX_TTL_S + 60), local.key), 422)


def test_a_message_on_another_boxs_topic_is_refused_422(local: Local) -> None:
    refused(local, local.msg(1), 422, topic="appliance/other-box/config")


@pytest.mark.parametrize("text", ['[operations]\nheartbeat_s = 5\n', '[appliance]\nstate_dir = "/tmp/x"\n',
                                  '[appliance]\nname = "other"\n', '[spool]\nkey_file = "/tmp/k"\n',
                                  '[encryption]\nrecipients = []\n', '[audit]\nfiles = 2\n'])
def test_a_forbidden_key_is_refused_422_naming_it(local: Local, text: str) -> None:
    refused(local, local.msg(1, text), 422)
    key = desired.forbidden_key(tomllib.loads(text))
    assert key is not None and f"{key} may not be set remotely" in opened(local.audit_log)


def test_a_version_not_newer_than_the_applied_is_refused_409(local: Local) -> None:
    applied(local, 3)
    assert not local.d.handle(TOPIC, local.msg(2), now=NOW)
    assert desired.status(local.main)["refused_code"] == 409


def test_the_checker_sees_the_candidate_read_after_the_technicians_dropins(local: Local,
                                                                         tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "60-local.toml").write_text('[receive]\nae_title = "LOCAL"\n')
    seen: list[tuple[str, int]] = []

    def checker(main: Path, data: dict[str, Any]) -> list[str]:
        cfg = config.parse(*config.read(main, {desired.paths(main).dropin: data}))
        seen.append((cfg.receive.ae_title, cfg.receive.port))
        return []
    local.d.checker = checker
    assert local.d.handle(TOPIC, local.msg(1, '[receive]\nae_title = "REMOTE"\n'), now=NOW)
    # remote.d comes after conf.d whatever the names: the center's key wins, the rest stays
    assert seen == [("REMOTE", config.load(local.main).receive.port)]


def test_config_events_keep_versions_codes_and_reason_classes_only() -> None:
    assert messages.event_body("config.refused", {"version": 4, "code": 422, "reason": "unprocessable",
                                                  "key": "operations", "detail": "x"}) == {
        "kind": "config.refused", "version": 4, "code": 422, "reason": "unprocessable", "key": "operations"}
    assert messages.event_body("config.rolled_back", {"version": 4, "reason": "did not start",
                                                      "applied_version": 3})["reason"] == "did not start"
    assert messages.event_body("config.applied", {"version": 4}) == {"kind": "config.applied", "version": 4}


def test_nothing_is_kept_or_rolled_back_before_the_restart_under_the_new_dropin(local: Local) -> None:
    assert local.d.handle(TOPIC, local.msg(1), now=NOW)
    assert local.d.check(True, 100, now=NOW + 1) is None  # this process runs the old config
    assert local.d.check(False, 100, now=NOW + 3600) is None
    assert desired.status(local.main)["pending"] == 1


def test_a_dropin_that_cannot_be_written_is_refused_500_and_tried_again_later(local: Local) -> None:
    confd = local.main.parent / config.REMOTE_DIR
    confd.write_text("")  # a file where the folder should be: cannot be written into
    m = local.msg(1)
    assert local.d.handle(TOPIC, m, now=NOW) is False
    assert desired.status(local.main)["refused"] is None and "500 cannot write" in opened(local.audit_log)
    confd.unlink()
    assert local.d.handle(TOPIC, m, now=NOW) is True  # the same retained message, next connection
    assert local.dropin() == GOOD


def test_a_clock_not_synchronised_refuses_503_and_the_same_message_is_taken_once_it_is(local: Local) -> None:
    synced = [False]
    local.d.synced = lambda: synced[0]
    m = local.msg(1)
    assert local.d.handle(TOPIC, m, now=NOW) is False
    assert desired.pending(local.main) is None
    synced[0] = True
    assert local.d.handle(TOPIC, m, now=NOW) is True


# --- where the remote drop-in lives, and a technician's clear ---------------------------


def test_the_remote_dropin_and_its_records_live_in_remote_d_not_conf_d(local: Local) -> None:
    assert local.d.handle(TOPIC, local.msg(1), now=NOW)
    remote = local.main.parent / "remote.d"
    assert sorted(p.name for p in remote.iterdir()) == [".remote-pending.json", "50-remote.toml"]
    assert not (local.main.parent / "conf.d").exists()


def test_an_imported_site_config_has_its_remote_folder_beside_the_current_link(tmp_path: Path) -> None:
    (tmp_path / "site-a").mkdir()
    (tmp_path / "current").symlink_to("site-a")
    assert config.remote_dir(tmp_path / "current" / "appliance.toml") == tmp_path / "remote.d"
    # the set itself (as the import stages it) and any other folder: beside the main file
    assert config.remote_dir(tmp_path / "site-a" / "appliance.toml") == tmp_path / "site-a" / "remote.d"


def test_the_remote_dropin_wins_over_a_technicians_dropin_that_sorts_after_it(local: Local) -> None:
    applied(local, 1, '[receive]\nae_title = "REMOTE"\nport = 2000\n')
    confd = local.main.parent / "conf.d"
    confd.mkdir()
    (confd / "99-site.toml").write_text('[receive]\nae_title = "LOCAL"\n[queue]\nmin_rate_kbit_s = 100\n')
    cfg = config.load(local.main)
    assert (cfg.receive.ae_title, cfg.receive.port, cfg.queue.min_rate_kbit_s) == ("REMOTE", 2000, 100)
    assert config.set_by(cfg) == {confd / "99-site.toml": ["queue.min_rate_kbit_s"],
                                  desired.paths(local.main).dropin: ["receive.ae_title", "receive.port"]}


def test_clear_removes_the_dropin_and_the_retained_message_is_not_applied_again(local: Local) -> None:
    m = local.msg(2)
    assert local.d.handle(TOPIC, m, now=NOW)
    desired.at_start(local.main)
    assert local.d.check(True, desired.CONFIRM_AFTER_S + 1, now=NOW + 10) == "applied"
    assert desired.clear(config.remote_dir(local.main), now=NOW + 20) == 2
    assert local.dropin() is None
    assert local.d.handle(TOPIC, m, now=NOW + 30) is False  # the same message at a reconnect
    assert local.dropin() is None
    again = local.msg(2, '[receive]\nae_title = "AGAIN"\n')
    assert local.d.handle(TOPIC, again, now=NOW + 30) is False  # 409: not newer
    assert local.d.handle(TOPIC, local.msg(3), now=NOW + 30) is True  # only a newer version
    assert desired.status(local.main)["cleared"] == 2


def test_clear_during_the_probation_ends_it_without_a_rollback(local: Local) -> None:
    applied(local, 1)
    m = local.msg(2, '[receive]\nae_title = "BAD"\n')
    assert local.d.handle(TOPIC, m, now=NOW)
    assert desired.clear(config.remote_dir(local.main), now=NOW + 1) == 2
    assert desired.pending(local.main) is None and local.dropin() is None
    assert desired.at_start(local.main) is False and local.dropin() is None
    assert local.d.handle(TOPIC, m, now=NOW + 2) is False  # not taken again


def test_clear_with_nothing_there_changes_nothing(local: Local) -> None:
    assert desired.clear(config.remote_dir(local.main)) is None
    assert not (local.main.parent / "remote.d").exists()


def test_config_check_names_the_file_that_set_each_key_and_the_remote_one_as_such(local: Local) -> None:
    from tests.peers import cli

    applied(local, 1)
    cli("keys", "init", "--config", str(local.main), check=True)
    r = cli("config", "check", "--config", str(local.main))
    assert r.returncode == 0, r.stderr
    dropin = desired.paths(local.main).dropin
    assert f"# set by {dropin} (operations center: remote config): receive.ae_title\n" in r.stdout
    r = cli("config", "check", "--json", "--config", str(local.main))
    assert json.loads(r.stdout)["set_by"] == {str(dropin): ["receive.ae_title"]}


def test_appliance_status_says_which_version_a_technician_cleared(local: Local) -> None:
    from appliance.ops import cli as ops_cli

    applied(local, 2)
    desired.clear(config.remote_dir(local.main))
    line = ops_cli.config_line(desired.status(local.main))
    assert line.startswith("remote config  none in force (version 2 cleared on site at "), line
