#!/usr/bin/env python3
"""Time to first byte and time to center over the emulated WAN, before and after the
link-filling pack settings (issue 11 item 8): a CT study from the first C-STORE until the
center's Orthanc holds its first instance, half of it, and all of it.

Same bed and peers as bench/wan_bench.py (tests/wan.py: namespaces `site` and `center`,
one veth limited with `tc tbf`). Per rate, interleaved for --runs runs, each on a fresh
center Orthanc:

- direct     storescu in `site` -> Orthanc in `center`;
- appliance  storescu -> appliance (shipped pack defaults) -> DICOM C-STORE -> center;
- first      the same with `pack.during_burst = "first"` (only a study's first segment
             is packed during a burst);
- before     the same with the pack settings from before the change
             (`pack.first_segment_instances = 100`, `pack.during_burst = "never"`).

The compressed limit is the appliance's bundle bytes / the measured goodput. The center's
count is polled every 0.05 s (REST), so times are within ~0.1 s.

    .venv/bin/python bench/firstbyte_wan_bench.py [--slices 300] [--rates 20,100] [--runs 2]

Needs root (network namespaces). Prints a markdown table; JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from e2e_bench import BEFORE  # noqa: E402
from receive_bench import generate_study, machine, source  # noqa: E402
from wan_bench import appliance_at_site, bundle_bytes, center, storescu  # noqa: E402

from tests.orthanc import Orthanc  # noqa: E402
from tests.wan import Wan  # noqa: E402


def wait_marks(pacs: Orthanc, n: int, sender: subprocess.Popen[bytes], log: Path,
               timeout: float, t0: float) -> dict[str, float]:
    """Seconds from t0 until the center holds 1, n // 2 and n instances, and until the
    scanner (storescu) was done ("scanner_s")."""
    marks = {"first_s": 1, "center_s": max(1, n // 2), "total_s": n}
    got: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = pacs.count()
        now = time.perf_counter() - t0
        got.update({k: now for k, m in marks.items() if k not in got and count >= m})
        rc = sender.poll()
        if rc == 0 and "scanner_s" not in got:
            got["scanner_s"] = now
        if len(got) == len(marks) + 1:
            return got
        if rc not in (None, 0):
            raise RuntimeError(f"storescu failed:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"center holds {pacs.count()} of {n} after {timeout:g} s")


def run_direct(wan: Wan, work: Path, files: list[Path], timeout: float) -> dict[str, float]:
    pacs = center(wan, work / "center")
    try:
        t0 = time.perf_counter()
        p = storescu(wan, wan.center.addr, pacs.dicom_port, "ORTHANC", files, work / "storescu.log")
        times = wait_marks(pacs, len(files), p, work / "storescu.log", timeout, t0)
        p.wait(60)
        return times
    finally:
        pacs.stop()


def run_appliance(wan: Wan, work: Path, files: list[Path], timeout: float,
                  pack: dict[str, Any]) -> dict[str, float]:
    with appliance_at_site(wan, work, pack) as (app, pacs):
        t0 = time.perf_counter()
        p = storescu(wan, "127.0.0.1", app.port, "EDGE", files, work / "storescu.log")
        times = wait_marks(pacs, len(files), p, work / "storescu.log", timeout, t0)
        p.wait(60)
        return {**times, "bundle_mb": bundle_bytes(app.state_dir) / 1e6}


def one_rate(mbit: float, work: Path, files: list[Path], runs: int,
             extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = sum(f.stat().st_size for f in files)
    timeout = 600 + raw * 8 / (mbit * 1e6) * 3
    modes: dict[str, list[dict[str, float]]] = {"direct": [], "appliance": [], "first": [],
                                                "before": [], **{m: [] for m in extra}}
    with Wan() as wan:
        wan.link.rate(mbit)
        link = wan.link.measure(seconds=4)
        print(f"{mbit:g} Mbit/s: goodput {link['goodput_bps'] / 1e6:.2f} Mbit/s", flush=True)
        for run in range(runs):
            w = work / f"run{run}"
            modes["appliance"].append(run_appliance(wan, w / "appliance", files, timeout, {}))
            modes["first"].append(run_appliance(wan, w / "first", files, timeout,
                                                {"during_burst": "first"}))
            modes["before"].append(run_appliance(wan, w / "before", files, timeout, BEFORE))
            for m, pack in extra.items():
                modes[m].append(run_appliance(wan, w / m, files, timeout, pack))
            modes["direct"].append(run_direct(wan, w / "direct", files, timeout))
            print(f"  run {run + 1}: " + ", ".join(
                f"{m} {v[-1]['first_s']:.1f}/{v[-1]['center_s']:.1f}/{v[-1]['total_s']:.1f} s"
                for m, v in modes.items()), flush=True)
    med = {m: {k: statistics.median(r[k] for r in v) for k in v[0]} for m, v in modes.items()}
    return {"mbit": mbit, "link": link, "raw_mb": raw / 1e6, "runs": modes, "median": med,
            "compressed_limit_s": med["appliance"]["bundle_mb"] * 1e6 * 8 / link["goodput_bps"],
            "raw_limit_s": raw * 8 / link["goodput_bps"]}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| link | compressed limit | mode | first instance | half | all | all / compressed limit"
           " | all / direct | scanner done |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lim, direct = r["compressed_limit_s"], r["median"]["direct"]["total_s"]
        for m, v in r["median"].items():
            out.append(f"| {r['mbit']:g} Mbit/s | {lim:.1f} s | {m} | {v['first_s']:.1f} s |"
                       f" {v['center_s']:.1f} s | {v['total_s']:.1f} s | {v['total_s'] / lim:.2f}x |"
                       f" {v['total_s'] / direct:.2f}x | {v['scanner_s']:.1f} s |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rates", default="20,100", help="Mbit/s, comma-separated")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--jpegls", action="store_true",
                    help="also run the appliance with pack.codec = jpeg-ls (mode jpeg-ls)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("firstbyte_wan_bench needs root (network namespaces, tc, nft)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="fb-wan-", dir=args.workdir))
    files = generate_study(root / "study", args.slices)
    extra = {"jpeg-ls": {"codec": "jpeg-ls"}} if args.jpegls else {}
    rows = [one_rate(float(m), root / f"r{m}", files, args.runs, extra)
            for m in args.rates.split(",") if m]
    print(f"\nStudy: {len(files)} slices, {rows[0]['raw_mb']:.1f} MB; median of {args.runs} run(s);"
          f" first instance / half / all at the center, from the first C-STORE\n")
    print(table(rows))
    out = {"slices": len(files), "rows": rows, "source": source(), "machine": machine()}
    dest = args.out or REPO / "bench" / "results" / time.strftime("fbwan-%Y%m%d-%H%M%S.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
