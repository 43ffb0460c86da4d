#!/usr/bin/env python3
"""Ops link benchmark: how soon the operations center sees a box go away or get stuck, and
what the link costs the box (docs/operations.md, "Measured").

What it does, against a real Mosquitto (config/ops-center/, certificates from
`appliance fleet ca`, tests/mosquitto.py) on loopback, with the default heartbeat_s (15)
and keepalive_s (30) unless told otherwise:
- two idle appliances side by side, one with [operations] and one without; after a
  settling time, their CPU time (utime + stime of /proc/PID/stat) over --idle-s seconds
  and their RSS;
- the box with the link is frozen (SIGSTOP: its socket stays open, as with a power cut
  or a cut cable behind NAT) -> time until the center sees `online: false` (the will,
  after 1.5 x keepalive_s); then a second box is killed (SIGKILL, the kernel closes its
  socket) -> time until `online: false`;
- a box with health.stall_s 5 whose pack stage is hung by a failpoint: time from the
  daemon's own status saying `stuck` to the center's `state` saying it.

Usage: .venv/bin/python bench/ops_link_bench.py [--idle-s 60] [--keepalive-s 30] [--heartbeat-s 15]
Results: a markdown table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.mosquitto import Broker, Watcher, fleet_ca, sign  # noqa: E402
from tests.peers import Appliance, base_config, free_port, storescu, wait_for  # noqa: E402
from tests.test_ops_link import canary_study  # noqa: E402


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def box(root: Path, name: str, broker: Broker, ca: Path, args: argparse.Namespace,
        ops: bool = True, **extra: Any) -> Appliance:
    cfg = base_config(root, free_port())
    cfg["appliance"]["name"] = name
    cfg.update(extra)
    if ops:
        cfg["operations"] = {"host": "127.0.0.1", "port": broker.port, "ca": str(ca / "ca.pem"),
                             "cert": str(root / "keys" / "mqtt.pem"), "key": str(root / "keys" / "mqtt.key"),
                             "heartbeat_s": args.heartbeat_s, "keepalive_s": args.keepalive_s}
    a = Appliance(root, cfg)
    if ops:
        sign(ca, root / "keys" / "mqtt.csr")
    return a


def online_false(center: Watcher, name: str) -> bool:
    m = center.last(f"appliance/{name}/online")
    return m is not None and m["online"] is False


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--idle-s", type=float, default=60)
    p.add_argument("--keepalive-s", type=int, default=30)
    p.add_argument("--heartbeat-s", type=float, default=15)
    args = p.parse_args()
    out: dict[str, Any] = {"keepalive_s": args.keepalive_s, "heartbeat_s": args.heartbeat_s}
    with tempfile.TemporaryDirectory(prefix="ops-bench-") as tmp:
        root = Path(tmp)
        ca = fleet_ca(root / "ca")
        broker = Broker(root / "broker", ca).start()
        center = Watcher(broker, ca / "ops-center.pem", ca / "ops-center.key")
        boxes: list[Appliance] = []
        try:
            with_ops = box(root / "a", "box-a", broker, ca, args).start()
            without = box(root / "b", "box-b", broker, ca, args, ops=False).start()
            boxes += [with_ops, without]
            wait_for(lambda: center.last("appliance/box-a/state"), 60, "box-a state")
            time.sleep(5)
            assert with_ops.proc and without.proc
            pids = {"with": with_ops.proc.pid, "without": without.proc.pid}
            c0 = {k: cpu_s(v) for k, v in pids.items()}
            time.sleep(args.idle_s)
            for k, pid in pids.items():
                out[f"idle_cpu_pct_{k}_ops"] = round(100 * (cpu_s(pid) - c0[k]) / args.idle_s, 2)
                out[f"rss_mib_{k}_ops"] = round(rss_mib(pid), 1)
            out["state_messages_in_idle"] = len(center.on("appliance/box-a/state"))

            os.kill(pids["with"], signal.SIGSTOP)  # frozen: the socket stays open
            t0 = time.monotonic()
            wait_for(lambda: online_false(center, "box-a"), 3 * args.keepalive_s + 30, "will after freeze")
            out["frozen_to_online_false_s"] = round(time.monotonic() - t0, 1)
            with_ops.kill9()

            c = box(root / "c", "box-c", broker, ca, args).start()
            boxes.append(c)
            wait_for(lambda: (m := center.last("appliance/box-c/online")) and m["online"], 60, "box-c online")
            c.kill9()
            t0 = time.monotonic()
            wait_for(lambda: online_false(center, "box-c"), 3 * args.keepalive_s + 30, "will after kill")
            out["kill9_to_online_false_s"] = round(time.monotonic() - t0, 2)

            fp = root / "failpoints"
            fp.mkdir()
            d = box(root / "d", "box-d", broker, ca, args, health={"stall_s": 5}, pack={"study_quiet_s": 0.5})
            d.env = {"APPLIANCE_FAILPOINTS": str(fp)}
            d.start()
            boxes.append(d)
            wait_for(lambda: center.last("appliance/box-d/state"), 60, "box-d state")
            (fp / "pack.hang").write_text("hang")
            assert storescu(d.port, canary_study(root / "study", 1)).returncode == 0
            wait_for(lambda: d.status()["stages"]["pack"]["state"] == "stuck", 60, "stuck locally", poll=0.1)
            t0 = time.monotonic()
            wait_for(lambda: (s := center.last("appliance/box-d/state")) and
                     s["stages"]["pack"]["state"] == "stuck", 4 * args.heartbeat_s, "stuck at the center")
            out["stuck_to_center_s"] = round(time.monotonic() - t0, 2)
            (fp / "pack.hang").unlink()
        finally:
            for b in boxes:
                if b.proc and b.proc.poll() is None:
                    os.kill(b.proc.pid, signal.SIGCONT)
                b.stop()
                b.kill9()
            center.close()
            broker.stop()
    print("| measure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v} |")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"ops_link_{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
