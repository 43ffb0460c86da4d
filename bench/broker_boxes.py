#!/usr/bin/env python3
"""Simulated boxes for bench/broker_bench.py: many MQTT-over-TLS clients in one process.

Each box is a paho client with its own certificate (client id = its CN), a retained
will, and the payloads the real link sends (appliance/ops/messages.py builds them; the
snapshot they are built from is a plausible idle box: six stages, two destinations up,
counters that grow): after CONNACK a retained `online`, then a retained `state` at once
and every --heartbeat-s, and an `event` every --event-s, all QoS 1. The heartbeat and
event phases are spread at random, as for boxes booted at different times.

One selector (epoll) drives every client: paho's external-loop API (socket open/close and
register/unregister-write callbacks, loop_read / loop_write, loop_misc once a second for
the keepalive). Only the TLS handshake inside `connect()` blocks (a few ms on loopback);
boxes are connected one per turn of the loop, so the connected ones are served meanwhile.

Driven over stdin/stdout, one JSON object a line: it prints `{"ready": ...}` once every
box has its CONNACK (or --connect-timeout-s has passed), and its counters on each `stats`
line read from stdin (`lost`: connections lost before `stop`); `stop` publishes no more,
waits for what is in flight to be acknowledged (at most DRAIN_S), disconnects every box,
prints the counters (`inflight`: still unacknowledged) and exits.

Usage (by broker_bench.py): broker_boxes.py --port N --certs DIR --ca CA.pem --first 0 --count 500
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import selectors
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance import __version__  # noqa: E402
from appliance.ops import messages  # noqa: E402

STAGES = ("receive", "pack", "forward", "failover", "receipts", "ops")
EVENT_KINDS = ("destination.down", "destination.up")
MISC_S = 1.0
DRAIN_S = 10.0  # at `stop`, how long to wait for the acknowledgements of what was sent


def box_name(i: int) -> str:
    return f"sim-{i:05d}"


def snapshot(name: str, received: int, now: float) -> dict[str, Any]:
    """A plausible idle box, in Daemon.snapshot()'s shape (what messages.state reads)."""
    return {
        "name": name, "version": __version__, "problems": [],
        "receive": {"instances_received": received, "instances_refused": {"sop class not accepted": 2},
                    "associations_total": received // 40,
                    "associations_rejected_by_reason": {"calling ae": 1},
                    "connections_refused": {}, "bytes_received": received * 524_288},
        "spool": {"free_bytes": 180 * 2**30, "reserve_bytes": 2 * 2**30, "instances": 40,
                  "bytes": 21 * 2**20},
        "queue": {"queued": 2, "sending": 1, "delivered": received // 40, "held": 0},
        "oldest_waiting_s": 35.0,
        "forward": {"paused": None, "parked": 0},
        "destinations": [{"name": n, "state": "up", "since": now - 86_400, "last_error": None, "failures": 0}
                         for n in ("pacs-main", "pacs-backup")],
        "stages": {s: {"state": "idle", "since_progress_s": 1.5, "progress": received} for s in STAGES},
        "config": {"version": 3, "pending": None, "rolled_back": None, "rolled_back_at": None,
                   "refused": None, "refused_code": None},
    }


class Box:
    """One simulated box: its client, its sequence numbers and its counters."""

    def __init__(self, name: str, args: argparse.Namespace, fleet: Boxes) -> None:
        self.name, self.topic, self.fleet = name, f"appliance/{name}", fleet
        self.boot_id = f"{random.getrandbits(64):016x}"  # noqa: S311 - a label, not a secret
        self.conn_seq, self.seq, self.event_seq, self.received = 1, 0, 0, random.randrange(10_000)  # noqa: S311
        ctx = ssl.create_default_context(cafile=str(args.ca))
        ctx.load_cert_chain(str(args.certs / f"{name}.pem"), str(args.certs / f"{name}.key"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.c = c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, clean_session=True,
                                 protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        c.tls_set_context(ctx)
        c.connect_timeout = args.connect_timeout_s
        c.will_set(f"{self.topic}/online", messages.dumps(messages.will(self.conn_seq, self.boot_id)),
                   qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: fleet.stopping or fleet.count("lost")  # a connection lost
        c.on_publish = lambda *a: fleet.count("acked")
        sel = fleet.sel
        c.on_socket_open = lambda cl, u, s: sel.register(s, selectors.EVENT_READ, self)
        c.on_socket_close = lambda cl, u, s: sel.unregister(s)
        c.on_socket_register_write = lambda cl, u, s: sel.modify(
            s, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
        c.on_socket_unregister_write = lambda cl, u, s: sel.modify(s, selectors.EVENT_READ, self)

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.fleet.count("answered")
        if rc.is_failure:
            self.fleet.count("refused")
            return
        self.fleet.connacked(self)
        self.publish("online", messages.online(self.conn_seq, self.boot_id, time.time()))
        self.state()

    def publish(self, sub: str, msg: dict[str, Any], retain: bool = True) -> None:
        info = self.c.publish(f"{self.topic}/{sub}", messages.dumps(msg), qos=1, retain=retain)
        self.fleet.count("published" if info.rc == mqtt.MQTT_ERR_SUCCESS else "publish_failed")
        self.fleet.count(sub)

    def state(self) -> None:
        now = time.time()
        self.seq += 1
        self.received += random.randrange(0, 40)  # noqa: S311
        msg = messages.state(snapshot(self.name, self.received, now), seq=self.seq, now=now,
                             boot_id=self.boot_id, conn_seq=self.conn_seq,
                             certs={"mqtt": now + 800 * 86_400, "receive.tls": now + 300 * 86_400},
                             time_synced=True,
                             outbox={"waiting": 0, "dropped": 0, "last_seq": self.event_seq})
        self.fleet.count("state_bytes", len(messages.dumps(msg)))
        self.publish("state", msg)

    def event(self) -> None:
        self.event_seq += 1
        kind = EVENT_KINDS[self.event_seq % 2]
        body = messages.event_body(kind, {"destination": "pacs-backup", "failures": 3, "reason": "timeout"})
        assert body is not None
        self.publish("events", messages.event(self.name, self.boot_id, self.event_seq, time.time(), body, 0),
                     retain=False)

    def service(self, events: int) -> None:
        c = self.c
        if events & selectors.EVENT_READ:
            c.loop_read()
            sock = c.socket()
            # TLS may hold decrypted bytes the selector cannot see
            while sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending() and c.socket():
                c.loop_read()
        if events & selectors.EVENT_WRITE and c.socket() is not None:
            c.loop_write()


class Boxes:
    """Every box of this process, the schedule (a heap of due times) and the counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.counters: dict[str, int] = {}
        self.due: list[tuple[float, int, str, Box]] = []
        self.tie = 0
        self.boxes: list[Box] = []
        self.ready_at: float | None = None
        self.stopping = False

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def schedule(self, at: float, what: str, box: Box) -> None:
        self.tie += 1
        heapq.heappush(self.due, (at, self.tie, what, box))

    def connacked(self, box: Box) -> None:
        self.count("connected")
        now = time.monotonic()
        hb, ev = self.args.heartbeat_s, self.args.event_s
        self.schedule(now + random.uniform(0, hb), "state", box)  # noqa: S311 - a phase
        self.schedule(now + random.uniform(0, ev), "event", box)  # noqa: S311

    def run_due(self, now: float) -> None:
        while self.due and self.due[0][0] <= now:
            at, _, what, box = heapq.heappop(self.due)
            if box.c.is_connected():
                getattr(box, what)()
            period = self.args.heartbeat_s if what == "state" else self.args.event_s
            self.schedule(at + period, what, box)

    def connect(self, name: str) -> None:
        box = Box(name, self.args, self)
        self.boxes.append(box)
        try:
            box.c.connect(self.args.host, self.args.port, keepalive=self.args.keepalive_s)
        except OSError as e:  # the broker closed it during the TLS handshake (over its limits)
            self.count(f"connect_error.{type(e).__name__}")
            self.count("answered")

    def disconnect(self) -> None:
        self.stopping = True
        for b in self.boxes:
            b.c.disconnect()
            b.c.loop_write()

    def inflight(self) -> int:
        """QoS 1 messages sent and not yet acknowledged (paho has no public count)."""
        return sum(len(b.c._out_messages) for b in self.boxes)  # noqa: SLF001

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "boxes": len(self.boxes), "inflight": self.inflight()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--certs", type=Path, required=True, help="NAME.pem and NAME.key of every box")
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--heartbeat-s", type=float, default=15)
    p.add_argument("--event-s", type=float, default=60)
    p.add_argument("--keepalive-s", type=int, default=30)
    p.add_argument("--connect-timeout-s", type=float, default=60)
    return p.parse_args()


def say(what: str, fleet: Boxes, **extra: Any) -> None:
    print(json.dumps({what: True, **extra, **fleet.stats()}), flush=True)


def main() -> int:
    args = parse_args()
    fleet = Boxes(args)
    fleet.sel.register(sys.stdin, selectors.EVENT_READ, None)
    names = [box_name(i) for i in range(args.first, args.first + args.count)]
    start = time.monotonic()
    misc_at = start + MISC_S
    drain_until: float | None = None  # after `stop`: publish no more, wait for the acknowledgements
    while True:
        now = time.monotonic()
        if names:  # the ramp: one TLS handshake per turn
            fleet.connect(names.pop(0))
        if fleet.ready_at is None and not names and (
                fleet.counters.get("answered", 0) >= args.count or now - start > args.connect_timeout_s):
            fleet.ready_at = now
            say("ready", fleet, ramp_s=round(now - start, 3))
        if drain_until is not None and (fleet.inflight() == 0 or now > drain_until):
            fleet.disconnect()
            say("stopped", fleet)
            return 0
        wait = 0.0 if names else max(0.0, min(misc_at, fleet.due[0][0] if fleet.due else misc_at) - now)
        for key, events in fleet.sel.select(wait if drain_until is None else min(wait, 0.05)):
            if key.data is not None:
                key.data.service(events)
            elif sys.stdin.readline().strip() == "stats":
                say("stats", fleet)
            else:  # `stop`, or the bench gone
                drain_until = now + DRAIN_S
                fleet.sel.unregister(sys.stdin)
        now = time.monotonic()
        if drain_until is None:
            fleet.run_due(now)
        if now >= misc_at:  # keepalive pings, and the timeouts of paho's own
            misc_at = now + MISC_S
            for b in fleet.boxes:
                b.c.loop_misc()


if __name__ == "__main__":
    sys.exit(main())
