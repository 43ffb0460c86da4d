"""End-to-end benchmark: scanner -> appliance -> PACS, against scanner -> PACS directly.

Measures, on loopback in one run, the time from the first C-STORE of a CT study (the
phantom of receive_bench.py) until the last instance is stored in Orthanc:

- direct:    storescu -> Orthanc (the reference: what the scanner would do without us);
- appliance: storescu -> appliance (durable, encrypted, J2K lossless, verified) ->
             DICOM C-STORE -> Orthanc, with the default pack settings except
             `--quiet`, the study-quiet time after which the last segment is sealed;
- before:    the appliance as before issue 11 item 8 (a 100-image first segment, nothing
             packed during a burst: `pack.first_segment_instances = 100`,
             `pack.during_burst = "never"`), with `--before`.

Reported per mode: median seconds to the first instance in Orthanc (time to first
byte, as the PACS sees it), to half the study ("center") and to all of it; the part
the scanner waited for (its storescu run), and for the appliance the bytes Orthanc
received against the bytes sent. On a
real uplink the wire bytes decide; on loopback the fixed costs (quiet time, packing) do,
so read the ratio with that in mind (docs/benchmarks.md).

    .venv/bin/python bench/e2e_bench.py [--slices 300] [--runs 3] [--quiet 2] [--before]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from receive_bench import PDU, generate_study, send  # noqa: E402

from tests.orthanc import Modality, Orthanc  # noqa: E402
from tests.peers import Appliance, base_config, free_port  # noqa: E402


def wait_counts(pacs: Orthanc, n: int, timeout: float, t0: float,
                sent: Future[float]) -> dict[str, float]:
    """Seconds from t0 until Orthanc holds 1, n // 2 and n instances (raises at once if
    the scanner's send failed)."""
    marks = {"first_s": 1, "center_s": max(1, n // 2), "total_s": n}
    got: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = pacs.count()
        now = time.perf_counter() - t0
        got.update({k: now for k, m in marks.items() if k not in got and count >= m})
        if len(got) == len(marks):
            return got
        if sent.done() and sent.exception() is not None:
            raise RuntimeError("the send failed") from sent.exception()
        time.sleep(0.02)
    raise TimeoutError(f"Orthanc has {pacs.count()} of {n} instances after {timeout:g} s")


def run_direct(work: Path, files: list[Path]) -> dict[str, float]:
    with Orthanc(work / "pacs", max_pdu=PDU) as pacs, ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        sent = ex.submit(send, pacs.dicom_port, "ORTHANC", [files], work / "direct")
        times = wait_counts(pacs, len(files), 60, t0, sent)
        return {**times, "scanner_s": sent.result()}


def run_appliance(work: Path, files: list[Path], quiet: float,
                  pack: dict[str, Any] | None = None) -> dict[str, float]:
    edge = free_port()
    with Orthanc(work / "pacs", max_pdu=PDU,
                 modalities={"edge": Modality("EDGE", "127.0.0.1", edge)}) as pacs:
        cfg = base_config(work / "a", edge)
        cfg["pack"] = {"study_quiet_s": quiet, **(pack or {})}
        cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                                "port": pacs.dicom_port, "ae_title": "ORTHANC", "plaintext": True}]
        app = Appliance(work / "a", cfg)
        try:
            app.start()
            with ThreadPoolExecutor(1) as ex:
                t0 = time.perf_counter()
                sent = ex.submit(send, edge, "EDGE", [files], work / "edge")
                times = wait_counts(pacs, len(files), 600, t0, sent)
                scanner = sent.result()
            stats = pacs.get("/statistics")
        finally:
            app.stop()
            app.kill9()
        return {**times, "scanner_s": scanner, "pacs_disk_mb": int(stats["TotalDiskSize"]) / 1e6}


# pack settings of the code before issue 11 item 8 (see the module docstring)
BEFORE = {"first_segment_instances": 100, "during_burst": "never"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=2.0, help="pack.study_quiet_s for the appliance")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--before", action="store_true",
                    help="also run the appliance with the pack settings from before issue 11 item 8")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="e2e-", dir=args.workdir))
    files = generate_study(root / "study", args.slices)
    sent_mb = sum(f.stat().st_size for f in files) / 1e6
    modes = ["direct", "appliance", *(["before"] if args.before else [])]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for run in range(args.runs):  # interleaved: the machine's noise hits all alike
        results["direct"].append(run_direct(root / f"d{run}", files))
        results["appliance"].append(run_appliance(root / f"a{run}", files, args.quiet))
        if args.before:
            results["before"].append(run_appliance(root / f"b{run}", files, args.quiet, BEFORE))
        print(f"run {run + 1}: " + ", ".join(
            f"{m} first {results[m][-1]['first_s']:.2f} s center {results[m][-1]['center_s']:.2f} s"
            f" all {results[m][-1]['total_s']:.2f} s" for m in modes), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    print(f"\nStudy: {len(files)} slices, {sent_mb:.1f} MB; median of {args.runs};"
          f" appliance pack.study_quiet_s = {args.quiet:g}\n")
    print("| path | first C-STORE -> first instance in Orthanc (s) | -> half (s) | -> last (s)"
          " | scanner busy (s) |")
    print("|---|---:|---:|---:|---:|")
    for k in modes:
        print(f"| {k} | {med[k]['first_s']:.2f} | {med[k]['center_s']:.2f} | {med[k]['total_s']:.2f}"
              f" | {med[k]['scanner_s']:.2f} |")
    print(f"\n- appliance/direct time: {med['appliance']['total_s'] / med['direct']['total_s']:.2f}x"
          f" (of which study-quiet wait {args.quiet:g} s)")
    print(f"- bytes sent by the scanner {sent_mb:.1f} MB; stored by Orthanc via the appliance"
          f" {med['appliance']['pacs_disk_mb']:.1f} MB (J2K lossless)")
    out: dict[str, Any] = {"slices": len(files), "sent_mb": sent_mb, "quiet_s": args.quiet,
                           "runs": results, "median": med}
    dest = args.out or Path(__file__).parent / "results" / time.strftime("e2e-%Y%m%d-%H%M%S.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
