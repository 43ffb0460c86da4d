"""`appliance update FILE` and `appliance update-gate` (docs/updates.md).

`update FILE` (as root, on the appliance image): `rauc install` into the inactive slot,
the trial record (update/trial.py), then a reboot once no association or delivery holds
the update lock (update/lock.py; --no-reboot leaves the reboot to the technician). With
--once it does nothing when a slot already holds a bundle of that version (the update
stick stays plugged in across the reboots it causes).

`update-gate` is the mark-good unit (appliance-update-gate.service, at each boot): it
watches the daemon until the health gate (update/gate.py) keeps or rejects the booted
slot. Kept: `rauc status mark-good booted` (which also resets GRUB's try count). Rejected
on a slot on trial: mark-bad, then reboot into the old slot. A slot not on trial is never
marked bad. Its lines start with "appliance-update:" (the console and the journal show
them) and name slots, versions and conditions only.

Audited (cli/audited.py; Security Alert, Software Configuration, DCM 110131): an install
started, finished or failed; at the gate, a slot on trial kept or rejected, and a slot
that failed its trial (GRUB or the gate brought the old one back).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.cli import audited
from appliance.core import config
from appliance.core.errors import EX_TEMPFAIL, ApplianceError, NotFoundError, PermissionDeniedError
from appliance.update import gate, lock, rauc, spoolcheck, trial

UNIT = "appliance.service"
POLL_S = 5.0
REBOOT_WAIT_S = 1800.0  # the longest a reboot waits for an association or a delivery to end


def say(text: str) -> None:
    print(f"appliance-update: {text}", flush=True)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    up = sub.add_parser("update", parents=[common],
                        help="install an update bundle into the inactive slot and reboot into it")
    up.add_argument("file", type=Path, help="the RAUC bundle (.raucb)")
    up.add_argument("--no-reboot", action="store_true", help="install only; reboot later yourself")
    up.add_argument("--once", action="store_true",
                    help="do nothing if a slot already holds a bundle of this version")
    up.add_argument("--reboot-wait-s", type=float, default=REBOOT_WAIT_S,
                    help="how long the reboot waits for work in progress (default 1800)")
    g = sub.add_parser("update-gate", parents=[common],
                       help="the mark-good unit: keep the booted slot if the appliance is healthy")
    g.add_argument("--deadline-s", type=float, default=gate.DEADLINE_S)
    f = sub.add_parser("update-fetch", parents=[common],
                       help="the ops center's update command: fetch, check and install a bundle"
                            " (started by the daemon; one JSON line per step)")
    f.add_argument("--url", required=True, help="under an [update] source")
    f.add_argument("--sha256", required=True, help="the bundle's SHA-256 (64 hex digits)")
    f.add_argument("--no-reboot", action="store_true", help="install only; reboot later yourself")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise PermissionDeniedError("updates need root (RAUC writes the other root slot)")


def _daemon_status(cfg: config.Config) -> dict[str, Any] | None:
    from appliance.health import control

    try:
        st = control.request(cfg.control_socket, "status", timeout=5.0)
    except (OSError, control.DaemonUnavailable):
        return None
    return st if isinstance(st, dict) else None


def _ops_link_up(st: dict[str, Any] | None) -> bool | None:
    ops = (st or {}).get("ops")
    return None if not isinstance(ops, dict) else bool(ops.get("connected"))


def cmd_update(args: argparse.Namespace) -> int:
    _need_root()
    if not args.file.is_file():
        raise NotFoundError(f"{args.file}: no such bundle")
    cfg = config.load(args.config)
    version = str(rauc.info(args.file).get("version", ""))
    if args.once and version in rauc.installed_versions(rauc.status()):
        say(f"a slot already holds version {version}: nothing to do")
        return 0
    install(cfg, args.file, version)
    if args.no_reboot:
        say("reboot to try it (the mark-good unit keeps it only if the appliance is healthy)")
        return 0
    return _reboot(cfg, args.reboot_wait_s)


def install(cfg: config.Config, bundle: Path, version: str) -> str:
    """`rauc install` into the inactive slot and the trial record (what was true before:
    the ops link, the spool's authentication failures); the slot's bootname. Shared by
    `appliance update FILE` and the ops center's `update` command (update/remote.py).
    UpdateError when RAUC refuses the bundle. Audited: started, then installed or failed."""
    was_up = bool(_ops_link_up(_daemon_status(cfg)))
    failures = spool_failures(cfg)
    say(f"installing version {version}")
    _audit(cfg, "install", True, f"version {version} from {bundle.name} started")
    started = time.monotonic()
    try:
        rauc.install(bundle)
    except rauc.UpdateError as e:
        _audit(cfg, "install", False, f"version {version} failed: {e}")
        raise
    slot = rauc.primary_bootname(rauc.status()) or "?"
    trial.write(trial.Trial(slot=slot, version=version, ops_link_was_up=was_up,
                            spool_failures=failures))
    say(f"installed into slot {slot} in {time.monotonic() - started:.0f} s")
    _audit(cfg, "install", True, f"version {version} installed into slot {slot}, on trial")
    return slot


def _audit(cfg: config.Config, step: str, ok: bool, detail: str) -> None:
    """A software update, in the audit trail (Security Alert, Software Configuration)."""
    audited.record(cfg, lambda t: t.software_update(audited.operator(), step, ok, detail))


def _reboot(cfg: config.Config, wait_s: float) -> int:
    """Reboot once the update lock is free; the lock stays held until the end."""
    say("rebooting once no association or delivery is in progress")
    held = lock.exclusive(lock.path_in(cfg.appliance.state_dir), wait_s)
    if held is None:
        say(f"work still in progress after {wait_s:.0f} s: not rebooting (run it again, or reboot)")
        return EX_TEMPFAIL
    subprocess.run(["systemctl", "--no-block", "reboot"], check=True, timeout=60)
    return 0


def spool_failures(cfg: config.Config) -> int | None:
    """Spool entries failing authentication as this software reads them (spoolcheck.py);
    None when they cannot be counted (the spool key unreadable)."""
    try:
        got = spoolcheck.count_for(cfg.appliance.state_dir, cfg.spool.key_file)
    except (ApplianceError, OSError) as e:
        say(f"the spool's authentication was not checked ({type(e).__name__})")
        return None
    say(f"spool: {got.checked} entries checked in {got.seconds:.0f} s, {got.failing} failing"
        f" authentication, {got.quarantined} quarantined")
    return got.failures


def observe(cfg: config.Config, config_ok: bool, was_up: bool,
            spool_before: int | None = None, spool_now: int | None = None) -> gate.Observation:
    r = subprocess.run(["systemctl", "show", UNIT, "--property=ActiveState,NRestarts"],
                       capture_output=True, text=True, timeout=30)
    props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    st = _daemon_status(cfg)
    problems = st.get("problems") if st is not None else None
    return gate.Observation(
        unit_state=props.get("ActiveState", "unknown"),
        restarts=int(props.get("NRestarts", "0") or 0),
        problems=None if problems is None else tuple(str(p) for p in problems),
        config_ok=config_ok, ops_link_up=_ops_link_up(st), ops_link_was_up=was_up,
        spool_failures_before=spool_before, spool_failures_now=spool_now)


def config_checks(config_path: Path | None) -> bool:
    """`appliance config check` as the daemon's user, the way the daemon will read it."""
    argv = [sys.argv[0], "config", "check", *(["--config", str(config_path)] if config_path else [])]
    r = subprocess.run(["runuser", "-u", "appliance", "--", *argv], capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    return r.returncode == 0


def cmd_update_fetch(args: argparse.Namespace) -> int:
    from appliance.update import remote

    return remote.cmd_update_fetch(config.load(args.config), args.url, args.sha256,
                                   not args.no_reboot)


def cmd_update_gate(args: argparse.Namespace,
                    sleep: Callable[[float], None] = time.sleep) -> int:
    _need_root()
    started = time.monotonic()
    cfg = config.load(args.config)
    booted = str(rauc.status().get("booted"))
    on_trial = trial.read()
    if on_trial is not None and on_trial.slot != booted:
        # GRUB (3 boots unconfirmed) or the gate (rejected) brought us back here.
        rauc.mark("bad", "other")
        trial.clear()
        say(f"slot {on_trial.slot} (version {on_trial.version}) failed its trial: back on slot {booted}")
        _audit(cfg, "trial", False, f"slot {on_trial.slot} (version {on_trial.version}) failed its"
               f" trial: back on slot {booted}")
        on_trial = None
    config_ok = config_checks(args.config)
    # The new software reads every spool file once, while the daemon starts beside it.
    before = on_trial.spool_failures if on_trial else None
    now = spool_failures(cfg) if before is not None else None
    while True:
        o = observe(cfg, config_ok, on_trial.ops_link_was_up if on_trial else False, before, now)
        verdict, why = gate.judge(o, time.monotonic() - started, args.deadline_s)
        if verdict != "wait":
            break
        sleep(POLL_S)
    if verdict == "keep":
        rauc.mark("good", "booted")
        if on_trial is not None:
            trial.clear()
        say(f"kept slot {booted} ({why})")
        if on_trial is not None:  # a slot not on trial kept again at each boot is no change
            _audit(cfg, "gate", True, f"slot {booted} (version {on_trial.version}) kept: {why}")
        say(f"rauc status {json.dumps(rauc.status(), separators=(',', ':'))}")
        return 0
    if on_trial is None:
        say(f"slot {booted} is not healthy ({why}); not on trial, so it stays")
        return 1
    rauc.mark("bad", "booted")
    say(f"rejected slot {booted} ({why}): rebooting into the old slot")
    _audit(cfg, "gate", False, f"slot {booted} (version {on_trial.version}) rejected: {why}")
    return _reboot(cfg, REBOOT_WAIT_S)
