"""`appliance update-gate` (cli/update.py), the mark-good unit's decisions, with RAUC,
systemd and the daemon replaced by recorders: which slot is marked good or bad, when
the box reboots, and what happens to the trial record."""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import update as cli_update
from appliance.core import config, crypto
from appliance.update import gate, rauc, spoolcheck, trial
from tests.peers import base_config, cli, to_toml

HEALTHY = gate.Observation(unit_state="active", restarts=0, problems=(), config_ok=True,
                           ops_link_up=None, ops_link_was_up=False)
CRASHING = gate.Observation(unit_state="activating", restarts=3, problems=None, config_ok=True,
                            ops_link_up=None, ops_link_was_up=False)


class Box:
    def __init__(self, booted: str, observation: gate.Observation) -> None:
        self.booted, self.observation = booted, observation
        self.marks: list[tuple[str, str]] = []
        self.reboots = 0


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(booted: str, observation: gate.Observation, on_trial: str | None,
             spool: bool = False, broken: tuple[str, ...] = ()) -> tuple[Box, argparse.Namespace]:
        b = Box(booted, observation)
        monkeypatch.setattr(trial, "PATH", tmp_path / "update" / "trial.json")
        cfg = tmp_path / "appliance.toml"
        cfg.write_text(to_toml(base_config(tmp_path, 11112)))
        if spool:
            cli("keys", "init", "--config", str(cfg), check=True)
            for rid in ("r1", "r2", "r3"):
                p = seal(config.load(cfg), rid)
                if rid in broken:
                    corrupt(p)
        if on_trial:
            before = cli_update.spool_failures(config.load(cfg)) if spool else None
            trial.write(trial.Trial(slot=on_trial, version="2.0", ops_link_was_up=False,
                                    spool_failures=before))
        monkeypatch.setattr(cli_update.os, "geteuid", lambda: 0)
        monkeypatch.setattr(rauc, "status", lambda: {"booted": b.booted, "slots": []})
        monkeypatch.setattr(rauc, "mark", lambda state, which: b.marks.append((state, which)))
        monkeypatch.setattr(cli_update, "config_checks", lambda path: observation.config_ok)
        # The daemon's side is the box's; the spool counts are the real ones.
        monkeypatch.setattr(cli_update, "observe", lambda cfg, ok, was_up, before=None, now=None: replace(
            b.observation, spool_failures_before=before, spool_failures_now=now))

        def reboot(cfg: Any, wait_s: float) -> int:
            b.reboots += 1
            return 0
        monkeypatch.setattr(cli_update, "_reboot", reboot)
        return b, argparse.Namespace(config=cfg, deadline_s=gate.DEADLINE_S)
    return make


def seal(cfg: config.Config, rid: str) -> Path:
    """A spool file sealed the way the spool seals one (an opaque payload)."""
    d = cfg.appliance.state_dir / "spool"
    d.mkdir(parents=True, exist_ok=True)
    with (d / rid).open("wb") as f:
        crypto.seal_spool_file(crypto.load_spool_key(cfg.spool.key_file), rid,
                               io.BytesIO(bytes(range(256)) * 300), f, chunk_size=4096)
    return d / rid


def corrupt(path: Path, at: int = 20_000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_healthy_slot_on_trial_is_kept_and_its_trial_ends(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="B")
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 0
    assert b.marks == [("good", "booted")] and b.reboots == 0
    assert trial.read() is None


def test_crashing_slot_on_trial_is_marked_bad_and_the_box_reboots(box: Any) -> None:
    b, args = box("A", CRASHING, on_trial="A")
    cli_update.cmd_update_gate(args, sleep=lambda s: None)
    assert b.marks == [("bad", "booted")] and b.reboots == 1
    assert trial.read() is not None  # the old slot's gate reports the outcome and clears it


def test_back_on_the_old_slot_the_new_one_is_marked_bad_and_the_old_kept(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="A")
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 0
    assert b.marks == [("bad", "other"), ("good", "booted")] and b.reboots == 0
    assert trial.read() is None


def test_unhealthy_slot_not_on_trial_is_neither_marked_nor_left(box: Any) -> None:
    b, args = box("A", CRASHING, on_trial=None)
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 1
    assert b.marks == [] and b.reboots == 0


def test_healthy_slot_not_on_trial_is_marked_good(box: Any) -> None:
    b, args = box("A", HEALTHY, on_trial=None)
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 0
    assert b.marks == [("good", "booted")]


def test_update_of_a_missing_bundle_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_update.os, "geteuid", lambda: 0)
    args = argparse.Namespace(file=tmp_path / "update.raucb", config=None)
    with pytest.raises(cli_update.NotFoundError):
        cli_update.cmd_update(args)


def test_update_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_update.os, "geteuid", lambda: 1000)
    args = argparse.Namespace(file=tmp_path / "update.raucb", config=None)
    with pytest.raises(cli_update.PermissionDeniedError):
        cli_update.cmd_update(args)


def test_spool_entry_failing_authentication_after_the_update_rejects_the_slot(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="B", spool=True)
    assert trial.read().spool_failures == 0  # type: ignore[union-attr]
    corrupt(config.load(args.config).appliance.state_dir / "spool" / "r2")  # the new slot misreads it
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 0  # _reboot's answer
    assert b.marks == [("bad", "booted")] and b.reboots == 1


def test_spool_entry_that_failed_before_the_update_does_not_reject(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="B", spool=True, broken=("r1",))
    assert trial.read().spool_failures == 1  # type: ignore[union-attr]
    assert cli_update.cmd_update_gate(args, sleep=lambda s: None) == 0
    assert b.marks == [("good", "booted")] and b.reboots == 0


def test_spool_file_quarantined_after_the_update_still_counts(tmp_path: Path) -> None:
    cfg_path = tmp_path / "appliance.toml"
    cfg_path.write_text(to_toml(base_config(tmp_path, 11112)))
    cli("keys", "init", "--config", str(cfg_path), check=True)
    cfg = config.load(cfg_path)
    p = seal(cfg, "r1")
    corrupt(p)
    before = spoolcheck.count_for(cfg.appliance.state_dir, cfg.spool.key_file)
    (cfg.appliance.state_dir / "quarantine").mkdir(exist_ok=True)
    p.rename(cfg.appliance.state_dir / "quarantine" / "r1.1765000000")  # what the packer does
    (cfg.appliance.state_dir / "quarantine" / "b1.bundle.1765000000").write_bytes(b"x")  # not spool
    after = spoolcheck.count_for(cfg.appliance.state_dir, cfg.spool.key_file)
    assert (before.failing, before.quarantined) == (1, 0)
    assert (after.failing, after.quarantined) == (0, 1) and after.failures == before.failures


# --- the audit trail (Security Alert, Software Configuration: DCM 110131) -------------------


def update_events(cfg_path: Path) -> list[tuple[str, str, str]]:
    """(outcome, subject, description) of each software-update alert in the trail."""
    import xml.etree.ElementTree as ET

    from appliance.audit.trail import read
    from appliance.core import config, crypto

    cfg = config.load(cfg_path)
    key = crypto.load_spool_key(cfg.spool.key_file).audit_key()
    log = cfg.appliance.state_dir / "audit" / "audit.log"
    out = []
    for raw in read(log, key) if log.exists() else []:
        assert raw is not None
        m = ET.fromstring(raw)  # noqa: S314 - our own output
        ident = m.find("EventIdentification")
        assert ident is not None
        if ident.find("EventTypeCode[@csd-code='110131']") is not None:
            subject = m.find("ParticipantObjectIdentification")
            assert subject is not None
            out.append((ident.get("EventOutcomeIndicator", ""), subject.get("ParticipantObjectID", ""),
                        ident.findtext("EventOutcomeDescription") or ""))
    return out


def with_spool_key(args: argparse.Namespace) -> argparse.Namespace:
    from appliance.core import config, crypto

    crypto.create_spool_key(config.load(args.config).spool.key_file)
    return args


def test_the_gate_audits_a_slot_on_trial_kept(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="B")
    assert cli_update.cmd_update_gate(with_spool_key(args), sleep=lambda s: None) == 0
    [(outcome, subject, what)] = update_events(args.config)
    assert (outcome, subject) == ("0", "appliance:update/gate")
    assert "slot B (version 2.0) kept" in what


def test_the_gate_audits_a_rejected_slot_as_a_serious_failure(box: Any) -> None:
    b, args = box("A", CRASHING, on_trial="A")
    cli_update.cmd_update_gate(with_spool_key(args), sleep=lambda s: None)
    [(outcome, subject, what)] = update_events(args.config)
    assert (outcome, subject) == ("8", "appliance:update/gate") and "slot A (version 2.0) rejected" in what


def test_the_gate_audits_a_slot_that_failed_its_trial(box: Any) -> None:
    b, args = box("B", HEALTHY, on_trial="A")
    cli_update.cmd_update_gate(with_spool_key(args), sleep=lambda s: None)
    assert [(o, s) for o, s, _ in update_events(args.config)] == [("8", "appliance:update/trial")]


def test_a_slot_not_on_trial_kept_again_is_not_audited(box: Any) -> None:
    b, args = box("A", HEALTHY, on_trial=None)
    assert cli_update.cmd_update_gate(with_spool_key(args), sleep=lambda s: None) == 0
    assert update_events(args.config) == []


def test_an_install_is_audited_when_it_starts_and_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_update.os, "geteuid", lambda: 0)
    monkeypatch.setattr(rauc, "info", lambda f: {"version": "2.1"})
    monkeypatch.setattr(cli_update, "_daemon_status", lambda cfg: None)

    def refused(bundle: Path, timeout: float = 0) -> None:
        raise rauc.UpdateError("rauc install failed: signature verification failed")
    monkeypatch.setattr(rauc, "install", refused)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(to_toml(base_config(tmp_path, 11112)))
    bundle = tmp_path / "update.raucb"
    bundle.write_bytes(b"not really a bundle")
    args = with_spool_key(argparse.Namespace(file=bundle, config=cfg, once=False, no_reboot=True))
    with pytest.raises(rauc.UpdateError):
        cli_update.cmd_update(args)
    events = update_events(cfg)
    assert [(o, s) for o, s, _ in events] == [("0", "appliance:update/install"),
                                              ("8", "appliance:update/install")]
    assert "version 2.1 from update.raucb started" in events[0][2]
    assert "signature verification failed" in events[1][2]
