"""`appliance status`: the running daemon's counters, asked over its control socket, then
the box's identity (identity.py; not in --json).
Nothing listening is DaemonNotRunningError (69), a daemon that does not answer in time
DaemonUnavailable (69), a socket we may not open PermissionDeniedError (77)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from appliance.cli.times import age, when
from appliance.core import config
from appliance.core.errors import (
    ApplianceError,
    ConfigError,
    DaemonNotRunningError,
    PermissionDeniedError,
)
from appliance.ops import cli as ops_cli


def cmd_status(args: argparse.Namespace) -> int:
    """The running daemon's counters. With --json every outcome is one JSON document on
    stdout, `running` true, false (nothing listens) or null (cannot tell), and the exit
    code is the same as without --json."""
    if not args.json:
        _print_status(_daemon_status(args.config))
        _print_identity(args.config)
        return 0
    try:
        st = _daemon_status(args.config)
    except ApplianceError as e:
        running = False if isinstance(e, DaemonNotRunningError) else None
        out: dict[str, Any] = {"running": running, "error": str(e)}
        if isinstance(e, ConfigError):
            out["error"], out["problems"] = "the configuration is not valid", e.problems
        print(json.dumps(out, indent=2))
        return e.exit_code
    print(json.dumps({"running": True, **st}, indent=2))
    return 0


def cmd_diagnostics(args: argparse.Namespace) -> int:
    """The running daemon's diagnostics document (ops/diagnostics.py: status, config with
    secrets elided, versions, recent log events made safe), written to --out."""
    from appliance.core import durable
    from appliance.health import control

    sock = config.load(args.config).control_socket
    doc = control.request(sock, "diagnostics", timeout=30.0)
    if doc is None:
        raise DaemonNotRunningError(f"the appliance daemon is not running (nothing listens on {sock})")
    durable.atomic_write(args.out, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)
    print(f"{args.out}: status, config (secrets elided), versions, {len(doc.get('log', []))} log events")
    return 0


def _print_identity(config_path: Path | None) -> None:
    """The box's identity (`appliance keys show`), as the console's login screen shows it."""
    from appliance.cli import identity

    for line in identity.lines(config.load(config_path)):
        name, _, value = line.partition(": ")
        print(f"{'identity':15}{name}: {value}")


def _daemon_status(config_path: Path | None) -> dict[str, Any]:
    from appliance.health import control

    sock = config.load(config_path).control_socket
    try:
        st = control.request(sock, "status", timeout=5.0)
    except PermissionError:
        raise PermissionDeniedError(f"permission denied on {sock}: run as root or the appliance's"
                                    " user") from None
    except control.DaemonUnavailable:  # a hung daemon (timeout) or one that died mid-answer
        raise control.DaemonUnavailable(f"the appliance daemon did not answer on {sock}") from None
    if st is None:
        raise DaemonNotRunningError(f"the appliance daemon is not running (nothing listens on"
                                    f" {sock})")
    result: dict[str, Any] = st
    return result


def _destination_detail(d: dict[str, Any]) -> str:
    """`status`: since when, the last failure's class, failures in a row, the next probe."""
    now = time.time()
    parts = [f"since {when(d['since'], now)}" if d.get("since") else ""]
    if d.get("off_by"):
        parts.append(f"switched off by {d['off_by']}; 'appliance destination on {d['name']}'")
    if d.get("last_error") and (d["state"] == "down" or d["failures"]):
        parts.append(f"last error {d['last_error']}")
    if d.get("failures"):
        parts.append(f"{d['failures']} failure(s) in a row")
    if d.get("next_probe_in_s") is not None:
        parts.append(f"next probe in {age(d['next_probe_in_s'])}")
    shown = [p for p in parts if p]
    return f" ({'; '.join(shown)})" if shown else ""


# What `status` says of a VPN reading that is not "ok" (vpn/handshake.py's view).
VPN_READING = {
    "missing": "handshake unknown (no reading from appliance-vpn-handshake.timer yet)",
    "stale": "handshake unknown (the last reading is old: is appliance-vpn-handshake.timer running?)",
    "no interface": "NO INTERFACE (systemd-networkd did not make it: journalctl -u systemd-networkd)",
    "no peer": "the interface has no peer with [vpn] peer_public_key (render again, restart networkd)",
}


def audit_line(r: dict[str, Any]) -> str:
    """The audit repository's sender (audit/repository.py)."""
    state = "connected" if r["connected"] else "not connected"
    err = f"; last error {r['last_error']}: {r['last_error_reason']}" if r.get("last_error") else ""
    gaps = f"; {r['gaps']} gap(s) (rotated away before sent)" if r.get("gaps") else ""
    return (f"audit repo     {r['host']}:{r['port']} {state}, {r['sent']} sent, {r['waiting']} waiting"
            f"{gaps}{err}")


def vpn_line(v: dict[str, Any]) -> str:
    """`status`: the tunnel's state by its latest handshake with the center."""
    if v.get("reading") != "ok":
        what = VPN_READING.get(str(v.get("reading")), "handshake unknown")
    elif v.get("handshake_age_s") is None:
        what = "DOWN, no handshake yet"
    else:
        what = f"{'UP' if v['up'] else 'DOWN'}, last handshake {age(v['handshake_age_s'])} ago"
    return f"vpn            {v['interface']}: {what}"


def _print_status(st: dict[str, Any]) -> None:
    r, sp = st["receive"], st["spool"]
    for listener in st["listening"]:
        print(f"listening      {listener['host']}:{listener['port']}{' (TLS)' if listener['tls'] else ''}"
              f" as {st['ae_title']}")
    print(f"uptime         {age(st['uptime_s'])} (pid {st['pid']}, version {st['version']})")
    why = ", ".join(f"{k} {v}" for k, v in sorted(r.get("associations_rejected_by_reason", {}).items()))
    print(f"associations   {r['associations_active']} active, {r['associations_total']} total,"
          f" {r['associations_rejected']} rejected{f' ({why})' if why else ''}")
    conns = ", ".join(f"{k} {v}" for k, v in sorted(r.get("connections_refused", {}).items())) or "none"
    print(f"connections    refused: {conns}")
    print(f"received       {r['instances_received']} instances ({r['instances_duplicate']} duplicates)")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(r["instances_refused"].items())) or "none"
    print(f"refused        {refused}")
    print(f"spool          {sp['instances']} instances, {sp['bytes'] >> 20} MiB")
    print(f"spool free     {sp['free_bytes'] >> 20} MiB (reserve {sp['reserve_bytes'] >> 20} MiB)")
    if "queue" in st:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st["queue"].items())) or "empty"
        print(f"queue          {counts}; oldest waiting {age(st['oldest_waiting_s'])}")
        for dest, err in st.get("last_errors", {}).items():
            print(f"last error     {dest}: {err}")
    for d in st.get("destinations", []):
        copy = " (copy)" if d.get("mode") == "copy" else ""
        print(f"destination    {d['name']}{copy}: {d['state'].upper()}" + _destination_detail(d))
    for rc in st.get("receipts", []):
        late = (f", {rc['overdue']} OVERDUE (uploaded more than {age(rc['overdue_after_s'])} ago)"
                if rc["overdue"] else "")
        err = f"; reading receipts failed: {rc['last_error']}" if rc.get("last_error") else ""
        print(f"receipts       {rc['destination']}: {rc['awaiting']} uploaded, awaiting the"
              f" center's receipt{late}{err}")
    if "forward" in st:
        fw = st["forward"]
        copies = f" + {fw['copy_lanes']} for copies" if fw.get("copy_lanes") else ""
        print(f"forwarding     {fw['lanes']} lanes + {fw['stat_lanes']} for stat studies{copies};"
              f" {fw['parked']} instance(s) parked (see queue list)")
        if fw.get("paused"):
            p = fw["paused"]
            print(f"forwarding     PAUSED since {when(p['since'], time.time())} by {p['by']}"
                  " (receiving and packing go on; 'appliance forward resume')")
    for name, stage in st.get("stages", {}).items():
        since = stage["since_progress_s"]
        print(f"stage {name:9}{stage['state']}, {stage['jobs']} job(s), {stage['progress']} steps"
              + (f", last {age(since)} ago" if since is not None else ""))
    if "ops" in st:
        print(ops_cli.status_line(st["ops"]))
    if "config" in st:
        print(ops_cli.config_line(st["config"]))
    if "vpn" in st:
        print(vpn_line(st["vpn"]))
    if (st.get("audit") or {}).get("repository"):
        print(audit_line(st["audit"]["repository"]))
    for problem in st.get("problems", []):
        print(f"STUCK          {problem}")
