"""`appliance fleet status` and `appliance fleet serve` (ops/cli.py adds their parsers).

    appliance fleet status --ca DIR [--host H] [--port N] [--json] [--settle S]
                  connect with the certificate ops-center-status (read only), wait for
                  the retained `online` and `state` of every box (quiet 0.5 s, at most
                  --settle s; default 5 s and 20 ms per box of the roster: RabbitMQ takes
                  ~13 s for 1,000 boxes subscribed by name), print one line per box (or
                  the view as JSON). Exit 0 when
                  no box needs a person, 1 when one does (any alarm), 69 when the broker
                  cannot be reached or does not confirm the subscription in time.
    appliance fleet serve --ca DIR [--host H] [--port N] --bind IP:PORT
                  the fleet page, /box/NAME, /fleet.json and /metrics (ops/fleetweb.py)
                  until SIGTERM or SIGINT; prints the URL it serves (port 0: any free one).
                  Its certificate is ops-center-serve (read only): `fleet send` and
                  `fleet status` never take its session. It re-reads the CA's roster
                  when the file changes: a box `fleet crl --revoke` took out of it
                  leaves the page within a second, without a restart.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.core.errors import EX_UNAVAILABLE, UsageError
from appliance.health import metrics
from appliance.ops import pki
from appliance.ops.fleet import BOXES_MAX, HEARTBEAT_S, Fleet, Subscriber
from appliance.ops.fleetweb import FleetApp, FleetServer, age, mib, source

SETTLE_S = 5.0
SETTLE_PER_BOX_S = 0.02  # by-name subscriptions: fleet status took 15.5 s for 1,000 boxes on RabbitMQ 3.10


def add_parsers(fleet_sub: Any) -> None:
    for name, text in (("status", "every box: online, queue, destinations, disk, certificates, alarms"),
                       ("serve", "the fleet page and the fleet's Prometheus series over HTTP")):
        p = fleet_sub.add_parser(name, help=text)
        p.add_argument("--ca", type=Path, required=True,
                       help="the fleet CA folder (ca.pem, roster, ops-center-serve/-status.pem/.key)")
        p.add_argument("--host", default="127.0.0.1", help="the broker")
        p.add_argument("--port", type=int, default=8883)
        p.add_argument("--heartbeat", type=float, default=HEARTBEAT_S,
                       help="the boxes' heartbeat_s: silent after 3 without a state")
    status = fleet_sub.choices["status"]
    status.add_argument("--json", action="store_true", help="the view as JSON")
    status.add_argument("--settle", type=float, default=None,
                        help="seconds to wait at most for retained messages (default: 5, and"
                             " 0.02 per box of the CA's roster)")
    serve = fleet_sub.choices["serve"]
    serve.add_argument("--bind", default="127.0.0.1:9120", help="IP:PORT to serve on (port 0: any free one)")


def _subscriber(args: argparse.Namespace, cn: str) -> tuple[Fleet, Subscriber]:
    if not 1 <= args.port <= 65535 or args.heartbeat <= 0:
        raise UsageError("--port must be 1..65535 and --heartbeat above 0")
    fleet = Fleet(args.heartbeat)
    return fleet, Subscriber(fleet, args.host, args.port, args.ca, cn)


def status(args: argparse.Namespace) -> int:
    fleet, sub = _subscriber(args, pki.STATUS_CN)
    settle_s = args.settle if args.settle is not None else default_settle_s(args.ca)
    try:
        sub.start()
    except OSError as e:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
        print(f"cannot reach the broker {args.host}:{args.port} ({type(e).__name__})", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        settled = sub.settle(max(0.5, settle_s))
    finally:
        sub.stop()
    if not settled:
        print(f"the broker {args.host}:{args.port} did not confirm the subscription within {settle_s:g} s",
              file=sys.stderr)
        return EX_UNAVAILABLE
    now = time.time()
    boxes = fleet.view(now)
    print(json.dumps(boxes, indent=2, sort_keys=True) if args.json else table(boxes, now))
    return 1 if any(b["alarms"] for b in boxes) else 0


def default_settle_s(ca: Path) -> float:
    """At most how long `fleet status` waits: longer with more boxes to subscribe to by name."""
    try:
        boxes = len(pki.read_roster(ca))
    except OSError:
        boxes = 0  # the subscriber says so when it connects
    return SETTLE_S + SETTLE_PER_BOX_S * min(boxes, BOXES_MAX)


COLUMNS = ("BOX", "LINK", "VALUES", "LAST SEEN", "QUEUE", "OLDEST UNSENT", "DESTINATIONS",
           "DISK FREE/RESERVE", "CERT EXPIRES", "ALARMS")


def row(b: dict[str, Any], now: float) -> tuple[str, ...]:
    down = [d["name"] for d in b["destinations"] if not d["up"] and not d["off"]]
    off = [d["name"] for d in b["destinations"] if d["off"]]
    up = len(b["destinations"]) - len(down) - len(off)
    dests = f"{up}/{len(b['destinations'])} up" + (f" ({', '.join(down)} down)" if down else "") + (
        f" ({', '.join(off)} off)" if off else "")
    soonest = min(b["certs"].values(), default=None)
    return (b["name"], "online" if b["online"] else "OFFLINE", source(b), f"{age(b['last_seen'], now)} ago",
            f"{sum(b['queue'].values())} items" + (", PAUSED" if b["paused"] else ""),
            "none" if b["oldest_unsent_ts"] is None else f"{age(b['oldest_unsent_ts'], now)} ago",
            dests, f"{mib(b['free_bytes'])}/{mib(b['reserve_bytes'])}",
            "-" if soonest is None else f"in {(soonest - now) / 86400:.0f} d",
            ", ".join(b["alarms"]) or "none")


def table(boxes: list[dict[str, Any]], now: float) -> str:
    if not boxes:
        return "no boxes (none has published to this broker)"
    rows = [COLUMNS, *(row(b, now) for b in boxes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def serve(args: argparse.Namespace) -> int:
    try:
        metrics.parse_bind(args.bind)
    except ValueError:
        raise UsageError(f"--bind {args.bind!r} is not IP:PORT (e.g. 127.0.0.1:9120)") from None
    fleet, sub = _subscriber(args, pki.SERVE_CN)
    sub.on_change = lambda line: print(f"fleet: {line}", file=sys.stderr, flush=True)
    server = FleetServer(args.bind, FleetApp(fleet, link=sub.link))
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host, _, _ = metrics.parse_bind(args.bind)
    print(f"fleet: serving http://{host}:{server.port}/ (/box/NAME, /fleet.json, /metrics);"
          f" broker {args.host}:{args.port}", flush=True)
    sub.c.connect_async(args.host, args.port, keepalive=30)  # paho retries while the broker is away
    sub.c.loop_start()
    try:
        while not stop.wait(1.0):
            sub.refresh()  # a box revoked by `fleet crl` leaves the page within a second
    finally:
        sub.stop()
        server.stop()
    return 0
