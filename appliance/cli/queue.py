"""`appliance queue list|show` (read from the index) and `hold|release|retry|delete`
(carried out by the running daemon over its control socket, else here under its lock:
the queue has one writer). An index that cannot be read is a StateError (exit 73)."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from typing import Any

from appliance.cli.times import TIME_FIELDS, age, when, with_iso_times
from appliance.core import config
from appliance.core.errors import StateError, UsageError


def cmd_queue_list(args: argparse.Namespace) -> int:
    from appliance.queue.index import open_index
    from appliance.queue.store import PRIORITY_STAT

    cfg = config.load(args.config)
    idx = open_index(cfg.appliance.state_dir, readonly=True)
    now = time.time()
    try:
        rows = [
            {"id": r["id"], "state": r["state"],
             "priority": "stat" if r["priority"] >= PRIORITY_STAT else "routine",
             "study": r["study_key"], "instances": r["instances"], "bytes": r["bytes"],
             "age_s": round(now - r["created"], 1), "reason": r["reason"],
             "destination": r["destination"],
             "incomplete": r["incomplete"] if "incomplete" in r.keys() else 0,  # noqa: SIM118
             "copy_to": r["copy_to"] if "copy_to" in r.keys() else None,  # noqa: SIM118
             "copy_of": r["parent"] if "copy_to" in r.keys() and r["copy_to"]  # noqa: SIM118
             and r["only_index"] is None else None}
            for r in idx.query("SELECT * FROM segments ORDER BY created")
        ]
        found = _receipts(idx)
    except sqlite3.Error as e:
        raise StateError(f"cannot read the queue index in {cfg.appliance.state_dir}: {e}") from None
    finally:
        idx.close()
    with_receipts = {d.name for d in cfg.destinations if d.receipt_key is not None}
    for r in rows:
        r["center"], r["shown"] = _center(r, found, with_receipts)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':28} {'STATE':17} {'PRIO':7} {'STUDY':16} {'INST':>6} {'BYTES':>12} {'AGE':>8}"
          f" {'DESTINATION':16} REASON")
    for r in rows:
        print(f"{r['id']:28} {r['shown']:17} {r['priority']:7} {r['study']:16} {r['instances']:>6}"
              f" {r['bytes']:>12}"
              f" {age(r['age_s']):>8} {_list_destination(r):16} {_list_reason(r)}")
    if not rows:
        print("(the queue is empty)")
    return 0


def _list_destination(row: dict[str, Any]) -> str:
    """The DESTINATION column: where it went last; a copy: "copy:<its destination>"."""
    if row["copy_to"]:
        return f"copy:{row['copy_to']}"
    return str(row["destination"] or "-")


def _list_reason(row: dict[str, Any]) -> str:
    """The REASON column: the state's reason, and an incomplete segment said first; what
    the center stored of a bundle it did not store whole."""
    c = row["center"]
    center = (f"the center stored {c['stored']} of {c['stored'] + c['failed']} instance(s)"
              if c and c["receipt"] and row["shown"] != "stored at center" else "")
    parts = [f"INCOMPLETE: {row['incomplete']} acknowledged instance(s) missing (see the log)"
             if row["incomplete"] else "", center, row["reason"] or ""]
    return "; ".join(p for p in parts if p)


def _receipts(idx: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(item, destination) -> its receipt columns; {} on an index older than schema 6."""
    try:
        rows = idx.query("SELECT item_id, destination, receipt, receipt_at, receipt_stored,"
                         " receipt_failed, receipt_center FROM deliveries WHERE state='delivered'")
    except sqlite3.OperationalError:  # no such column: the daemon has not migrated it yet
        return {}
    return {(r["item_id"], r["destination"]): dict(r) for r in rows}


def _center(row: dict[str, Any], found: dict[tuple[str, str], dict[str, Any]],
            with_receipts: set[str]) -> tuple[dict[str, Any] | None, str]:
    """(what the reading center said of a delivered item, what STATE shows). A bundle
    delivered to a destination with receipts is "uploaded" until its receipt comes."""
    if row["state"] != "delivered" or row["destination"] not in with_receipts:
        return None, row["state"]
    d = found.get((row["id"], row["destination"]))
    if d is None or d["receipt"] is None:
        return {"receipt": None}, "uploaded"
    c = {"receipt": d["receipt"], "stored": d["receipt_stored"], "failed": d["receipt_failed"],
         "at": d["receipt_at"], "center": d["receipt_center"]}
    return c, f"{center_verdict(c['stored'], c['failed'])} at center"


def center_verdict(stored: int, failed: int) -> str:
    """stored | partial | failed, from the counts (a "duplicate" receipt carries the first
    ingest's outcomes, so it reads like the receipt it repeats)."""
    if stored and not failed:
        return "stored"
    return "partial" if stored else "failed"


def cmd_queue_change(args: argparse.Namespace) -> int:
    """show (read from the index), and hold / release / retry / delete, which the running
    daemon carries out (its control socket): the queue has one writer. With no daemon
    running they are done here, under the daemon's lock."""
    from appliance.health import control
    from appliance.queue import commands

    cfg = config.load(args.config)
    if args.sub == "show":
        return _queue_show(cfg, args)
    if args.all == bool(args.id):
        raise UsageError(f"appliance queue {args.sub}: give one ID or --all")
    req = {"verb": args.sub, "id": args.id, "all": args.all}
    results = control.request(cfg.control_socket, "queue.change", req)
    if results is None:  # no daemon: act on the index ourselves, holding its lock
        from appliance.daemon import audit_trail, state_lock
        from appliance.health.control import operator_name
        from appliance.queue.index import open_index
        from appliance.queue.store import Queue

        open_index(cfg.appliance.state_dir, readonly=True).close()  # clear error if never run
        with state_lock(cfg.appliance.state_dir):
            idx = open_index(cfg.appliance.state_dir)
            try:
                results = commands.change_audited(Queue(cfg.appliance.state_dir, idx), args.sub,
                                                  args.id, args.all, audit_trail(cfg),
                                                  operator_name(os.getuid()))
            finally:
                idx.close()
    for r in results:
        print(f"{r['id']}: {r['result']}")
    if not results:
        print(f"(no item to {args.sub})")
    return 0


def _queue_show(cfg: config.Config, args: argparse.Namespace) -> int:
    from appliance.queue.commands import show
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue

    idx = open_index(cfg.appliance.state_dir, readonly=True)
    try:
        d = show(Queue(cfg.appliance.state_dir, idx), args.id)
    except sqlite3.Error as e:  # e.g. an index the upgraded daemon has not migrated yet
        raise StateError(f"cannot read the queue index in {cfg.appliance.state_dir}: {e}") from None
    finally:
        idx.close()
    _print_item(d, args.json)
    return 0


def _print_item(d: dict[str, Any], as_json: bool) -> None:
    """`queue show`: times as local ISO-8601 with their age; --json keeps the numbers and
    adds `<field>_iso` beside each."""
    if as_json:
        print(json.dumps(with_iso_times(d), indent=2))
        return
    now = time.time()
    for k, v in d.items():
        if k == "deliveries":
            for dl in v:
                _print_delivery("delivery", dl, now)
            continue
        if k == "copies":
            for c in v:
                print(f"{'copy':14} {c['id']} to {c['destination']}: {c['state']}")
                for dl in c["deliveries"]:
                    _print_delivery("  delivery", dl, now)
            continue
        if k == "route":
            print(f"{k:14} {', '.join(v) if v else 'every destination'}")
            continue
        print(f"{k:14} {when(v, now) if k in TIME_FIELDS else '' if v is None else v}")


def _print_delivery(label: str, dl: dict[str, Any], now: float) -> None:
    """One delivery of `queue show`, and the center's receipt for it when there is one."""
    print(f"{label:14} {dl['destination']}: {dl['state']}, {dl['attempts']} attempt(s)"
          + (f", delivered {when(dl['delivered'], now)}" if dl["delivered"] else "")
          + (f", last error: {dl['last_error']}" if dl["last_error"] else ""))
    if dl.get("receipt"):
        print(f"{'receipt':14} {dl['destination']}: "
              f"{center_verdict(dl['receipt_stored'], dl['receipt_failed'])} at center"
              f" {dl['receipt_center']} ({dl['receipt']}): {dl['receipt_stored']} of"
              f" {dl['receipt_stored'] + dl['receipt_failed']} instance(s) stored,"
              f" receipt read {when(dl['receipt_at'], now)}")
