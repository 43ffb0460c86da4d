#!/usr/bin/env python3
"""Failover over the emulated WAN: from cutting the link to center A (mid-bundle) until
center B holds its first instance (issue 11, target <= 15 s; nothing lost or duplicated).

The bed and peers are tests/wan_failover.py's, the same as tests/test_wan_failover.py:
namespaces `site` (storescu and the appliance), `center` (Orthanc A) and `center_b`
(Orthanc B), each center on its own veth link limited with `tc tbf` (--rate, both). The
appliance has destinations center-a then center-b (dicom, timeout_s 60, the shipped
link_timeout_s unless --link-timeout), queue lanes 2, segments of 10 instances. Per run,
on a fresh bed: a scanner sends the study in associations of 10 images; once A holds 15
and a bundle is on its way, A's link is partitioned (nft drop both ways: a silent link).
Times from the partition (wall clock; the daemon's log timestamps for the steps):

- silent_s  the dicom transport notices the silent link (`dicom.link_silent` logged);
- down_s    center-a marked down (`destination.down`);
- first_b_s center B's Orthanc holds its first instance (REST, polled every 0.05 s).

Then every bundle must be delivered and `tests.wan_failover.problems` must find nothing
(every instance at A or B, none C-STOREd twice at one PACS).

    .venv/bin/python bench/failover_bench.py [--runs 5] [--slices 80] [--rate 10]

Needs root (network namespaces). Prints a markdown table; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from receive_bench import generate_study, machine, source  # noqa: E402

from tests.e2e_support import read_dataset, settled  # noqa: E402
from tests.peers import wait_for  # noqa: E402
from tests.wan_failover import Modality, problems, two_centers  # noqa: E402


def first_event(log: str, since: float, match: str) -> float | None:
    """Seconds after `since` (time.time()) of the daemon's first log line containing
    `match` at or after it."""
    for line in log.splitlines():
        if match not in line:
            continue
        try:
            stamp = dt.datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()
        except (ValueError, KeyError):
            continue
        if stamp >= since:
            return stamp - since
    return None


def one_run(root: Path, files: list[Path], rate: float, destination: dict[str, Any]) -> dict[str, Any]:
    sent = {str(read_dataset(f).SOPInstanceUID) for f in files}
    with two_centers(root, **destination) as bed:
        bed.wan.link.rate(rate)
        bed.wan.links["center_b"].rate(rate)
        modality = Modality(bed.app.port, files, bed.wan.site.name)
        try:
            cut = bed.cut_mid_bundle(min_at_a=15)
        finally:
            modality.join(300)
        if set(modality.codes) != {0}:
            raise RuntimeError(f"storescu failed: {modality.codes}")
        wait_for(lambda: settled(bed.app.state_dir), 300, "every bundle delivered", poll=0.5,
                 detail=bed.detail)
        log = bed.app.log_text()
        found = problems(bed.a, bed.b, sent)
        return {"first_b_s": cut.seconds, "silent_s": first_event(log, cut.wall, '"dicom.link_silent"'),
                "down_s": first_event(log, cut.wall, '"destination.down"'),
                "at_a_at_cut": cut.at_a, "active_at_cut": cut.active,
                "at_a": bed.a.count(), "at_b": bed.b.count(), "problems": found,
                "netns": bed.wan.names(), "load_1m": os.getloadavg()[0]}


def table(runs: list[dict[str, Any]]) -> str:
    out = ["| run | silent s | down s | first at B s | A held at cut | A / B at end | problems |",
           "|---:|---:|---:|---:|---:|---|---|"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for i, r in enumerate(runs, 1):
        wrong = "; ".join(r["problems"]) or "none"
        out.append(f"| {i} | {f(r['silent_s'])} | {f(r['down_s'])} | {f(r['first_b_s'])} |"
                   f" {r['at_a_at_cut']} | {r['at_a']} / {r['at_b']} | {wrong} |")
    med = {k: statistics.median(r[k] for r in runs if r[k] is not None)
           for k in ("silent_s", "down_s", "first_b_s") if any(r[k] is not None for r in runs)}
    out.append(f"| **median** | {f(med.get('silent_s'))} | {f(med.get('down_s'))} |"
               f" **{f(med.get('first_b_s'))}** | | | |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slices", type=int, default=80)
    ap.add_argument("--rate", type=float, default=10, help="Mbit/s of each center's link")
    ap.add_argument("--link-timeout", type=float, default=None, help="link_timeout_s (default: shipped)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("failover_bench needs root (network namespaces, tc, nft)")
    # SIGTERM (e.g. `timeout`) unwinds like an exception, so the bed and peers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    destination = {} if args.link_timeout is None else {"link_timeout_s": args.link_timeout}
    root = Path(tempfile.mkdtemp(prefix="fb-", dir=args.workdir))  # short: socket paths
    try:
        files = generate_study(root / "study", args.slices)
        runs = [one_run(root / f"run{i}", files, args.rate, destination) for i in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nFailover: {args.slices} slices, {args.rate:g} Mbit/s links, {args.runs} runs,"
          f" link_timeout_s {args.link_timeout or 'shipped'}\n")
    print(table(runs))
    out = {"slices": args.slices, "rate_mbit": args.rate, "destination": destination, "runs": runs,
           "median_first_b_s": statistics.median(r["first_b_s"] for r in runs),
           "source": source(), "machine": machine()}
    dest = args.out or REPO / "bench" / "results" / time.strftime("failover-%Y%m%d-%H%M%S.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {dest}")
    return 1 if any(r["problems"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
