#!/usr/bin/env python3
"""Time of the receive hot path's UID scan (`dicomscan.scan_identifiers`) per CT slice.

The receiver scans each instance as it is acknowledged: our own file meta
(`receive.identify.part10_header`) followed by the data set as received, cut to
`receive.identify.IDENTIFY_PREFIX` bytes (what `identify` hands the scanner). Here the data
sets are those of the samples' 28-slice Philips CT phantom, cycled to `--slices`
instances; each timing is one pass over all of them, the best and the median of
`--repeat` passes are reported in microseconds per slice. Every slice must be scanned
(not left to pydicom), or the figure would time the wrong thing.

`--compare FILE` times another version of the module too (e.g. main's
appliance/core/dicomscan.py, extracted with `git show main:appliance/core/dicomscan.py`),
its passes interleaved with this checkout's, after checking both give the same answers.

Usage: .venv/bin/python bench/scan_bench.py [--slices 300] [--repeat 15] [--compare FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.core import dicomscan  # noqa: E402
from appliance.receive.identify import IDENTIFY_PREFIX, part10_header  # noqa: E402
from tests.peers import SAMPLES  # noqa: E402

CT_SERIES = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def heads(slices: int) -> list[bytes]:
    """What `identify` scans for each instance, as the receiver builds it."""
    files = sorted(p for p in CT_SERIES.iterdir() if p.is_file())
    out = []
    for i in range(slices):
        raw = files[i % len(files)].read_bytes()
        ids = dicomscan.scan_identifiers(raw)
        assert ids is not None, files[i % len(files)].name
        start = raw.index(b"\x08\x00", 132)  # the data set starts with group 0008 here
        head = part10_header(ids[dicomscan.MEDIA_SOP_CLASS], ids[dicomscan.SOP_INSTANCE_UID],
                             ids[dicomscan.TRANSFER_SYNTAX], "CT_SCANNER")
        out.append((head + raw[start:])[:IDENTIFY_PREFIX])
    return out


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("dicomscan_compared", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--compare", type=Path, help="another dicomscan.py to time alongside")
    args = ap.parse_args(argv)
    data = heads(args.slices)
    scans: dict[str, Callable[[bytes], Any]] = {"this checkout": dicomscan.scan_identifiers}
    if args.compare:
        scans[str(args.compare)] = load(args.compare).scan_identifiers
    for name, scan in scans.items():
        if any(scan(d) is None for d in data):
            raise SystemExit(f"{name}: a slice was left to pydicom: the figure would not time the scanner")
        if any(scan(d) != dicomscan.scan_identifiers(d) for d in data):
            raise SystemExit(f"{name}: answers differ from this checkout's")
    per_slice: dict[str, list[float]] = {name: [] for name in scans}
    for _ in range(args.repeat):
        for name, scan in scans.items():
            t0 = time.perf_counter()
            for d in data:
                scan(d)
            per_slice[name].append((time.perf_counter() - t0) / len(data) * 1e6)
    for name, times in per_slice.items():
        print(json.dumps({"code": name, "slices": len(data), "repeat": args.repeat,
                          "best_us": round(min(times), 2), "median_us": round(statistics.median(times), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
