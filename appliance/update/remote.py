"""The operations center's `update` command: fetch a bundle from an allowed source, check
its SHA-256, install it as `appliance update FILE` does (docs/updates.md).

Two halves. `Runner` (in the daemon; ops/commands.py calls it through the control
handler `update.start`) checks the command's arguments, refuses a URL outside `[update]
sources` (PermissionDeniedError: 403) or a second update while one runs, and starts the
worker: a subprocess (`appliance update-fetch`), so that neither the download nor RAUC
runs on the daemon's threads. It kills the worker's process group at its deadline (the
fetch's, RAUC's and the reboot wait's), and at the daemon's stop (`stop`: SIGTERM, a
short grace, SIGKILL; the outcome `interrupted`, or the root side's result at the next
start when the bundle was already handed off). `<download_dir>/worker.json` names the
command and the worker until its outcome was reported, so that a daemon killed before it
could say anything has the next start end that worker and report `interrupted`. The
worker prints one JSON line per step on stdout; the Runner's reader thread turns each
into a log event (`update.*`), which the log tap sends as an ops event
(messages.EVENT_FIELDS): versions, slots, byte counts and reason classes, never a
server's text. Through the hand-off to root (update/handoff.py) the Runner removes the
root side's result once it sent its event; a worker that dies while the root side
installs leaves the Runner waiting for that result itself, and a daemon that starts with
a hand-off pending (`recover`: it was restarted meanwhile, or the box rebooted before
the result was read) reports the result as the outcome of the command it names, once.

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
from appliance.update import fetch, handoff, lock, rauc

log = structlog.get_logger("appliance.update")

LOCK_NAME = "fetch.lock"
MARK_NAME = "worker.json"  # the command a worker runs for, until its outcome was reported
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
TERM_GRACE_S = 3.0  # at the daemon's stop: SIGTERM, this long, then SIGKILL
KILL_WAIT_S = 2.0  # for a SIGKILLed worker to be reaped, and for the follower's last event


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
        self._thread: threading.Thread | None = None  # a worker followed, or a hand-off awaited
        self._stopping = threading.Event()  # the daemon stops: no new worker, none awaited

    def deadline_s(self) -> float:
        assert self.cfg.update is not None
        from appliance.cli.update import REBOOT_WAIT_S  # noqa: PLC0415 - cli imports us

        return self.cfg.update.deadline_s + rauc.INSTALL_TIMEOUT_S + REBOOT_WAIT_S + 120

    def start(self, args: Mapping[str, Any]) -> dict[str, Any]:
        url, sha, reboot = check_args(self.cfg, args)
        cmd_id = str(args.get("_cmd_id") or "-")
        with self._lock:
            if self._stopping.is_set():
                raise StateError("the appliance is stopping")
            if self._busy():
                raise StateError("an update is already in progress")
            if lock.pending(lock.path_in(self.cfg.appliance.state_dir)):
                raise StateError("an update is about to reboot the appliance")
            argv = [sys.executable, "-m", "appliance", "update-fetch", "--url", url, "--sha256", sha,
                    "--cmd-id", cmd_id,
                    *(["--config", str(self.cfg.sources[0])] if self.cfg.sources else []),
                    *([] if reboot else ["--no-reboot"])]
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          start_new_session=True)
            self._mark(cmd_id, self._proc.pid)
            self.emit("update.accepted", cmd_id=cmd_id)
            self._thread = threading.Thread(target=self._follow, args=(self._proc, cmd_id),
                                            name="update-worker", daemon=True)
            self._thread.start()
        return {"accepted": True}

    def recover(self) -> None:
        """At the daemon's start: a hand-off an earlier daemon left (restarted while the
        root side installed, or the box rebooted before the result was read) is awaited
        and its result reported as the outcome of the command it names; else a worker it
        left unreported (`MARK_NAME`: it was killed) is ended and its command reported
        `interrupted`."""
        with self._lock:
            if self._busy():
                return
            left = self._end_left_worker()
            if handoff.pending(self.cfg):  # the root side's result is the command's outcome
                log.info("update.handoff_pending", cmd_id=handoff.cmd_id_of(handoff.request(self.cfg)))
                self._thread = threading.Thread(target=self._await_root, args=(None, handoff.WAIT_S),
                                                name="update-handoff", daemon=True)
                self._thread.start()
            elif left is not None:
                self.emit("update.failed", cmd_id=left, reason="interrupted")
            self._unmark()

    def stop(self) -> None:
        """The daemon stops: end the fetch worker's process group (SIGTERM, TERM_GRACE_S,
        then SIGKILL; bounded), so that no worker outlives the daemon writing into
        state_dir, and wait briefly for its follower to report the outcome, once: a worker
        cut before it handed the bundle to root is `update.failed` `interrupted` now (its
        download stays for a later command to resume); one that had handed it off leaves
        the root side installing (systemd's unit, not ours to stop) and `recover` reports
        that result at the next start. A hand-off awaited without a worker is left the same
        way."""
        with self._lock:
            self._stopping.set()
            proc, thread = self._proc, self._thread
        if proc is None or proc.poll() is not None:
            return
        log.info("update.worker_stopping", pid=proc.pid)
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT_S)
        if thread is not None:
            thread.join(KILL_WAIT_S)

    def _end_left_worker(self) -> str | None:
        """The command of a worker an earlier daemon started and never reported (that
        daemon was killed, or the box lost power), None if there is none; that worker's
        process group is ended first if it still runs (SIGKILL: nobody reads it)."""
        if self.cfg.update is None:
            return None
        mark = handoff.read_record(download_dir(self.cfg) / MARK_NAME)
        if mark is None:
            return None
        pid = mark.get("pid")
        if isinstance(pid, int) and pid > 1 and self._is_our_worker(pid):
            log.warning("update.worker_left", pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT_S
            while self._is_our_worker(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        return handoff.cmd_id_of(mark)

    def _is_our_worker(self, pid: int) -> bool:
        """`pid` is alive (not a zombie) and an `update-fetch` of this config (a PID reused
        since is left alone)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"update-fetch" in argv and \
            all(str(p).encode() in argv for p in self.cfg.sources[:1])

    def _mark(self, cmd_id: str, pid: int) -> None:
        into = download_dir(self.cfg)
        durable.make_dirs(into)
        durable.atomic_write(into / MARK_NAME, json.dumps({"cmd_id": cmd_id, "pid": pid}).encode())

    def _unmark(self) -> None:
        if self.cfg.update is None:
            return
        with contextlib.suppress(FileNotFoundError):
            durable.unlink_durable(download_dir(self.cfg) / MARK_NAME)

    def running(self) -> bool:
        with self._lock:
            return self._busy()

    def _busy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()) or \
            (self._proc is not None and self._proc.poll() is None)

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
        if final:
            handoff.settle(self.cfg, cmd_id)  # sent: the root side's result is answered
        elif handoff.wanted() and handoff.pending(self.cfg):  # the worker died while root installs
            if self._stopping.is_set():
                log.info("update.handoff_left", cmd_id=cmd_id)  # for `recover` at the next start
                return
            self._unmark()
            self._await_root(cmd_id, handoff.WAIT_S)
            return
        elif self._stopping.is_set():
            handoff.withdraw(self.cfg)  # a bundle moved without its request: nobody installs it
            self.emit("update.failed", cmd_id=cmd_id, reason="interrupted")
        else:
            self.emit("update.failed", cmd_id=cmd_id,
                      reason="timeout" if proc.returncode == -signal.SIGKILL else "internal error")
        self._unmark()  # reported

    def _await_root(self, cmd_id: str | None, wait_s: float) -> None:
        """The root side's result as the command's outcome (the command it names), then
        removed; `timeout` and the request withdrawn if none comes within wait_s."""
        got = handoff.wait_result(self.cfg, None, wait_s)
        if got is None:
            req = handoff.request(self.cfg)
            self.emit("update.failed", cmd_id=cmd_id or handoff.cmd_id_of(req), reason="timeout")
            handoff.withdraw(self.cfg)
            return
        step = _step(json.dumps(got).encode()) or ("update.failed", {"reason": "internal error"})
        if step[0] not in FINAL:
            step = ("update.failed", {"reason": "internal error"})
        named = handoff.cmd_id_of(got)
        self.emit(step[0], cmd_id=named if named != "-" else cmd_id or "-", **step[1])
        handoff.settle(self.cfg, named)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    _signal(proc, signal.SIGKILL)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """To the worker's process group (it leads its own session: its children too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


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


def work(cfg: config.Config, url: str, sha256: str, reboot: bool, cmd_id: str = "-") -> int:
    """Fetch, check, install (here as root, else through the hand-off), reboot; its steps
    on stdout. The exit code: 0 installed."""
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
    if handoff.wanted():
        return _through_handoff(cfg, bundle, sha256, cmd_id, reboot)
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


def _through_handoff(cfg: config.Config, bundle: Path, sha256: str, cmd_id: str,
                     reboot: bool) -> int:
    """The root unit installs (and reboots); its result becomes this worker's last step."""
    handoff.hand_off(cfg, bundle, sha256, cmd_id, reboot)
    got = handoff.wait_result(cfg, sha256)
    if got is None:
        handoff.withdraw(cfg)  # the root side did not run: if it starts later, nothing to do
        say("update.failed", reason="timeout")
        return 75
    # The result stays until the Runner sent this line as an event (handoff.settle).
    step = str(got.get("step"))
    if step not in FINAL:
        say("update.failed", reason="internal error")
        return 70
    say(step, **{k: got[k] for k in STEPS[step] if k in got})
    return {"update.installed": 0, "update.refused": rauc.UpdateError.exit_code}.get(step, 70)


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


def cmd_update_fetch(cfg: config.Config, url: str, sha256: str, reboot: bool,
                     cmd_id: str = "-") -> int:
    try:
        return work(cfg, url, sha256, reboot, cmd_id)
    except ApplianceError as e:
        say("update.failed", reason="refused")
        log.error("update.worker_failed", error_type=type(e).__name__)
        return e.exit_code
