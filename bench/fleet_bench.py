#!/usr/bin/env python3
"""Fleet view benchmark: what `fleet serve` costs with many boxes (docs/operations.md,
"The fleet view").

In-process, no broker: --boxes boxes each send `online` and a `state` with three
destinations and two certificates (as the broker would deliver them) into the model
(ops/fleet.py); then the time and size of the fleet page, one box's detail,
`/fleet.json` and a `/metrics` scrape (ops/fleetweb.py), best of --runs, and the
process's peak RSS.

Usage: .venv/bin/python bench/fleet_bench.py [--boxes 1000] [--runs 3]
Results: a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

from appliance.ops.fleet import Fleet
from appliance.ops.fleetweb import FleetApp


def state(name: str, now: float) -> dict[str, Any]:
    return {"v": 1, "name": name, "ts": now, "seq": 1, "boot_id": "b", "conn_seq": 1, "version": "1.0",
            "stages": {s: {"state": "idle"} for s in ("receive", "pack", "forward", "failover", "ops")},
            "queue": {"items": {"queued": 3, "delivered": 40}, "oldest_unsent_ts": now - 60, "parked": 0},
            "destinations": [{"name": f"pacs-{j}", "up": j != 2, "last_error": None} for j in range(3)],
            "disk": {"free_bytes": 50 * 2**30, "reserve_bytes": 2**30},
            "certs": {"mqtt": now + 9e6, "receive.tls": now + 9e6},
            "events": {"waiting": 0, "dropped": 0, "last_seq": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    fleet, now = Fleet(), time.time()
    t0 = time.perf_counter()
    for i in range(args.boxes):
        name = f"ct-{i:05d}"
        fleet.receive(f"appliance/{name}/online", b'{"v":1,"online":true,"conn_seq":1,"boot_id":"b"}', now)
        fleet.receive(f"appliance/{name}/state", json.dumps(state(name, now)).encode(), now)
    fed = time.perf_counter() - t0
    app = FleetApp(fleet)
    print(f"{args.boxes} boxes: {2 * args.boxes} messages into the model in {fed:.3f} s\n")
    print(f"| path | best of {args.runs} (s) | bytes |\n|---|---|---|")
    for path in ("/", f"/box/ct-{args.boxes // 2:05d}", "/fleet.json", "/metrics"):
        best, size = float("inf"), 0
        for _ in range(args.runs):
            t = time.perf_counter()
            size = len(b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None)))
            best = min(best, time.perf_counter() - t)
        print(f"| `{path}` | {best:.3f} | {size:,} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
