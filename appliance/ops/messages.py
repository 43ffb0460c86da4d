"""The ops link's payloads, built from plain data (pure: `now` and snapshots in, dicts out).

Topics, under `appliance/<name>/` (docs/operations.md has the JSON Schemas, version 1):
- `online` (retained): `online()` after CONNACK, `will()` as the MQTT will, `offline()`
  on a clean stop. `conn_seq` grows with each connection, across reboots, so a late
  `false` from an older connection is recognised as stale.
- `state` (retained, at most STATE_MAX_BYTES): `state()` from the daemon's snapshot (the
  supervisor's view of each stage, so a stuck stage shows as stuck).
- `events`: `event()` around an outbox record.

Nothing here copies free text from a peer or an item: errors are classes, stages and
destinations are names from the config, bundles are opaque ids. `EVENT_FIELDS` lists,
per event kind, the only fields that may leave the box.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA = 1
STATE_MAX_BYTES = 8192

# Log events (appliance/core/log.py taps) that become ops events, and the fields kept.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "destination.down": ("destination", "failures", "reason"),
    "destination.up": ("destination", "reason"),
    "instance.parked": ("bundle", "item", "destination"),
    "bundle.held": ("bundle", "destination"),
    "bundle.quarantined": ("bundle", "destination"),
    "spool.quarantined": (),
    "watchdog.withheld": ("stages",),
    "watchdog.resumed": (),
    "command.refused": ("cmd_id", "op", "code", "reason"),  # ops/commands.py: tokens and codes
    "spool.reserve_reached": ("free_bytes", "reserve_bytes"),  # every scanner answered A700
    "spool.reserve_left": ("free_bytes", "reserve_bytes"),
    # a stage's loop caught an exception and runs again (daemon._loop): its class only
    **{f"{stage}.loop_error": ("error_type",) for stage in ("pack", "forward", "failover", "receipts")},
    # an operator's switches (forward/controls.py) and the log level (daemon): who and what
    "forward.paused": ("by",),
    "forward.resumed": (),
    "destination.off": ("destination", "by"),
    "destination.on": ("destination",),
    "log.level_changed": ("level", "was", "by"),
    # ops/desired.py: versions, codes, a reason class and a key name of desired.FORBIDDEN
    "config.applied": ("version",),
    "config.rolled_back": ("version", "reason", "applied_version"),
    "config.refused": ("version", "code", "reason", "key"),
    # update/remote.py: the ops center's `update` command, step by step (tokens, counts, classes)
    "update.accepted": ("cmd_id",),
    "update.progress": ("cmd_id", "bytes", "total"),
    "update.fetched": ("cmd_id", "bytes"),
    "update.installed": ("cmd_id", "bundle_version", "slot", "reboot"),
    "update.refused": ("cmd_id", "reason"),
    "update.failed": ("cmd_id", "reason"),
    # audit/repository.py: the hospital's audit repository, by error class (never a message)
    "audit.repository_failed": ("error", "waiting"),
    "audit.repository_connected": ("waiting",),
    "audit.repository_gap": ("gaps",),
}

# `reason` of destination.down/up is a class (forward/failover.reason_class) or what
# brought it back; any other value is sent as "other", never as text.
REASON_CLASSES = frozenset({"malformed", "forbidden", "not found", "replay", "expired",
                            "unprocessable", "too many", "internal error", "clock not synchronised",
                            "timeout", "refused", "missing", "unreachable", "connection lost",
                            "rejected", "failed", "probe answered", "delivered",
                            "did not start", "not healthy",
                            # update/fetch.py and update/remote.py
                            "too big", "sha256 mismatch", "host key", "rauc refused", "busy",
                            "interrupted",  # the daemon stopped its worker (Runner.stop)
                            # update/handoff.py: the root side found no well-formed request
                            "bad request"})


def dumps(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()


def online(conn_seq: int, boot_id: str, since: float) -> dict[str, Any]:
    return {"v": SCHEMA, "online": True, "conn_seq": conn_seq, "boot_id": boot_id, "since": since}


def will(conn_seq: int, boot_id: str) -> dict[str, Any]:
    return {"v": SCHEMA, "online": False, "conn_seq": conn_seq, "boot_id": boot_id}


def offline(conn_seq: int, boot_id: str, now: float) -> dict[str, Any]:
    return {**will(conn_seq, boot_id), "clean": True, "ts": now}


def event_body(kind: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    """What an ops event keeps of a log event (None: not an ops event)."""
    keep = EVENT_FIELDS.get(kind)
    if keep is None:
        return None
    body: dict[str, Any] = {"kind": kind}
    for k in keep:
        v = fields.get(k)
        if isinstance(v, str | int | float | bool):
            body[k] = v
    if "reason" in body and body["reason"] not in REASON_CLASSES:
        body["reason"] = "other"
    if kind == "watchdog.withheld":  # problems name stages: "<stage>: <job> without progress ..."
        problems = fields.get("problems") or []
        body["stages"] = sorted({str(p).split(":", 1)[0] for p in problems})[:16]
    return body


def event(name: str, boot_id: str, seq: int, ts: float, body: dict[str, Any],
          dropped: int) -> dict[str, Any]:
    return {"v": SCHEMA, "name": name, "boot_id": boot_id, "event_seq": seq, "ts": ts,
            "dropped": dropped, **body}


def _stages(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {n: {"state": s["state"], "since_progress_s": s.get("since_progress_s"),
                "progress": s.get("progress", 0)} for n, s in stages.items()}


def _counters(receive: dict[str, Any]) -> dict[str, Any]:
    return {"instances_received": receive.get("instances_received", 0),
            "instances_refused": dict(receive.get("instances_refused", {})),
            "associations_total": receive.get("associations_total", 0),
            "associations_refused": dict(receive.get("associations_rejected_by_reason", {})),
            "connections_refused": dict(receive.get("connections_refused", {})),
            "bytes_received": receive.get("bytes_received", 0)}


def state(snap: dict[str, Any], *, seq: int, now: float, boot_id: str, conn_seq: int,
          certs: dict[str, float], time_synced: bool | None, outbox: dict[str, int]) -> dict[str, Any]:
    """The `state` message from the daemon's snapshot (Daemon.snapshot())."""
    spool = snap.get("spool", {})
    oldest = snap.get("oldest_waiting_s") or 0.0
    msg = {
        "v": SCHEMA, "name": snap["name"], "ts": now, "seq": seq, "boot_id": boot_id,
        "conn_seq": conn_seq, "version": snap.get("version"),
        "problems": len(snap.get("problems", [])),
        "stages": _stages(snap.get("stages", {})),
        "queue": {"items": dict(snap.get("queue", {})),
                  "oldest_unsent_ts": round(now - oldest) if oldest else None,
                  "parked": snap.get("forward", {}).get("parked", 0),
                  "paused": snap.get("forward", {}).get("paused") is not None},
        "destinations": [{"name": d["name"], "up": d.get("state") == "up", "off": d.get("state") == "off",
                          "since": d.get("since"),
                          "last_error": d.get("last_error"), "failures": d.get("failures", 0)}
                         for d in snap.get("destinations", [])],
        "disk": {"free_bytes": spool.get("free_bytes"), "reserve_bytes": spool.get("reserve_bytes"),
                 "spool_instances": spool.get("instances"), "spool_bytes": spool.get("bytes")},
        "certs": certs,
        "time": {"synchronised": time_synced},
        "counters": _counters(snap.get("receive", {})),
        "events": outbox,
        **({"config": snap["config"]} if "config" in snap else {}),
    }
    if "vpn" in snap:  # [vpn]: vpn/handshake.py's view (interface, up, handshake_age_s, reading)
        msg["vpn"] = {k: snap["vpn"].get(k) for k in ("interface", "up", "handshake_age_s", "reading")}
    return fit(msg)


def fit(msg: dict[str, Any]) -> dict[str, Any]:
    """At most STATE_MAX_BYTES: the per-reason counters go first, then destinations
    beyond the first 16 (a config with that many is not expected); marked `truncated`."""
    if len(dumps(msg)) <= STATE_MAX_BYTES:
        return msg
    msg = {**msg, "truncated": True}
    c = msg["counters"]
    msg["counters"] = {k: v for k, v in c.items() if not isinstance(v, dict)}
    if len(dumps(msg)) > STATE_MAX_BYTES:
        msg["destinations"] = msg["destinations"][:16]
    return msg


def comparable(msg: dict[str, Any]) -> dict[str, Any]:
    """What counts as a change of state (not the clock, the sequence, nor the times that
    move on their own)."""
    out = {k: v for k, v in msg.items() if k not in ("ts", "seq", "counters", "disk")}
    out["stages"] = {n: s["state"] for n, s in msg["stages"].items()}
    if "vpn" in msg:  # the tunnel going up or down is a change; its age ticking is not
        out["vpn"] = {k: v for k, v in msg["vpn"].items() if k != "handshake_age_s"}
    return out
