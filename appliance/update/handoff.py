"""The hand-off from the unprivileged daemon to the root install unit (docs/updates.md
"Remote updates").

The daemon (and so its `update-fetch` worker) runs as the `appliance` user under
NoNewPrivileges; installing needs root (RAUC's D-Bus policy, /data/update/trial.json,
`systemctl reboot`). So the worker, once the SHA-256 matched, moves the bundle into
`<state_dir>/update-ready/` (inside the daemon's ReadWritePaths) and writes
`request.json` there last; `appliance-update-install.path` (root) sees it and starts
`appliance update-install`, which installs the bundle as `appliance update FILE` does
(cli/update.install), writes `result.json` (the final step: installed, refused or
failed, with version and slot or a reason class; never RAUC's text), removes the bundle
and the request, and reboots through the update lock if the request asks. The worker
waits for the result and prints it as its own step, so the daemon's Runner turns it into
the same ops events as an install in process; the Runner removes the result once it sent
that event (`settle`), so a result still in the folder is an outcome nobody reported yet.

The result carries the request's `cmd_id`: a daemon restarted while the root side
installs (its worker died with it), or whose worker was killed, reports a result it finds
as the outcome of that command (remote.Runner.recover), once, then removes it. A root side
that fails in any way still removes the request (the path unit would start it again and
again) and writes a result saying `update.failed` `internal error` if it can.

The folder belongs to the appliance user, so the root side trusts nothing in it: the
request is read with O_NOFOLLOW and a size cap and must name `<sha256>.raucb`, the
bundle must be a regular file (RAUC's signature check is the real gate: a swapped file
is refused by it), and the result is written as a new file renamed into place (a link
planted under its name is replaced, never followed). A result the root side could not
write, or a root side that never runs, leaves the waiting side waiting until its deadline
and the Runner reports `update.failed` `timeout` (the request withdrawn then).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core import config, durable, sandbox
from appliance.core.errors import ApplianceError
from appliance.update import fetch, rauc

FOLDER = "update-ready"
REQUEST = "request.json"
RESULT = "result.json"
RECORD_MAX = 4096
POLL_S = 1.0
WAIT_S = rauc.INSTALL_TIMEOUT_S + 600  # RAUC's hour, and the spool check before it
CMD_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")  # ops/commands.py makes 16 hex digits


PATH_UNIT = "appliance-update-install.path"  # systemd/: watches the request (PathExists=)
_PATH_EXISTS = re.compile(r"^\s*PathExists\s*=\s*(.*?)\s*$")


def folder(cfg: config.Config) -> Path:
    return cfg.appliance.state_dir / FOLDER


def watched(unit_dirs: tuple[Path, ...] = sandbox.UNIT_SEARCH) -> list[Path] | None:
    """The paths the installed path unit watches: the PathExists= of its file and its
    drop-ins as systemd reads them (sandbox.unit_lines; an empty one resets the list);
    None when the unit is not installed."""
    installed = sandbox.unit_lines(PATH_UNIT, unit_dirs)
    if installed is None:
        return None
    out: list[Path] = []
    for _, line in installed[1]:
        if m := _PATH_EXISTS.match(line):
            out = out + [Path(m.group(1))] if m.group(1) else []
    return out


def watch_warnings(cfg: config.Config, unit_dirs: tuple[Path, ...] = sandbox.UNIT_SEARCH) -> list[str]:
    """`config check`'s warning when remote updates are on and the installed path unit
    does not watch this state_dir's request (a state_dir moved needs a drop-in)."""
    want = folder(cfg) / REQUEST
    got = watched(unit_dirs) if cfg.update is not None else None
    if got is None or want in got:
        return []
    return [f"[update]: {PATH_UNIT} watches {', '.join(map(str, got)) or 'nothing'}, not {want}: "
            f"an update command handed off to root would time out; add a drop-in "
            f"{PATH_UNIT}.d/state-dir.conf with [Path], PathExists= (empty) and PathExists={want}"
            f" (docs/updates.md \"Remote updates\")"]


def wanted() -> bool:
    """Hand off unless this process may install itself (root: a developer's `make run`,
    the tests). APPLIANCE_UPDATE_HANDOFF=1 forces the hand-off (tests only)."""
    return os.geteuid() != 0 or os.environ.get("APPLIANCE_UPDATE_HANDOFF") == "1"


def read_record(path: Path) -> dict[str, Any] | None:
    """A small JSON object, or None (missing, a link, too big, not JSON)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        raw = f.read(RECORD_MAX + 1)
    try:
        d = json.loads(raw) if len(raw) <= RECORD_MAX else None
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


# --- the worker's side (the appliance user) ---

def hand_off(cfg: config.Config, bundle: Path, sha256: str, cmd_id: str, reboot: bool) -> Path:
    """Move the checked bundle into the folder and write the request (last: the path
    unit starts on it). Returns the folder."""
    into = folder(cfg)
    durable.make_dirs(into)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(into / RESULT)  # an answer to an earlier request
    target = into / f"{sha256}.raucb"
    try:
        os.replace(bundle, target)  # the default download_dir is in the state dir too
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with bundle.open("rb") as src, durable.atomic_file(target, mode=0o644) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        bundle.unlink()
    durable.fsync_dir(bundle.parent)
    record = {"sha256": sha256, "cmd_id": cmd_id, "reboot": reboot}
    durable.atomic_write(into / REQUEST, json.dumps(record).encode(), mode=0o644)
    return into


def wait_result(cfg: config.Config, sha256: str | None, wait_s: float = WAIT_S,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
    """The root side's result for this bundle (any bundle: None), left in place for
    `settle`; None at the deadline."""
    path = folder(cfg) / RESULT
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        got = read_record(path)
        if got is not None and (sha256 is None or got.get("sha256") == sha256):
            return got
        sleep(POLL_S)
    return None


def pending(cfg: config.Config) -> bool:
    """A request the root side has not answered yet, or a result nobody reported."""
    into = folder(cfg)
    return (into / REQUEST).exists() or (into / RESULT).exists()


def cmd_id_of(record: dict[str, Any] | None) -> str:
    """The command a request or result belongs to ("-" when it names none we can send)."""
    got = (record or {}).get("cmd_id")
    return got if isinstance(got, str) and CMD_ID.match(got) else "-"


def request(cfg: config.Config) -> dict[str, Any] | None:
    return read_record(folder(cfg) / REQUEST)


def settle(cfg: config.Config, cmd_id: str) -> None:
    """The result for this command was reported: remove it (durably, so a restart does
    not report it again). A result for another command stays."""
    path = folder(cfg) / RESULT
    if cmd_id_of(read_record(path)) == cmd_id:
        with contextlib.suppress(FileNotFoundError):
            durable.unlink_durable(path)


def withdraw(cfg: config.Config) -> None:
    """No answer within the deadline: the request and its bundle go (the root side, if it
    ever starts, finds nothing to do)."""
    _clear(folder(cfg))


def _clear(into: Path) -> None:
    for name in (REQUEST, *(p.name for p in into.glob("*.raucb"))):
        with contextlib.suppress(OSError):
            durable.unlink_durable(into / name)


# --- the root side (appliance-update-install.service) ---

def take_request(into: Path) -> tuple[dict[str, Any], Path] | None:
    """(request, bundle) if the folder holds a well-formed request for a regular file."""
    req = read_record(into / REQUEST)
    if req is None or not fetch.valid_sha256(req.get("sha256")) or \
            not isinstance(req.get("reboot"), bool):
        return None
    bundle = into / f"{req['sha256']}.raucb"
    try:
        if not stat.S_ISREG(bundle.lstat().st_mode):
            return None
    except OSError:
        return None
    return req, bundle


def install(cfg: config.Config) -> tuple[dict[str, Any] | None, bool]:
    """Install the handed-off bundle; (the result written, reboot wanted). The request
    and the bundle are removed whatever happened, so the path unit does not start again:
    anything raised while answering is a result `update.failed` `internal error`, and a
    result that cannot be written still leaves the folder cleared (then it raises)."""
    into = folder(cfg)
    if not (into / REQUEST).exists():
        return None, False  # started by hand, or the request already answered
    try:
        try:
            result, reboot = _answer(cfg, into)
        except Exception as e:  # the answer is a result, whatever failed
            raw = read_record(into / REQUEST) or {}
            result = {"step": "update.failed", "reason": "internal error", "error_type": type(e).__name__,
                      "sha256": raw.get("sha256"), "cmd_id": cmd_id_of(raw)}
            reboot = False
        with durable.atomic_file(into / RESULT) as f:
            f.write(json.dumps(result).encode())
            os.fchmod(f.fileno(), 0o644)  # root's file, read by the appliance user: whatever the umask
    finally:
        _clear(into)
    return result, reboot and result["step"] == "update.installed"


def _answer(cfg: config.Config, into: Path) -> tuple[dict[str, Any], bool]:
    from appliance.cli import update as cli_update  # noqa: PLC0415 - cli imports us

    taken = take_request(into)
    if taken is None:
        raw = read_record(into / REQUEST) or {}
        return {"step": "update.failed", "reason": "bad request", "sha256": raw.get("sha256"),
                "cmd_id": cmd_id_of(raw)}, False
    req, bundle = taken
    return {"sha256": req["sha256"], "cmd_id": cmd_id_of(req),
            **_install_step(cli_update.install, cfg, bundle, req["reboot"])}, req["reboot"]


def _install_step(do_install: Callable[[config.Config, Path, str], str], cfg: config.Config,
                  bundle: Path, reboot: bool) -> dict[str, Any]:
    try:
        version = str(rauc.info(bundle).get("version", ""))
        slot = do_install(cfg, bundle, version)
    except rauc.UpdateError:
        return {"step": "update.refused", "reason": "rauc refused"}
    except (ApplianceError, OSError) as e:
        return {"step": "update.failed", "reason": "internal error", "error_type": type(e).__name__}
    return {"step": "update.installed", "bundle_version": version, "slot": slot, "reboot": reboot}
