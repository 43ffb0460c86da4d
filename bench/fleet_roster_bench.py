#!/usr/bin/env python3
"""Fleet status on many boxes, Mosquitto against RabbitMQ (docs/operations.md, "The fleet
view"): what the by-name subscriptions of the roster cost and what they bring.

--boxes box certificates are signed by `fleet sign`'s code (each enrolled in the CA's
roster); each box connects once with its own certificate and publishes a retained
`online` and `state` (about 1 KB) and disconnects cleanly, as boxes that published and
are still retained. Then `appliance fleet status --json` (a subprocess, as an operator
runs it, at its default --settle) with the roster, and once more with the roster moved
away (the wildcard subscriptions only, as before): its wall time and the boxes it shows
online. Against a real Mosquitto (config/ops-center/) and a real RabbitMQ node
(config/ops-center/rabbitmq/), each on loopback in a temp dir.

Usage: .venv/bin/python bench/fleet_roster_bench.py [--boxes 1000] [--broker mosquitto|rabbitmq|both]
Results: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from appliance.ops import pki  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402
from tests.rabbitmq import RabbitBroker  # noqa: E402


def publish_retained(broker: Any, ca: Path, certs: Path, name: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311, clean_session=True)
    ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
    ctx.load_cert_chain(str(certs / f"{name}.pem"), str(certs / f"{name}.key"))
    c.tls_set_context(ctx)
    c.connect("127.0.0.1", broker.port, keepalive=30)
    c.loop_start()
    now = time.time()
    state = {"v": 1, "name": name, "ts": now, "seq": 1, "boot_id": "b", "conn_seq": 1, "version": "1.0",
             "stages": {s: {"state": "idle"} for s in ("receive", "pack", "forward", "ops")},
             "queue": {"items": {"queued": 0}, "parked": 0},
             "destinations": [{"name": "pacs", "up": True}],
             "disk": {"free_bytes": 9e10, "reserve_bytes": 1e9}}
    for topic, doc in (("online", {"v": 1, "online": True, "conn_seq": 1, "since": now}), ("state", state)):
        sent = c.publish(f"appliance/{name}/{topic}", json.dumps(doc).encode(), qos=1, retain=True)
        sent.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


def status(ca: Path, port: int) -> tuple[float, int, int]:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "appliance", "fleet", "status", "--json", "--ca", str(ca),
                        "--port", str(port)], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    took = time.monotonic() - start
    if r.returncode not in (0, 1):
        raise RuntimeError(f"fleet status exited {r.returncode}: {r.stderr[-2000:]}")
    boxes = json.loads(r.stdout)
    return took, len(boxes), sum(1 for b in boxes if b["online"])


def run(kind: str, n: int, root: Path) -> list[str]:
    ca = root / "ca"
    pki.ca_init(ca, ("127.0.0.1",))
    certs = root / "boxes"
    certs.mkdir()
    names = [f"box-{i:04d}" for i in range(n)]
    fleet_ca = pki.load_ca(ca)
    for name in names:
        pki.box_key_and_csr(name, certs / f"{name}.key", certs / f"{name}.csr")
        pki.sign_csr(fleet_ca, certs / f"{name}.csr", certs / f"{name}.pem")
    broker = (Broker(root / "broker", ca) if kind == "mosquitto"
              else RabbitBroker(root / "broker", ca, boxes=tuple(names))).start()
    try:
        start = time.monotonic()
        for name in names:
            publish_retained(broker, ca, certs, name)
        published = time.monotonic() - start
        rows = []
        for label in ("with the roster", "without (wildcards only)"):
            if label.startswith("without"):
                (ca / pki.ROSTER).rename(root / "roster.away")
            took, shown, online = status(ca, broker.port)
            rows.append(f"| {kind} | {n} | {label} | {took:.1f} s | {shown} | {online} |")
        print(f"{kind}: {n} boxes published retained online+state in {published:.0f} s", file=sys.stderr)
        return rows
    finally:
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--broker", choices=("mosquitto", "rabbitmq", "both"), default="both")
    args = ap.parse_args()
    rows = ["| broker | boxes | fleet status | wall time | boxes shown | online |",
            "|---|---|---|---|---|---|"]
    for kind in ("mosquitto", "rabbitmq") if args.broker == "both" else (args.broker,):
        with tempfile.TemporaryDirectory(prefix=f"roster-{kind}-") as tmp:
            rows += run(kind, args.boxes, Path(tmp))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
