#!/usr/bin/env python3
"""Broker benchmark (issue 13, "Measured at the end"): --boxes simulated boxes (default
1,000) into one Mosquitto on this machine, with `appliance fleet serve` subscribed to it
(docs/benchmarks.md, "1,000 boxes into one Mosquitto").

- a fleet CA made by `appliance fleet ca init`, and a key, CSR and certificate per box
  made by the product's own code (pki.box_key_and_csr, as `keys init`; pki.sign_csr, as
  `appliance fleet sign`), cached in the run's temp dir (or --cache DIR, reused across
  runs);
- Mosquitto with the shipped config/ops-center mosquitto.conf and ACL (tests/mosquitto.py)
  on a free loopback port; `appliance fleet serve` as a subprocess (tests/fleetserve.py),
  started first, as a center that is up when the boxes connect;
- the boxes: --workers processes of bench/broker_boxes.py (each many paho clients on one
  selector; method in its docstring): own certificate, client id = CN, a will, a retained
  `online`, a retained `state` every --heartbeat-s and an event every --event-s, QoS 1;
- ramp: from starting the workers to every box's CONNACK (and the CPU seconds the broker
  and `fleet serve` spent meanwhile: a reconnect storm's cost), and to `/fleet.json`
  showing every box online and live;
- two steady windows (--window-s each, default 3 heartbeats) once every box is live: CPU %
  (utime + stime from /proc/PID/stat, of one core) and RSS (VmRSS, and the peak VmHWM) of
  Mosquitto, of `fleet serve` and, apart, of the load generator; first with nobody
  reading the view (the ingest alone), then with `/metrics` scraped every --scrape-s (10:
  the shipped Prometheus interval), as in production (keys ending `_scraped`);
- then the page loads: GET `/`, `/box/NAME`, `/fleet.json`, `/metrics`, --gets times each
  (best and median, bytes), checking that the page lists every box online and with no
  alarm;
- last, `fleet serve` restarted: time until it shows every box online again from the
  broker's retained messages (a center restarted under a full fleet), and whether the
  broker dropped some of them (its per-client queue, `max_queued_messages`; --max-queued
  replaces the shipped value).

A limit run (--broker-nofile N: the broker's open-files limit, as systemd would set it;
--max-connections N: the broker's max_connections) stops after the ramp: how many boxes
got in, how the broker refused the others (its log), and whether an operator's `appliance
fleet status` (a new connection) still gets in.

The machine is shared (2 cores): the load generator competes with the broker for them.

Usage: .venv/bin/python bench/broker_bench.py [--boxes 1000] [--workers 2] [--heartbeat-s 15]
           [--event-s 60] [--window-s 45] [--scrape-s 10] [--gets 5] [--max-queued N]
           [--broker-nofile N | --max-connections N] [--cache DIR] [--workdir DIR] [--out FILE]
Results: a markdown table on stdout and JSON in --out (default bench/results/, git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.ops import pki  # noqa: E402
from bench.broker_boxes import box_name  # noqa: E402
from tests.fleetserve import FleetServe  # noqa: E402
from tests.mosquitto import Broker, fleet_ca  # noqa: E402
from tests.peers import wait_for  # noqa: E402

FDS_PER_BOX = 1  # the broker: one socket per box; each worker: one socket per box of its share
FDS_SPARE = 256
MAX_QUEUED = re.compile(r"\nmax_queued_messages (\d+)")
DROPPED = "Outgoing messages are being dropped"  # Mosquitto's notice: a client's queue was full


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def open_files_limit(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return None


def raise_fd_limit(boxes: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by the broker and the workers) so
    that every box's socket fits; fail clearly when the hard limit is too low."""
    need = boxes * FDS_PER_BOX + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"{boxes} boxes need {need} open files; the hard limit is {hard}"
                             " (raise it: ulimit -Hn, or LimitNOFILE= for a service)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def certificates(ca: Path, where: Path, n: int) -> tuple[float, int]:
    """Every box's key and certificate (made only where missing); seconds, and how many made."""
    where.mkdir(parents=True, exist_ok=True)
    fleet = pki.load_ca(ca)
    t0, made = time.perf_counter(), 0
    for i in range(n):
        name = box_name(i)
        if (where / f"{name}.pem").exists():
            continue
        pki.box_key_and_csr(name, where / f"{name}.key", where / f"{name}.csr")
        assert pki.sign_csr(fleet, where / f"{name}.csr", where / f"{name}.pem") == name
        made += 1
    return time.perf_counter() - t0, made


class Worker:
    """One bench/broker_boxes.py process; its JSON lines read by a thread into a queue."""

    def __init__(self, args: argparse.Namespace, port: int, certs: Path, ca: Path, first: int, count: int,
                 log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "broker_boxes.py"), "--port", str(port),
             "--certs", str(certs), "--ca", str(ca), "--first", str(first), "--count", str(count),
             "--heartbeat-s", str(args.heartbeat_s), "--event-s", str(args.event_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=REPO, text=True,
            start_new_session=True)
        self.lines: Queue[dict[str, Any]] = Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except Empty:
            raise AssertionError(f"worker {self.proc.pid}: no answer in {timeout:g} s"
                                 f" (exit {self.proc.poll()})") from None

    def ask(self, line: str, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def stop(self) -> dict[str, Any] | None:
        answer = None
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, BrokenPipeError):  # gone: its counters with it
                answer = self.ask("stop")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return answer


def summed(answers: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        for k, v in a.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def all_live(serve: FleetServe, n: int) -> bool:
    boxes = serve.json()
    return len(boxes) == n and all(b["online"] and b["live"] for b in boxes)


ROW = re.compile(rb'<tr class="(ok|alarm)" id="box-([a-z0-9._-]+)"><td>.*?</td><td>(online|OFFLINE)</td>')


def page_rows(page: bytes) -> dict[str, int]:
    rows = ROW.findall(page)
    return {"rows": len(rows), "online": sum(1 for r in rows if r[2] == b"online"),
            "no_alarm": sum(1 for r in rows if r[0] == b"ok")}


def timed_gets(serve: FleetServe, path: str, runs: int) -> tuple[dict[str, Any], bytes]:
    times, body = [], b""
    for _ in range(runs):
        t = time.perf_counter()
        body = serve.get(path)
        times.append(time.perf_counter() - t)
    return {"best_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
            "bytes": len(body)}, body


class Sampler:
    """CPU seconds of some processes from one instant to another."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.c0 = {k: sum(cpu_s(p) for p in ps) for k, ps in pids.items()}

    def used(self) -> dict[str, float]:
        return {k: sum(cpu_s(p) for p in ps) - self.c0[k] for k, ps in self.pids.items()}

    def seconds(self) -> dict[str, float]:
        return {k: round(s, 2) for k, s in self.used().items()}

    def percent(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        return {k: round(100 * s / dt, 2) for k, s in self.used().items()}


def window(args: argparse.Namespace, broker: Broker, serve: FleetServe, workers: list[Worker],
           scrape_s: float, suffix: str, out: dict[str, Any]) -> None:
    """A steady window: CPU and memory of the broker, fleet serve and the load generator;
    `/metrics` scraped every `scrape_s` meanwhile (0: not at all). Keys end in `suffix`."""
    assert broker.proc is not None
    before = summed([w.ask("stats") for w in workers])
    sampler = Sampler({"broker": [broker.proc.pid], "fleet_serve": [serve.proc.pid],
                       "load_generator": [w.proc.pid for w in workers]})
    end = time.monotonic() + args.window_s
    scrapes = 0
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, scrape_s) if scrape_s > 0 else left)
        if scrape_s > 0 and end - time.monotonic() > 0:
            serve.get("/metrics")
            scrapes += 1
    cpu = sampler.percent()
    after = summed([w.ask("stats") for w in workers])
    window_s = time.monotonic() - sampler.t0
    out[f"window_s{suffix}"] = round(window_s, 1)
    out[f"metrics_scrapes_in_window{suffix}"] = scrapes
    for k in ("state", "events", "published", "acked"):
        out[f"window_{k}_per_s{suffix}"] = round((after.get(k, 0) - before.get(k, 0)) / window_s, 1)
    for who, pct in cpu.items():
        out[f"{who}_cpu_pct{suffix}"] = pct
    for who in ("broker", "fleet_serve"):
        out[f"{who}_cpu_pct_per_1000_boxes{suffix}"] = round(cpu[who] * 1000 / args.boxes, 2)
    for who, pid in (("broker", broker.proc.pid), ("fleet_serve", serve.proc.pid)):
        mem = memory_mib(pid)
        out[f"{who}_rss_mib{suffix}"], out[f"{who}_peak_rss_mib{suffix}"] = mem["VmRSS"], mem["VmHWM"]
    gen = [memory_mib(w.proc.pid) for w in workers]
    out[f"load_generator_rss_mib{suffix}"] = round(sum(m["VmRSS"] for m in gen), 1)


def pages(args: argparse.Namespace, serve: FleetServe, out: dict[str, Any]) -> None:
    for label, path in (("page", "/"), ("box_page", f"/box/{box_name(args.boxes // 2)}"),
                        ("fleet_json", "/fleet.json"), ("metrics", "/metrics")):
        got, body = timed_gets(serve, path, args.gets)
        out.update({f"{label}_{k}": v for k, v in got.items()})
        if label == "page":
            rows = page_rows(body)
            out["page_rows"], out["page_online"], out["page_no_alarm"] = rows["rows"], rows["online"], \
                rows["no_alarm"]


def restart_serve(args: argparse.Namespace, root: Path, ca: Path, broker: Broker, serve: FleetServe,
                  out: dict[str, Any]) -> FleetServe:
    """fleet serve stopped and started again: how soon it shows the whole fleet online (the
    retained `online`s) and live (a `state` within 3 heartbeats: the retained ones, or the
    next heartbeat's when the broker dropped some), and whether the broker dropped any."""
    serve.stop()
    dropped_before = broker.log_text().count(DROPPED)
    t0 = time.monotonic()
    serve = FleetServe(root / "serve2", ca, broker, heartbeat_s=args.heartbeat_s)
    for what in ("online", "live"):
        def whole(what: str = what) -> list[dict[str, Any]] | None:
            view = serve.json()
            return view if sum(b[what] for b in view) == args.boxes else None
        try:
            view = wait_for(whole, args.heartbeat_s * 3 + 30, f"every box {what} after fleet serve restarted",
                            poll=0.2)
            out[f"serve_restart_to_all_{what}_s"] = round(time.monotonic() - t0, 2)
        except AssertionError:
            out[f"serve_restart_to_all_{what}_s"] = None
            view = serve.json()
        out[f"serve_restart_boxes_{what}"] = sum(b[what] for b in view)
        if what == "online":  # how many states had come with them (None: not all online in time)
            states = sum(b["state_received"] is not None for b in view)
            complete = out["serve_restart_to_all_online_s"] is not None
            out["serve_restart_states_when_all_online"] = states if complete else None
    out["serve_restart_broker_dropped_notices"] = broker.log_text().count(DROPPED) - dropped_before
    return serve


def start_broker(args: argparse.Namespace, root: Path, ca: Path, out: dict[str, Any]) -> Broker:
    broker = Broker(root / "broker", ca)
    if args.max_queued is not None:  # the shipped value replaced, to find the limit
        conf = broker.conf.read_text()
        assert "\nmax_queued_messages " in conf
        broker.conf.write_text(MAX_QUEUED.sub(f"\nmax_queued_messages {args.max_queued}", conf))
    if args.max_connections is not None:
        broker.conf.write_text(broker.conf.read_text() + f"\nmax_connections {args.max_connections}\n")
    out["broker_max_queued_messages"] = int(MAX_QUEUED.findall(broker.conf.read_text())[0])
    broker.start()
    assert broker.proc is not None
    if args.broker_nofile is not None:  # as systemd would start it (Debian 12: 1024)
        resource.prlimit(broker.proc.pid, resource.RLIMIT_NOFILE, (args.broker_nofile, args.broker_nofile))
    out["broker_fd_limit"] = open_files_limit(broker.proc.pid)
    return broker


def over_the_limit(ca: Path, broker: Broker, got: dict[str, int], out: dict[str, Any]) -> None:
    """More boxes than the broker lets in: how it refuses them, and whether an operator's
    `appliance fleet status`, a new connection now, still gets in (exit 69: it did not)."""
    out["connect_errors"] = sum(v for k, v in got.items() if k.startswith("connect_error."))
    out["broker_refusals"] = sorted({line.split(": ", 1)[-1] for line in broker.log_text().splitlines()
                                     if "denied" in line})
    r = subprocess.run([sys.executable, "-m", "appliance", "fleet", "status", "--ca", str(ca), "--host",
                        "127.0.0.1", "--port", str(broker.port), "--json", "--settle", "5"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    out["fleet_status_exit_when_full"] = r.returncode
    out["fleet_status_says_when_full"] = r.stderr.strip()[:200]


def ramp(args: argparse.Namespace, root: Path, ca: Path, cache: Path, broker: Broker, serve: FleetServe,
         workers: list[Worker], out: dict[str, Any]) -> dict[str, int]:
    """Start the workers; when every box has its CONNACK (or was refused): their counters."""
    assert broker.proc is not None
    t0 = time.monotonic()
    sampler = Sampler({"broker": [broker.proc.pid], "fleet_serve": [serve.proc.pid]})
    share = math.ceil(args.boxes / args.workers)
    for first in range(0, args.boxes, share):
        workers.append(Worker(args, broker.port, cache / "boxes", ca / "ca.pem", first,
                              min(share, args.boxes - first), root / f"worker-{first}.log"))
    got = summed([w.answer(args.boxes * 0.5 + 60) for w in workers])
    out["ramp_all_connected_s"] = round(time.monotonic() - t0, 2)
    out.update({f"ramp_{k}_cpu_s": v for k, v in sampler.seconds().items()})
    out["connected"] = got.get("connected", 0)
    if args.broker_nofile is None and args.max_connections is None:
        assert out["connected"] == args.boxes, f"{out['connected']} of {args.boxes} boxes connected: {got}"
        wait_for(lambda: all_live(serve, args.boxes), args.heartbeat_s * 3 + 60, "every box live at the view",
                 poll=0.5)
        out["ramp_all_live_at_fleet_view_s"] = round(time.monotonic() - t0, 2)
    return got


def run(args: argparse.Namespace, root: Path, cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"boxes": args.boxes, "workers": args.workers, "heartbeat_s": args.heartbeat_s,
                           "event_s": args.event_s, "fd_soft_limit": raise_fd_limit(args.boxes)}
    ca = cache / "ca"
    if not (ca / "ca.pem").exists():
        fleet_ca(ca)
    took, made = certificates(ca, cache / "boxes", args.boxes)
    out["certificates_s"], out["certificates_made"] = round(took, 2), made
    broker = start_broker(args, root, ca, out)
    serve: FleetServe | None = None
    workers: list[Worker] = []
    try:
        serve = FleetServe(root / "serve", ca, broker, heartbeat_s=args.heartbeat_s)
        wait_for(lambda: serve is not None and "broker connected" in serve.log_text(), 30,
                 "fleet serve connected to the broker")  # the center is in before the boxes
        got = ramp(args, root, ca, cache, broker, serve, workers, out)
        if args.broker_nofile is not None or args.max_connections is not None:
            over_the_limit(ca, broker, got, out)
        else:
            window(args, broker, serve, workers, 0, "", out)  # the ingest alone
            if args.scrape_s > 0:  # and with Prometheus scraping, as in production
                window(args, broker, serve, workers, args.scrape_s, "_scraped", out)
            pages(args, serve, out)
            serve = restart_serve(args, root, ca, broker, serve, out)
    finally:
        finals = [a for a in (w.stop() for w in workers) if a is not None]
        if serve is not None:
            serve.stop()
        broker.stop()
    total = summed(finals)
    out.update({f"total_{k}": total.get(k, 0) for k in ("published", "acked", "inflight", "lost", "refused",
                                                         "publish_failed")})
    out["state_bytes_mean"] = round(total.get("state_bytes", 0) / max(1, total.get("state", 0)))
    log = broker.log_text()
    warnings = [line.split(": ", 1)[-1] for line in log.splitlines() if "Warning" in line or "Error" in line]
    out["broker_log_warnings"] = len(warnings)
    out["broker_log_warning_kinds"] = sorted({re.sub(r"sim-\d+", "BOX", w) for w in warnings})[:5]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boxes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="load-generator processes")
    p.add_argument("--heartbeat-s", type=float, default=15)
    p.add_argument("--event-s", type=float, default=60)
    p.add_argument("--window-s", type=float, help="the steady window (default 3 heartbeats)")
    p.add_argument("--scrape-s", type=float, default=10,
                   help="a second window with /metrics scraped every S (0: no second window)")
    p.add_argument("--max-queued", type=int, help="the broker's max_queued_messages (not the shipped one)")
    p.add_argument("--broker-nofile", type=int, help="the broker's open-files limit (a limit run: the ramp,"
                   " how the broker refuses the boxes beyond it, whether `fleet status` gets in)")
    p.add_argument("--max-connections", type=int, help="the broker's max_connections (a limit run too)")
    p.add_argument("--gets", type=int, default=5, help="GETs of each page")
    p.add_argument("--cache", type=Path, help="keep the CA and box certificates here, reused across runs")
    p.add_argument("--workdir", type=Path, help="where the run's temp dir goes")
    p.add_argument("--out", type=Path, help="the JSON result (default bench/results/broker_<time>.json)")
    args = p.parse_args()
    if not 1 <= args.boxes <= 1000:
        p.error("--boxes must be 1..1000 (fleet serve keeps at most fleet.BOXES_MAX = 1000 boxes)")
    args.workers = max(1, min(args.workers, args.boxes))
    args.window_s = args.window_s or 3 * args.heartbeat_s
    with tempfile.TemporaryDirectory(prefix="broker-bench-", dir=args.workdir) as tmp:
        out = run(args, Path(tmp), args.cache or Path(tmp))
    print("| measure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v} |")
    dest = args.out or REPO / "bench" / "results" / f"broker_{time.strftime('%Y%m%dT%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
