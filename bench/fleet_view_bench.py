#!/usr/bin/env python3
"""Fleet view benchmark (issue 13, "Measured at the end"): how soon the operations center's
fleet view (`appliance fleet serve`) and its Prometheus (the shipped prometheus.yml and
alerts.yml, unchanged but for the target) see a box go away, a destination go down and a
stage get stuck (docs/benchmarks.md, "Fleet view and alerts").

Against a real Mosquitto (config/ops-center/, certificates from `appliance fleet ca`),
real appliances with the default heartbeat_s (15) and keepalive_s (30) unless told
otherwise, `fleet serve` as a subprocess (tests/fleetserve.py) polled over HTTP every
0.1 s, and a real Prometheus (tests/prometheus.py) at the shipped intervals (fleet scrape
10 s, evaluation 15 s). Everything on loopback in a temp dir, on one clock:

- destination down: a box whose only destination is a closed port receives a study; from
  the box's `destination.down` log line (its own judgement, after queue.down_after
  failures) to `/fleet.json` showing the destination down, and to its event on the box's
  page (`/box/NAME`);
- stage stuck: pack hung by a failpoint (health.stall_s 5); from the box's own status
  (its control socket, polled every 0.1 s) saying `stuck` to `/fleet.json` saying it;
- kill -9 of that box: to `online: false` in `/fleet.json`, and to BoxOffline firing in
  Prometheus (ALERTS);
- a second box frozen (SIGSTOP: its socket stays open, as with a power cut or a cut cable
  behind NAT): to `online: false` in `/fleet.json` (after 1.5 x keepalive_s at the broker).

Usage: .venv/bin/python bench/fleet_view_bench.py [--keepalive-s 30] [--heartbeat-s 15]
Results: a markdown table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.health import control  # noqa: E402
from tests.fleetserve import FleetServe  # noqa: E402
from tests.mosquitto import Broker, fleet_ca, sign  # noqa: E402
from tests.peers import Appliance, base_config, free_port, storescu, wait_for  # noqa: E402
from tests.prometheus import Prometheus  # noqa: E402
from tests.test_ops_link import canary_study  # noqa: E402

POLL_S = 0.1


def box(root: Path, name: str, broker: Broker, ca: Path, args: argparse.Namespace, **extra: Any) -> Appliance:
    cfg = base_config(root, free_port())
    cfg["appliance"]["name"] = name
    cfg.update(extra)
    cfg["operations"] = {"host": "127.0.0.1", "port": broker.port, "ca": str(ca / "ca.pem"),
                         "cert": str(root / "keys" / "mqtt.pem"), "key": str(root / "keys" / "mqtt.key"),
                         "heartbeat_s": args.heartbeat_s, "keepalive_s": args.keepalive_s, "metrics_bind": ""}
    a = Appliance(root, cfg)
    sign(ca, root / "keys" / "mqtt.csr")
    return a


def logged_at(a: Appliance, event: str) -> float | None:
    """The Unix time of the first log line of `event` (JSON lines with an ISO UTC timestamp)."""
    for line in a.log_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") == event:
                return datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00")).timestamp()
    return None


def seen(serve: FleetServe, name: str, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str
         ) -> float:
    """Poll /fleet.json until `cond` holds for box `name`; the Unix time it was first seen."""
    def check() -> float | None:
        b = next((b for b in serve.json() if b["name"] == name), None)
        return time.time() if b is not None and cond(b) else None
    return wait_for(check, timeout, what, poll=POLL_S)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--keepalive-s", type=int, default=30)
    p.add_argument("--heartbeat-s", type=float, default=15)
    args = p.parse_args()
    out: dict[str, Any] = {"keepalive_s": args.keepalive_s, "heartbeat_s": args.heartbeat_s,
                           "prometheus": "shipped intervals: fleet scrape 10 s, evaluation 15 s"}
    hb, ka = args.heartbeat_s, args.keepalive_s
    with tempfile.TemporaryDirectory(prefix="fleet-view-bench-") as tmp:
        root = Path(tmp)
        ca = fleet_ca(root / "ca")
        broker = Broker(root / "broker", ca).start()
        boxes: list[Appliance] = []
        serve: FleetServe | None = None
        prom: Prometheus | None = None
        try:
            serve = FleetServe(root / "serve", ca, broker, heartbeat_s=hb)
            prom = Prometheus(root / "prometheus", f"127.0.0.1:{serve.port}", interval_s=None).start()
            fp = root / "failpoints"
            fp.mkdir()
            a = box(root / "a", "box-a", broker, ca, args, health={"stall_s": 5},
                    pack={"study_quiet_s": 0.5},
                    queue={"retry_min_s": 0.5, "retry_max_s": 2, "down_after": 1, "probe_min_s": 1},
                    destinations=[{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                                   "port": free_port(), "ae_title": "PACS", "plaintext": True,
                                   "timeout_s": 5}])
            a.env = {"APPLIANCE_FAILPOINTS": str(fp)}
            b = box(root / "b", "box-b", broker, ca, args)
            boxes += [a.start(), b.start()]
            for name in ("box-a", "box-b"):
                seen(serve, name, lambda v: v["online"] and v["live"], 4 * hb + 30, f"{name} live")

            # destination down
            assert storescu(a.port, canary_study(root / "study1", 1)).returncode == 0
            t_view = seen(serve, "box-a", lambda v: any(not d["up"] for d in v["destinations"]), 120,
                          "pacs down at the fleet view")
            t_page = wait_for(lambda: b"destination.down" in serve.get("/box/box-a") and time.time(), 60,
                              "the event on the box page", poll=POLL_S)
            t_box = logged_at(a, "destination.down")
            assert t_box is not None, "no destination.down in the box's log"
            out["destination_down_to_fleet_json_s"] = round(t_view - t_box, 2)
            out["destination_down_to_event_on_box_page_s"] = round(t_page - t_box, 2)

            # stage stuck
            (fp / "pack.hang").write_text("hang")
            assert storescu(a.port, canary_study(root / "study2", 1)).returncode == 0
            # the box's own view (its control socket, polled every 0.1 s) against the fleet's
            sock = a.state_dir / "run" / "control.sock"
            t_box = wait_for(lambda: control.request(sock, "status", timeout=5.0)["stages"]["pack"]["state"]
                             == "stuck" and time.time(), 120, "pack stuck on the box", poll=POLL_S)
            t_view = seen(serve, "box-a", lambda v: v["stages"].get("pack") == "stuck", 4 * hb + 30,
                          "pack stuck at the fleet view")
            out["stage_stuck_to_fleet_json_s"] = round(t_view - t_box, 2)
            out["stage_stuck_target_s"] = 2 * hb
            (fp / "pack.hang").unlink()

            # kill -9
            t0 = time.time()
            a.kill9()
            t_view = seen(serve, "box-a", lambda v: not v["online"], 3 * ka + 30, "box-a offline")
            out["kill9_to_fleet_json_offline_s"] = round(t_view - t0, 2)
            firing = 'ALERTS{alertname="BoxOffline",alertstate="firing",box="box-a"}'
            t_alert = wait_for(lambda: prom is not None and prom.query(firing) and time.time(), 180,
                               "BoxOffline firing", poll=0.5)
            out["kill9_to_BoxOffline_firing_s"] = round(t_alert - t0, 1)

            # frozen
            assert b.proc is not None
            t0 = time.time()
            os.kill(b.proc.pid, signal.SIGSTOP)
            t_view = seen(serve, "box-b", lambda v: not v["online"], 3 * ka + 30, "box-b offline")
            out["frozen_to_fleet_json_offline_s"] = round(t_view - t0, 1)
            out["offline_target_s"] = 1.5 * ka
        finally:
            for x in boxes:
                if x.proc and x.proc.poll() is None:
                    os.kill(x.proc.pid, signal.SIGCONT)
                x.stop()
                x.kill9()
            if prom is not None:
                prom.stop()
            if serve is not None:
                serve.stop()
            broker.stop()
    print("| measure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v} |")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"fleet_view_{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
