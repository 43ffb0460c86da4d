"""The operations center's `update` command: fetch a bundle from an allowed source, check
its SHA-256, install it as `appliance update FILE` does (docs/updates.md).

Two halves. `Runner` (in the daemon; ops/commands.py calls it through the control
handler `update.start`) checks the command's arguments, refuses a URL outside `[update]
sources` (PermissionDeniedError: 403) or a second update while one runs, and starts the
worker: a subprocess (`appliance update-fetch`), so that neither the download nor RAUC
runs on the daemon's threads. It kills the worker's process group at its deadline (the
fetch's, RAUC's and the reboot wait's). The worker prints one JSON line per step on
stdout; the Runner's reader thread turns each into a log event (`update.*`), which the
log tap sends as an ops event (messages.EVENT_FIELDS): versions, slots, byte counts and
reason classes, never a server's text.

`work` (the worker) holds `<download_dir>/fetch.lock` (flock, so a daemon restarted
meanwhile cannot start a second), fetches (update/fetch.py), installs with
cli/update.install (RAUC checks the signature: the real gate; the SHA-256 only ties the
command to the file), removes the bundle, and reboots through the update lock (cli/update
`_reboot`: it waits for associations and deliveries) unless the command says reboot=false.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from appliance.core import config, durable
from appliance.core.errors import ApplianceError, PermissionDeniedError, StateError, UsageError
from appliance.update import fetch, lock, rauc

log = structlog.get_logger("appliance.update")

LOCK_NAME = "fetch.lock"
LINE_MAX = 4096
PROGRESS_EVERY = 0.25  # a progress event at each quarter of the download
TOKEN = re.compile(r"[A-Za-z0-9._+~ -]{1,64}\Z")  # versions, slots, reason classes
# What a worker line may say, and the fields the daemon logs of it.
STEPS: dict[str, tuple[str, ...]] = {
    "update.progress": ("bytes", "total"),
    "update.fetched": ("bytes",),
    "update.installed": ("bundle_version", "slot", "reboot"),
    "update.refused": ("reason",),  # RAUC refused the bundle
    "update.failed": ("reason",),  # the fetch failed, or the worker did
}
FINAL = {"update.installed", "update.refused", "update.failed"}


def download_dir(cfg: config.Config) -> Path:
    assert cfg.update is not None
    return cfg.update.download_dir or cfg.appliance.state_dir / "update"


def check_args(cfg: config.Config, args: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(url, sha256, reboot) of a command; UsageError (422) or PermissionDeniedError (403)."""
    if cfg.update is None:
        raise StateError("no [update] in the config: remote updates are off")
    args = {k: v for k, v in args.items() if not k.startswith("_")}  # _operator, _cmd_id
    if not set(args) <= {"url", "sha256", "reboot"} or "url" not in args or "sha256" not in args:
        raise UsageError("takes url and sha256 (and reboot: true or false)")
    url, sha, reboot = args["url"], args["sha256"], args.get("reboot", True)
    if reboot in ("true", "false"):  # `fleet send ... --arg reboot=false` sends text
        reboot = reboot == "true"
    if not isinstance(url, str) or not fetch.valid_sha256(sha) or not isinstance(reboot, bool):
        raise UsageError("url must be a URL, sha256 64 lowercase hex digits, reboot true or false")
    if not fetch.allowed(url, cfg.update.sources):
        raise PermissionDeniedError("the url is not under an [update] source")
    return url, sha, reboot


class Runner:
    """The daemon's side: one worker at a time."""

    def __init__(self, cfg: config.Config, emit: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.emit = emit or (lambda kind, **kw: log.info(kind, **kw))
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def deadline_s(self) -> float:
        assert self.cfg.update is not None
        from appliance.cli.update import REBOOT_WAIT_S  # noqa: PLC0415 - cli imports us

        return self.cfg.update.deadline_s + rauc.INSTALL_TIMEOUT_S + REBOOT_WAIT_S + 120

    def start(self, args: Mapping[str, Any]) -> dict[str, Any]:
        url, sha, reboot = check_args(self.cfg, args)
        cmd_id = str(args.get("_cmd_id") or "-")
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                raise StateError("an update is already in progress")
            if lock.pending(lock.path_in(self.cfg.appliance.state_dir)):
                raise StateError("an update is about to reboot the appliance")
            argv = [sys.executable, "-m", "appliance", "update-fetch", "--url", url, "--sha256", sha,
                    *(["--config", str(self.cfg.sources[0])] if self.cfg.sources else []),
                    *([] if reboot else ["--no-reboot"])]
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          start_new_session=True)
            proc = self._proc
        self.emit("update.accepted", cmd_id=cmd_id)
        threading.Thread(target=self._follow, args=(proc, cmd_id), name="update-worker",
                         daemon=True).start()
        return {"accepted": True}

    def running(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    def _follow(self, proc: subprocess.Popen[bytes], cmd_id: str) -> None:
        killer = threading.Timer(self.deadline_s(), _kill, args=(proc,))
        killer.daemon = True
        killer.start()
        final = False
        try:
            assert proc.stdout is not None
            for raw in iter(lambda: proc.stdout.readline(LINE_MAX), b""):  # type: ignore[union-attr]
                step = _step(raw)
                if step is not None:
                    kind, fields = step
                    final = final or kind in FINAL
                    self.emit(kind, cmd_id=cmd_id, **fields)
            proc.wait()
        finally:
            killer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
        if not final:
            self.emit("update.failed", cmd_id=cmd_id,
                      reason="timeout" if proc.returncode == -signal.SIGKILL else "internal error")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _step(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """A worker line as (kind, fields kept); None for anything else (its other output)."""
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("step") not in STEPS:
        return None
    kind = str(d["step"])
    fields = {}
    for k in STEPS[kind]:
        v = d.get(k)
        if isinstance(v, bool | int) or (isinstance(v, str) and TOKEN.match(v)):
            fields[k] = v
    return kind, fields


# --- the worker ---

def say(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def where(cfg: config.Config) -> fetch.Where:
    import ssl  # noqa: PLC0415

    u = cfg.update
    assert u is not None
    ca = u.ca or (cfg.operations.ca if cfg.operations else None)
    tls = ssl.create_default_context(cafile=str(ca) if ca else None)
    return fetch.Where(tls=tls, ssh_key=u.ssh_key, known_hosts=u.known_hosts)


def work(cfg: config.Config, url: str, sha256: str, reboot: bool) -> int:
    """Fetch, check, install, reboot; its steps on stdout. The exit code: 0 installed."""
    from appliance.cli import update as cli_update  # noqa: PLC0415 - cli imports us

    url, sha256, reboot = check_args(cfg, {"url": url, "sha256": sha256, "reboot": reboot})
    assert cfg.update is not None
    into = download_dir(cfg)
    durable.make_dirs(into)
    fd = os.open(into / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        say("update.failed", reason="busy")
        return 75
    marks = _Progress()
    try:
        bundle = fetch.fetch(url, sha256, into, where(cfg), max_bytes=cfg.update.max_mb << 20,
                             deadline_s=cfg.update.deadline_s, progress=marks)
    except fetch.FetchError as e:
        say("update.failed", reason=e.reason)
        return e.exit_code
    say("update.fetched", bytes=bundle.stat().st_size)
    try:
        version = str(rauc.info(bundle).get("version", ""))
        slot = cli_update.install(cfg, bundle, version)
    except rauc.UpdateError:
        say("update.refused", reason="rauc refused")
        bundle.unlink()
        return rauc.UpdateError.exit_code
    bundle.unlink()  # in the slot now; /data needs the room
    say("update.installed", bundle_version=version, slot=slot, reboot=reboot)
    return cli_update._reboot(cfg, cli_update.REBOOT_WAIT_S) if reboot else 0


class _Progress:
    """A progress line at each quarter of a download of known size."""

    def __init__(self) -> None:
        self.next = PROGRESS_EVERY
        self.started = time.monotonic()

    def __call__(self, have: int, total: int | None) -> None:
        if total and have / total >= self.next:
            say("update.progress", bytes=have, total=total)
            while self.next <= have / total:
                self.next += PROGRESS_EVERY


def cmd_update_fetch(cfg: config.Config, url: str, sha256: str, reboot: bool) -> int:
    try:
        return work(cfg, url, sha256, reboot)
    except ApplianceError as e:
        say("update.failed", reason="refused")
        log.error("update.worker_failed", error_type=type(e).__name__)
        return e.exit_code
