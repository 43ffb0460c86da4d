"""Signed commands from the operations center: checked, run like a local operator's, answered.

A command arrives on `appliance/<name>/cmd` (QoS 1) as an envelope
`{"body": <canonical JSON string>, "sig": <base64 Ed25519 signature of body's UTF-8>}`;
the body is `{cmd_id, box, op, args, issued_at, expires_at, nonce, key_id}`, canonical =
`json.dumps(sort_keys=True, separators=(",", ":"))` (a body that is not canonical is
refused, so one command has one signed form). `key_id` names one of `[operations]
command_keys` (`key_id()`: the first 16 hex digits of SHA-256 over the raw public key).

`Commands.handle` answers every message with a result for `cmd/result`, in this order
(the first failing check gives the code, HTTP-like):
  400 malformed (too big, not JSON, fields missing or of the wrong type, not canonical)
  403 unknown key_id or bad signature
  422 another box's name in the topic or the body; a lifetime beyond MAX_TTL_S; bad args
  503 the clock is not synchronised (the kernel's view: link.clock_synchronised)
  410 expired;  409 replay (cmd_id or nonce seen before, kept until expiry)
  429 too many live commands remembered (SEEN_MAX); a diagnostics upload already running
  404 unknown op (or, from the queue, an unknown item);  500 internal
  502 diagnostics to sftp: the upload failed (result.reason: a class of messages.REASON_CLASSES)
  200 done, with the operation's result.
The replay record is written (durably) before the operation runs: a command runs at
most once, even across a restart.

Operations (`OPS`) go through the daemon's control socket handlers (health/control.py),
exactly like `appliance queue ...`, with `_operator` = "ops-center:<key_id>" for the
audit trail: ping, status (the `state` summary: no patient data), hold/release/retry
one item (`{"id": ID}`) or every item (`{"all": true}`), pause/resume forwarding,
off/on a destination (`{"destination": NAME}`, forward/controls.py), log_level
(`{"level": L}`, until the daemon restarts), replay_events (`{"since": N}`: the kept
events after N are sent again), diagnostics (ops/diagnostics.py: a PHI-free document in
parts on diagnostics/<cmd_id>; with `{"to": "sftp"}` uploaded instead to [operations.diagnostics]
by ops/diagdrop.py, off the link's thread: `handle` then returns `{"_later": job}` and the
link publishes job()'s result when the upload ends, within the place's timeout_s; without
that table such a command is 422), update (`{"url", "sha256", "reboot"}`: update/remote.py
fetches and installs a bundle in a worker; 200 says accepted, update.* events follow; a
url outside `[update] sources` is 403). None touches images, reveals
patient data or opens a shell. Every command and every refusal is audited
(AuditTrail.command) and logged (`ops.command` / `command.refused`, which is also an ops
event), with opaque ids only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit import AuditTrail
from appliance.core import durable
from appliance.core.config import Config
from appliance.core.errors import ApplianceError, NotFoundError, PermissionDeniedError
from appliance.ops import diagdrop, diagnostics, messages
from appliance.ops.link import boot_id
from appliance.ops.link import clock_synchronised as kernel_clock_synchronised

log = structlog.get_logger("appliance.ops")

SCHEMA = 1
MAX_COMMAND_BYTES = 16 << 10
MAX_RESULT_BYTES = 64 << 10
MAX_TTL_S = 3600.0  # issued_at .. expires_at at most this: the replay record stays bounded
CLOCK_SKEW_S = 60.0  # issued_at may be this far in our future
SEEN_MAX = 10_000
CLOCK_ENV = "APPLIANCE_CLOCK_SYNCED"  # tests only: "1"/"0" forces the clock's state

FIELDS: dict[str, type | tuple[type, ...]] = {
    "cmd_id": str, "box": str, "op": str, "args": dict, "issued_at": (int, float),
    "expires_at": (int, float), "nonce": str, "key_id": str}
TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
ITEM_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
DEST_NAME = TOKEN  # a destination as the config names it
LOG_LEVELS = ("debug", "info", "warning", "error")

CODES = {200: "ok", 400: "malformed", 403: "forbidden", 404: "not found", 409: "replay",
         410: "expired", 422: "unprocessable", 429: "too many", 500: "internal error",
         502: "failed", 503: "clock not synchronised"}


class Refused(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# --- signing (the operations center's side, and the tests') ---

def canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def key_id(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def body(box: str, op: str, args: Mapping[str, Any], key: Ed25519PrivateKey, *, now: float,
         ttl_s: float = 300.0, cmd_id: str | None = None, nonce: str | None = None) -> dict[str, Any]:
    return {"cmd_id": cmd_id or os.urandom(8).hex(), "box": box, "op": op, "args": dict(args),
            "issued_at": round(now, 3), "expires_at": round(now + ttl_s, 3),
            "nonce": nonce or base64.urlsafe_b64encode(os.urandom(18)).decode(),
            "key_id": key_id(key.public_key())}


def envelope(cmd: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    text = canonical(cmd)
    sig = base64.b64encode(key.sign(text.encode())).decode()
    return json.dumps({"body": text, "sig": sig}).encode()


# --- the replay record ---

class Seen:
    """cmd_id and nonce of every command accepted or refused after its signature was
    checked, until it expires: SQLite `STATE/ops/commands.db` (synchronous=FULL)."""

    def __init__(self, state_dir: Path, limit: int = SEEN_MAX) -> None:
        d = state_dir / "ops"
        durable.make_dirs(d)
        self.limit = limit
        self._lock = threading.Lock()
        self._db = sqlite3.connect(d / "commands.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (cmd_id TEXT PRIMARY KEY, nonce TEXT NOT NULL"
                         " UNIQUE, expires_at REAL NOT NULL)")

    def add(self, cmd_id: str, nonce: str, expires_at: float, now: float) -> None:
        """Remember a command; Refused 409 if its cmd_id or nonce is known, 429 when full."""
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
            hit = self._db.execute("SELECT 1 FROM seen WHERE cmd_id=? OR nonce=?", (cmd_id, nonce)).fetchone()
            if hit:
                raise Refused(409, "replay: cmd_id or nonce already seen")
            if self._db.execute("SELECT count(*) FROM seen").fetchone()[0] >= self.limit:
                raise Refused(429, f"more than {self.limit} live commands remembered")
            self._db.execute("INSERT INTO seen VALUES (?, ?, ?)", (cmd_id, nonce, expires_at))

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- checks (pure) ---

def parse(payload: bytes, limit: int = MAX_COMMAND_BYTES) -> tuple[dict[str, Any], bytes, bytes]:
    """(body, signed bytes, signature) of an envelope of at most `limit` bytes; Refused
    400 otherwise."""
    if len(payload) > limit:
        raise Refused(400, f"command larger than {limit} bytes")
    try:
        env = json.loads(payload)
        text, sig = env["body"], base64.b64decode(env["sig"], validate=True)
        if not isinstance(text, str):
            raise TypeError
        cmd = json.loads(text)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise Refused(400, "not a command envelope") from None
    if not isinstance(cmd, dict) or set(cmd) != set(FIELDS):
        raise Refused(400, f"the body needs exactly {', '.join(sorted(FIELDS))}")
    for k, t in FIELDS.items():
        if not isinstance(cmd[k], t) or isinstance(cmd[k], bool):
            raise Refused(400, f"{k} has the wrong type")
    if not (math.isfinite(cmd["issued_at"]) and math.isfinite(cmd["expires_at"])):
        raise Refused(400, "issued_at and expires_at must be finite")
    for k in ("cmd_id", "box", "op", "key_id"):
        if not TOKEN.match(cmd[k]):
            raise Refused(400, f"{k} is not a token")
    if not NONCE.match(cmd["nonce"]):
        raise Refused(400, "nonce is not 16-64 base64url characters")
    if canonical(cmd) != text:
        raise Refused(400, "the body is not canonical JSON")
    return cmd, text.encode(), sig


def verify(signed: bytes, sig: bytes, kid: str, keys: Mapping[str, Ed25519PublicKey]) -> None:
    key = keys.get(kid)
    if key is None:
        raise Refused(403, "unknown key_id")
    try:
        key.verify(sig, signed)
    except InvalidSignature:
        raise Refused(403, "bad signature") from None


def check_time(cmd: Mapping[str, Any], now: float, synced: bool | None,
               max_ttl_s: float = MAX_TTL_S) -> None:
    if cmd["expires_at"] - cmd["issued_at"] > max_ttl_s or cmd["expires_at"] < cmd["issued_at"]:
        raise Refused(422, f"lifetime beyond {max_ttl_s:.0f} s")
    if not synced:
        raise Refused(503, "the clock is not synchronised")
    if now > cmd["expires_at"]:
        raise Refused(410, "expired")
    if cmd["issued_at"] > now + CLOCK_SKEW_S:
        raise Refused(422, "issued in the future")


# --- operations ---

@dataclass(frozen=True)
class Op:
    handler: str | None  # the control socket's command, None: answered here
    args: Callable[[Mapping[str, Any]], dict[str, Any]]  # ValueError: 422
    cmd_id: bool = False  # the handler also gets `_cmd_id` (for the events that follow)


def _no_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise ValueError("takes no arguments")
    return {}


def _queue(verb: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    def build(args: Mapping[str, Any]) -> dict[str, Any]:
        if set(args) - {"id", "all"}:
            raise ValueError("takes id or all")
        item, every = args.get("id"), args.get("all", False)
        if not isinstance(every, bool) or (item is not None and not (isinstance(item, str)
                                                                    and ITEM_ID.match(item))):
            raise ValueError("id must be an item id, all true or false")
        if every == (item is not None):
            raise ValueError("give id or all=true")
        return {"verb": verb, "id": item, "all": every}
    return build


def _switch(verb: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """pause/resume forwarding (no args), a destination off/on (args: destination)."""
    def build(args: Mapping[str, Any]) -> dict[str, Any]:
        if verb in ("pause", "resume"):
            return {"verb": verb, **_no_args(args)}
        name = args.get("destination")
        if set(args) != {"destination"} or not (isinstance(name, str) and DEST_NAME.match(name)):
            raise ValueError("takes destination, a destination's name")
        return {"verb": verb, "destination": name}
    return build


def _since(args: Mapping[str, Any]) -> dict[str, Any]:
    since = args.get("since")
    if isinstance(since, str) and since.isascii() and since.isdigit() and len(since) <= 18:
        since = int(since)  # `fleet send ... --arg since=N` sends text
    if set(args) != {"since"} or isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ValueError("takes since, an event_seq (0: every event kept)")
    return {"since": since}


def _diagnostics(args: Mapping[str, Any]) -> dict[str, Any]:
    """No args (the parts over MQTT), or `to`: "sftp" (uploaded to [operations.diagnostics])."""
    if args and (set(args) != {"to"} or args["to"] != "sftp"):
        raise ValueError('takes no arguments, or to: "sftp"')
    return dict(args)


def _log_level(args: Mapping[str, Any]) -> dict[str, Any]:
    if set(args) != {"level"} or args["level"] not in LOG_LEVELS:
        raise ValueError(f"takes level, one of {', '.join(LOG_LEVELS)}")
    return {"level": args["level"]}


OPS: dict[str, Op] = {
    "ping": Op(None, _no_args),
    "status": Op("status", _no_args),
    "hold": Op("queue.change", _queue("hold")),
    "release": Op("queue.change", _queue("release")),
    "retry": Op("queue.change", _queue("retry")),
    "pause": Op("forward.switch", _switch("pause")),
    "resume": Op("forward.switch", _switch("resume")),
    "off": Op("forward.switch", _switch("off")),
    "on": Op("forward.switch", _switch("on")),
    "log_level": Op("log.level", _log_level),
    "replay_events": Op("events.replay", _since),
    "diagnostics": Op("diagnostics", _diagnostics),
    # url, sha256, reboot: checked against [update] by the handler (update/remote.py), which
    # answers 403 for a url outside the sources; the outcome follows as update.* events
    "update": Op("update.start", dict, cmd_id=True),
}
# The daemon's handlers that write the audit trail themselves (with the outcome they know).
SELF_AUDITED = {"queue.change", "forward.switch", "log.level"}


def clock_synchronised() -> bool | None:
    forced = os.environ.get(CLOCK_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return kernel_clock_synchronised()


class Commands:
    """The box's side: `handle(topic, payload)` -> the result message for cmd/result."""

    def __init__(self, name: str, keys: Mapping[str, Ed25519PublicKey], seen: Seen,
                 handlers: Mapping[str, Callable[[dict[str, Any]], Any]], audit: AuditTrail,
                 summary: Callable[[dict[str, Any]], dict[str, Any]],
                 synced: Callable[[], bool | None] = clock_synchronised,
                 drop: diagdrop.Drop | None = None) -> None:
        self.name = name
        self.keys = dict(keys)
        self.seen = seen
        self.handlers = handlers
        self.audit = audit
        self.summary = summary
        self.synced = synced
        self.drop = drop  # [operations.diagnostics]: where diagnostics go with to: sftp
        self.last: dict[str, Any] | None = None  # the last command, for `appliance status`

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        cmd: dict[str, Any] = {}
        operator = "ops-center:unverified"
        audited = False
        attached: list[dict[str, Any]] = []
        try:
            cmd, signed, sig = parse(payload)
            verify(signed, sig, cmd["key_id"], self.keys)
            operator = f"ops-center:{cmd['key_id']}"
            if topic != f"appliance/{self.name}/cmd" or cmd["box"] != self.name:
                raise Refused(422, "for another box")
            check_time(cmd, now, self.synced())
            self.seen.add(cmd["cmd_id"], cmd["nonce"], float(cmd["expires_at"]), now)
            op = OPS.get(cmd["op"])
            if op is None:
                raise Refused(404, "unknown op")
            try:
                args = op.args(cmd["args"])
            except ValueError as e:
                raise Refused(422, f"bad args: {e}") from None
            audited = op.handler in SELF_AUDITED
            upload = op.handler == "diagnostics" and args.get("to") == "sftp"
            if upload and self.drop is None:
                raise Refused(422, "to sftp: no [operations.diagnostics] place is configured on"
                                   " this box")
            code, detail, result = self._run(op, args, operator, str(cmd["cmd_id"]))
            if upload and code == 200:  # uploaded off the link's thread; the result follows
                assert self.drop is not None
                if not self.drop.reserve():
                    raise Refused(429, "a diagnostics upload is already running")
                doc, later = result, dict(cmd)
                return {"_later": lambda: self._uploaded(later, operator, doc)}
            if op.handler == "diagnostics" and code == 200:  # sent in parts before the result
                attached, result = diagnostics.parts(diagnostics.pack(result), str(cmd["cmd_id"]))
        except Refused as e:
            code, detail, result = e.code, e.detail, None
        except Exception as e:  # a result in any case: the center is waiting for one
            log.exception("ops.command_failed", error_type=type(e).__name__)
            code, detail, result = 500, f"internal error ({type(e).__name__})", None
            audited = False  # change_audited records ApplianceErrors only
        if not audited:
            self.audit.command(operator, str(cmd.get("op") or "?"), _target(cmd.get("args")), code == 200,
                               f"{code} {detail}", area="ops")
        msg = self._answer(cmd, code, detail, result, now)
        if attached:
            msg["_parts"] = attached  # ops/link.py publishes them on diagnostics/<cmd_id> first
        return msg

    def _uploaded(self, cmd: dict[str, Any], operator: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Upload a diagnostics document (a slot reserved) and answer the command: the
        result that `handle` deferred. Runs on a thread of its own (ops/link.py)."""
        assert self.drop is not None
        try:
            code, detail, result = 200, "ok", self.drop.upload(doc, str(cmd["cmd_id"]))
        except diagdrop.Failed as e:
            code, detail, result = 502, f"the upload failed: {e.reason}", {"to": "sftp", "reason": e.reason}
        except Exception as e:  # a result in any case: the center is waiting for one
            log.exception("ops.command_failed", error_type=type(e).__name__)
            code, detail, result = 500, f"internal error ({type(e).__name__})", None
        self.audit.command(operator, "diagnostics", "sftp", code == 200, f"{code} {detail}", area="ops")
        return self._answer(cmd, code, detail, result, time.time())

    def _run(self, op: Op, args: dict[str, Any], operator: str, cmd_id: str) -> tuple[int, str, Any]:
        if op.handler is None:
            return 200, "pong", {"pong": True}
        try:
            extra = {"_cmd_id": cmd_id} if op.cmd_id else {}
            got = self.handlers[op.handler]({**args, "_operator": operator, **extra})
        except NotFoundError as e:
            return 404, str(e), None
        except PermissionDeniedError as e:
            return 403, str(e), None
        except ApplianceError as e:
            return 422, str(e), None
        if op.handler == "status":
            return 200, "ok", self.summary(got)
        return 200, "ok", got

    def _answer(self, cmd: Mapping[str, Any], code: int, detail: str, result: Any,
                now: float) -> dict[str, Any]:
        op, cmd_id = cmd.get("op"), cmd.get("cmd_id")
        if code == 200:
            log.info("ops.command", cmd_id=cmd_id, op=op, code=code, key_id=cmd.get("key_id"))
        else:
            log.warning("command.refused", cmd_id=cmd_id, op=op, code=code, reason=CODES.get(code))
        msg = {"v": SCHEMA, "cmd_id": cmd_id, "box": self.name, "op": op, "code": code, "ok": code == 200,
               "detail": detail, "result": result, "ts": now}
        if len(json.dumps(msg, default=str)) > MAX_RESULT_BYTES:
            msg["result"], msg["truncated"] = None, True
        self.last = {"cmd_id": cmd_id, "op": op, "code": code, "ts": now}
        return msg


def _target(args: Any) -> str:
    if isinstance(args, dict):
        if isinstance(args.get("id"), str) and ITEM_ID.match(args["id"]):
            return str(args["id"])
        if args.get("all") is True:
            return "all"
        for k in ("destination", "level"):
            if isinstance(args.get(k), str) and DEST_NAME.match(args[k]):
                return str(args[k])
    return "-"


def load_keys(paths: tuple[Path, ...]) -> dict[str, Ed25519PublicKey]:
    """key_id -> key of each `[operations] command_keys` file (KeyFileError names a bad one)."""
    from appliance.core import crypto

    keys: dict[str, Ed25519PublicKey] = {}
    for p in paths:
        k: Ed25519PublicKey = crypto.load_public_key_of(p, Ed25519PublicKey, "Ed25519")
        keys[key_id(k)] = k
    return keys


def build(cfg: Config, handlers: Mapping[str, Callable[[dict[str, Any]], Any]],
          audit: AuditTrail) -> Commands:
    """The box's command handler for a config with [operations] (keys loaded now: a bad
    key file stops the start, as `appliance config check` says)."""
    ops = cfg.operations
    assert ops is not None
    boot = boot_id()

    def summary(snap: dict[str, Any]) -> dict[str, Any]:  # what `state` shows, nothing more
        return messages.state(snap, seq=0, now=time.time(), boot_id=boot, conn_seq=0, certs={},
                              time_synced=clock_synchronised(), outbox={})

    drop = diagdrop.Drop(cfg.appliance.name, ops.diagnostics) if ops.diagnostics else None
    return Commands(cfg.appliance.name, load_keys(ops.command_keys), Seen(cfg.appliance.state_dir),
                    handlers, audit, summary, drop=drop)
