"""Desired config: a signed TOML drop-in from the operations center, applied by a restart
and kept only if the daemon is healthy with it; otherwise the previous one comes back.

The center publishes on `appliance/<name>/config` (retained, QoS 1) an envelope signed
like a command (ops/commands.py: the same parse, signature, box and time checks; `op`
"config", `args` `{"version": N, "toml": TEXT}`, at most MAX_CONFIG_BYTES). The box:
  1. refuses (logged `config.refused`, an ops event, and audited) what is unsigned, for
     another box, expired (410; a config may live MAX_TTL_S, 30 days), not newer than
     the applied version (409), not TOML, sets a key of FORBIDDEN (422 naming it), or
     fails the checks of `appliance config check` (422, the checker is the CLI's, passed in);
  2. else writes the pending record (`remote.d/.remote-pending.json`: version, digest,
     deadline, the previous drop-in's text), then the drop-in `remote.d/50-remote.toml`,
     each atomically and durably (core/durable.py), and asks the daemon to restart
     (re-exec of the same command line: the same PID, so it works under systemd and in
     the foreground alike);
  3. at the next start, before the config is read (`at_start`): a pending record that a
     start has already tried means that start failed (it exited, was killed or hung):
     the previous drop-in is put back. Otherwise the record is marked tried;
  4. the running daemon confirms (`check`) once every stage has been healthy for
     CONFIRM_AFTER_S: the version is applied (`remote.d/.remote-applied.json`, event
     `config.applied`). Past `[operations] config_deadline_s` without that, or when the
     start fails with an error (`rollback` from `appliance run`), the previous drop-in is
     restored and the daemon restarts; the rolled-back start says `config.rolled_back`.
A retained config is seen again on every connection: one already applied, pending,
rolled back or refused (same bytes) is left alone, so it is applied once; only the
refusals of TRY_AGAIN (a forgery, the clock, a drop-in that could not be written: 500)
are looked at again at the next connection.

The drop-in and its records live in the config's remote folder (`config.remote_dir`:
`/data/config/remote.d` on the image, beside the link to the imported set, so that a
stick import does not replace them; `remote.d` beside the main file otherwise), read
after the technician's conf.d so that the center's keys win. The records are hidden files
there (not config: core/config.py) so that they are found before the state directory is
known, and whatever the new config says. A technician removes a bad remote drop-in on
site with a stick (`clear`, below; cli/config_import.py): the applied record keeps the
cleared version and digest, so the retained message is not applied again, and only a
newer version from the center puts a remote drop-in back.

Nothing here logs the TOML (it names hosts and paths, never patient data, but it is the
center's business): versions, digests and codes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit import AuditTrail
from appliance.core import config, durable
from appliance.core.errors import ConfigError
from appliance.ops import commands
from appliance.ops.commands import Refused

log = structlog.get_logger("appliance.ops")

REMOTE_NAME = "50-remote.toml"
PENDING_NAME = ".remote-pending.json"
APPLIED_NAME = ".remote-applied.json"
MAX_CONFIG_BYTES = 64 << 10
CONFIRM_AFTER_S = 5.0  # healthy at least this long after the start before it is kept
OP = "config"
# A signed config may stay valid far longer than a command (commands.MAX_TTL_S, an hour):
# its replay rule is its version (only a newer one is applied), not a replay record, and
# a retained config must still reach a box that was off for days (a truck in the yard
# over a long weekend). `fleet config push --ttl` defaults to PUSH_TTL_S.
MAX_TTL_S = 30 * 86400.0
PUSH_TTL_S = 7 * 86400.0

# What a remote config may never set: the link it came by and the box's identity, state
# and keys (a wrong one is not undone by a restart: the box would be cut off, or its
# spool unreadable). A table name forbids every key in it.
FORBIDDEN = ("operations", "appliance.name", "appliance.state_dir", "spool.key_file",
             "encryption", "audit")

Checker = Callable[[Path, dict[str, Any]], list[str]]
# Refusals not recorded, so that the same message is looked at again at the next
# connection: a forgery (it does not get to fill the record), a clock not yet
# synchronised, a drop-in that could not be written (remote.d not writable).
TRY_AGAIN = frozenset({403, 500, 503})


@dataclass(frozen=True)
class Paths:
    dropin: Path
    pending: Path
    applied: Path


def paths(main: Path) -> Paths:
    return paths_in(config.remote_dir(main))


def paths_in(folder: Path) -> Paths:
    """The drop-in and records in a remote folder (`config.remote_dir`)."""
    return Paths(folder / REMOTE_NAME, folder / PENDING_NAME, folder / APPLIED_NAME)


def forbidden_key(data: Mapping[str, Any]) -> str | None:
    """The first key of FORBIDDEN that `data` sets (None: none)."""
    for key in FORBIDDEN:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return key
    return None


def parse_checker(main: Path, data: dict[str, Any]) -> list[str]:
    """The config with `data` as the remote drop-in, parsed (the least check; the daemon
    gets the CLI's, which also checks every file the config names)."""
    try:
        config.parse(*config.read(main, {paths(main).dropin: data}))
    except ConfigError as e:
        return e.problems
    return []


# --- the records ---

def _text(p: Path) -> str | None:
    try:
        return p.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read(p: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(p.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        log.error("config.record_unreadable", record=p.name)
        return None
    return doc if isinstance(doc, dict) else None


def _write(p: Path, doc: dict[str, Any]) -> None:
    durable.make_dirs(p.parent, mode=0o755)
    durable.atomic_write(p, json.dumps(doc, sort_keys=True).encode())


def applied(main: Path) -> dict[str, Any]:
    return _read(paths(main).applied) or {"version": 0}


def pending(main: Path) -> dict[str, Any] | None:
    return _read(paths(main).pending)


def status(main: Path) -> dict[str, Any]:
    """For `state` and `appliance status`: the applied version, the one on probation, the
    last rolled back and the last refused (versions and codes only)."""
    a, p = applied(main), pending(main)
    rb, rf, cl = a.get("rolled_back") or {}, a.get("refused") or {}, a.get("cleared") or {}
    return {"version": a.get("version", 0), "pending": p.get("version") if p else None,
            "rolled_back": rb.get("version"), "rolled_back_at": rb.get("at"),
            "refused": rf.get("version"), "refused_code": rf.get("code"),
            "cleared": cl.get("version"), "cleared_at": cl.get("at")}


def at_start(main: Path, now: float | None = None) -> bool:
    """Before the config is read: roll back a drop-in that a start already tried (it did
    not confirm: it failed, was killed or hung). True when it rolled back."""
    p = pending(main)
    if p is None:
        return False
    if p.get("tried"):
        rollback(main, "did not start", now)
        return True
    _write(paths(main).pending, {**p, "tried": True})
    return False


def rollback(main: Path, reason: str, now: float | None = None) -> bool:
    """Put the previous drop-in back (or none, if there was none) and record why; the
    next start reports it (`report`). False when nothing was pending."""
    ps = paths(main)
    p = pending(main)
    if p is None:
        return False
    prev = p.get("previous")
    if isinstance(prev, str):
        durable.atomic_write(ps.dropin, prev.encode())
    else:
        durable.unlink_durable(ps.dropin)
    a = applied(main)
    a["rolled_back"] = {"version": p.get("version"), "digest": p.get("digest"),
                        "at": time.time() if now is None else now, "reason": reason, "reported": False}
    _write(ps.applied, a)
    durable.unlink_durable(ps.pending)
    return True


def in_force(folder: Path) -> dict[str, Any] | None:
    """What the remote folder holds now, for a technician (the import's result file):
    the drop-in (its path and the keys it sets), the applied version, one on probation.
    None: no remote drop-in."""
    ps = paths_in(folder)
    text = _text(ps.dropin)
    if text is None:
        return None
    a, p = _read(ps.applied) or {}, _read(ps.pending)
    try:
        keys = sorted(_leaf_keys(tomllib.loads(text)))
    except tomllib.TOMLDecodeError:
        keys = ["(not valid TOML)"]
    return {"file": ps.dropin, "version": a.get("version", 0), "pending": p.get("version") if p else None,
            "keys": keys}


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out += _leaf_keys(v, key) if isinstance(v, Mapping) else [key]
    return out


def clear(folder: Path, now: float | None = None) -> int | None:
    """Remove the remote drop-in (a technician's stick: cli/config_import.py) and any
    probation. The applied record keeps its version and digest and records what was
    cleared, so that the retained message is not applied again: only a newer version
    from the center brings a remote drop-in back. The version cleared (0: a drop-in of
    no known version); None when there was nothing to clear."""
    ps = paths_in(folder)
    p = _read(ps.pending)
    if p is None and not ps.dropin.exists():
        return None
    a = _read(ps.applied) or {"version": 0}
    gone = p if p is not None else a
    a["cleared"] = {"version": gone.get("version", 0), "digest": gone.get("digest"),
                    "at": time.time() if now is None else now}
    durable.unlink_durable(ps.dropin)
    durable.unlink_durable(ps.pending)
    _write(ps.applied, a)
    log.warning("config.cleared", version=gone.get("version", 0))
    return int(gone.get("version", 0))


def report(main: Path) -> None:
    """Once the daemon runs (its events reach the outbox): say what a rollback did."""
    a = applied(main)
    rb = a.get("rolled_back")
    if isinstance(rb, dict) and not rb.get("reported"):
        log.warning("config.rolled_back", version=rb.get("version"), reason=rb.get("reason"),
                    applied_version=a.get("version", 0))
        _write(paths(main).applied, {**a, "rolled_back": {**rb, "reported": True}})


# --- the box's side of the topic ---

class Desired:
    """`handle(topic, payload)` -> True when a new drop-in is in place and the daemon must
    restart; `check(healthy, uptime_s)` during the probation."""

    def __init__(self, main: Path, name: str, keys: Mapping[str, Ed25519PublicKey], deadline_s: float,
                 audit: AuditTrail, checker: Checker = parse_checker,
                 synced: Callable[[], bool | None] = commands.clock_synchronised) -> None:
        self.main = main.absolute()
        self.paths = paths(self.main)
        self.name = name
        self.keys = dict(keys)
        self.deadline_s = deadline_s
        self.audit = audit
        self.checker = checker
        self.synced = synced

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> bool:
        if not payload:
            return False  # the center cleared the retained config: nothing is desired
        now = time.time() if now is None else now
        digest = hashlib.sha256(payload).hexdigest()
        a, p = applied(self.main), pending(self.main)
        known = {a.get("digest"): "applied", (a.get("rolled_back") or {}).get("digest"): "rolled back",
                 (a.get("refused") or {}).get("digest"): "refused", (p or {}).get("digest"): "pending",
                 (a.get("cleared") or {}).get("digest"): "cleared on site"}
        known.pop(None, None)
        if digest in known:  # seen (a retained message, again at a reconnect): applied once
            log.info("config.reconciled", outcome=known[digest], version=a.get("version", 0))
            return False
        version: Any = None
        operator = "ops-center:unverified"
        try:
            cmd, signed, sig = commands.parse(payload, MAX_CONFIG_BYTES)
            commands.verify(signed, sig, cmd["key_id"], self.keys)
            operator = f"ops-center:{cmd['key_id']}"
            if topic != f"appliance/{self.name}/config" or cmd["box"] != self.name:
                raise Refused(422, "for another box")
            version, text = _args(cmd)
            if version <= int(a.get("version", 0)):
                raise Refused(409, f"version {version} is not newer than the applied {a.get('version', 0)}")
            commands.check_time(cmd, now, self.synced(), MAX_TTL_S)
            data = _toml(text)
            self._check(data)
            self._apply(digest, version, text, now)
        except Refused as e:
            self._refused(digest, version, operator, e, now)
            return False
        self.audit.command(operator, OP, f"v{version}", True, "200 applying", area="ops")
        return True

    def _check(self, data: dict[str, Any]) -> None:
        key = forbidden_key(data)
        if key is not None:
            raise Refused(422, f"{key} may not be set remotely")
        problems = self.checker(self.main, data)
        if problems:
            raise Refused(422, "does not pass config check: " + "; ".join(problems[:5]))

    def _refused(self, digest: str, version: Any, operator: str, e: Refused, now: float) -> None:
        v = version if isinstance(version, int) else None
        key = next((k for k in FORBIDDEN if e.detail.startswith(f"{k} may not")), None)
        log.warning("config.refused", version=v, code=e.code, reason=commands.CODES.get(e.code),
                    **({"key": key} if key else {}))
        if e.code not in TRY_AGAIN:
            a = applied(self.main)
            _write(self.paths.applied, {**a, "refused": {"version": v, "digest": digest, "code": e.code,
                                                          "at": now}})
        self.audit.command(operator, OP, f"v{v}" if v else "-", False, f"{e.code} {e.detail}", area="ops")

    def _apply(self, digest: str, version: int, text: str, now: float) -> None:
        try:
            previous = _text(self.paths.dropin)
            _write(self.paths.pending, {"version": version, "digest": digest, "at": now,
                                        "deadline": now + self.deadline_s, "previous": previous,
                                        "tried": False})
            durable.atomic_write(self.paths.dropin, text.encode())
        except OSError as e:
            with contextlib.suppress(OSError):
                durable.unlink_durable(self.paths.pending)
            raise Refused(500, f"cannot write {self.paths.dropin.parent} ({e.strerror or type(e).__name__})"
                          ) from None
        log.info("config.applying", version=version)

    def check(self, healthy: bool, uptime_s: float, now: float | None = None) -> str | None:
        """During a probation (a start under the drop-in: `at_start` marked it tried):
        "applied" once healthy for CONFIRM_AFTER_S, "rolled back" past the deadline (the
        daemon must then restart), None otherwise."""
        now = time.time() if now is None else now
        p = pending(self.main)
        if p is None or not p.get("tried"):
            return None  # nothing on probation, or not yet restarted under it
        if healthy and uptime_s >= CONFIRM_AFTER_S:
            a = applied(self.main)
            _write(self.paths.applied, {**a, "version": p["version"], "digest": p["digest"], "at": now})
            durable.unlink_durable(self.paths.pending)
            log.info("config.applied", version=p["version"])
            return "applied"
        if now > float(p.get("deadline", 0)):
            rollback(self.main, "not healthy", now)
            return "rolled back"
        return None


def _args(cmd: Mapping[str, Any]) -> tuple[int, str]:
    if cmd["op"] != OP:
        raise Refused(404, "unknown op")
    args = cmd["args"]
    v, text = args.get("version"), args.get("toml")
    if set(args) != {"version", "toml"} or not isinstance(v, int) or isinstance(v, bool) \
            or not 1 <= v < 2**53 or not isinstance(text, str):
        raise Refused(422, "bad args: give version (a positive integer) and toml (text)")
    return v, text


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Refused(422, f"not valid TOML: {e}") from None


def build(main: Path, cfg: config.Config, audit: AuditTrail, checker: Checker = parse_checker) -> Desired:
    ops = cfg.operations
    assert ops is not None
    return Desired(main, cfg.appliance.name, commands.load_keys(ops.command_keys), ops.config_deadline_s,
                   audit, checker)


def envelope(box: str, version: int, text: str, key: Any, *, now: float,
             ttl_s: float = PUSH_TTL_S) -> bytes:
    """The center's side: the signed message for appliance/<box>/config."""
    return commands.envelope(commands.body(box, OP, {"version": version, "toml": text}, key,
                                           now=now, ttl_s=ttl_s), key)
