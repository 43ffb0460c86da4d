#!/usr/bin/env python3
"""SFTP upload benchmark: the appliance's sftp transport vs OpenSSH `sftp -b`, same file,
same sshd, over a link with 40 ms round trip (bench/delay_relay.py, 20 ms each way).

What it does (see docs/benchmarks.md, section "SFTP upload"):
- starts a real OpenSSH sshd (tests/sshd.py: chrooted internal-sftp, its own keys) and
  bench/delay_relay.py in front of it, as separate processes;
- writes one bundle of --mb MiB (random instance data, sealed for a fresh X25519 key,
  so that the transport's verification pass runs as in production);
- per run, interleaved: `SftpTransport.send` (connect, handshake, login, upload of the
  .part with verification, fsync, size check, rename) and OpenSSH `sftp -b` with
  `put` of the same file (connect, handshake, login, upload), each timed from start to
  end; the uploaded file is compared with the original and removed after each run;
- prints MB/s (10^6 bytes) per tool, median of --runs, and ours/OpenSSH.

Usage: .venv/bin/python bench/sftp_bench.py [--runs 3] [--mb 64] [--delay-ms 20]
Results: a markdown table on stdout and JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from appliance.bundle.format import BundleWriter, InstanceInfo  # noqa: E402
from appliance.forward import Plan  # noqa: E402
from appliance.forward.sftp import SftpTransport  # noqa: E402
from tests.sshd import REMOTE_DIR, Sshd  # noqa: E402

INSTANCE = 4 << 20


def make_bundle(path: Path, mib: int, key: X25519PrivateKey) -> None:
    with path.open("wb") as f:
        w = BundleWriter(f, path.stem, [key.public_key()], "bench-study")
        for i in range(max(1, mib * (1 << 20) // INSTANCE)):
            data = os.urandom(INSTANCE)
            w.begin_instance(InstanceInfo(
                sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}", sop_class="1.2.840.10008.5.1.4.1.1.7",
                transfer_syntax="1.2.840.10008.1.2.1", received_transfer_syntax="1.2.840.10008.1.2.1",
                received_size=len(data), received_sha256=hashlib.sha256(data).hexdigest(),
                action="passthrough"))
            w.write(data)
            w.end_instance()
        w.close()


def start_relay(target: int, delay_ms: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "delay_relay.py"),
                             "--target-port", str(target), "--delay-ms", str(delay_ms)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "listening <port>", printed once it listens
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"delay relay did not start: {line!r}")
    return proc, int(line.split()[1])


def ours(server: Sshd, port: int, bundle: Path, key: X25519PrivateKey) -> float:
    t = SftpTransport(server.destination(port=port, timeout_s=60.0), key)
    t0 = time.perf_counter()
    t.send(bundle.stem, bundle, lambda n: None, Plan())
    return time.perf_counter() - t0


def openssh(server: Sshd, port: int, bundle: Path) -> float:
    known = server.root / f"known_hosts.{port}"  # written by server.destination(port=...)
    cmd = ["sftp", "-q", "-b", "-", "-i", str(server.client_key), "-P", str(port),
           "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
           "-o", "BatchMode=yes", "root@127.0.0.1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, input=f"put {bundle} {REMOTE_DIR}/{bundle.stem}.bundle\n", text=True,
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=64, help="bundle size, MiB")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="each way")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    key = X25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        bundle = root / "bench1.bundle"
        make_bundle(bundle, args.mb, key)
        size = bundle.stat().st_size
        times: dict[str, list[float]] = {"appliance sftp": [], "openssh sftp -b": []}
        with Sshd(root / "sshd") as server:
            relay, port = start_relay(server.port, args.delay_ms)
            server.destination(port=port)  # writes the known_hosts for the relay's port
            try:
                for _ in range(args.runs):
                    for name, run in (("appliance sftp", lambda: ours(server, port, bundle, key)),
                                      ("openssh sftp -b", lambda: openssh(server, port, bundle))):
                        times[name].append(run())
                        landed = server.drop / bundle.name
                        if landed.read_bytes() != bundle.read_bytes():
                            raise SystemExit(f"{name}: the uploaded file differs")
                        landed.unlink()
            finally:
                os.killpg(relay.pid, signal.SIGTERM)
                relay.wait(10)
    rate = {n: size / statistics.median(ts) / 1e6 for n, ts in times.items()}
    ratio = rate["appliance sftp"] / rate["openssh sftp -b"]
    print(f"bundle {size / 1e6:.1f} MB, RTT {2 * args.delay_ms:g} ms, {args.runs} runs (median)\n")
    print("| uploader | MB/s | seconds (runs) |")
    print("|---|---|---|")
    for n, ts in times.items():
        print(f"| {n} | {rate[n]:.1f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    print(f"\nappliance/openssh: {ratio:.2f}")
    result = {"when": dt.datetime.now(dt.UTC).isoformat(), "bytes": size, "rtt_ms": 2 * args.delay_ms,
              "runs": args.runs, "seconds": times, "mb_s": rate, "ratio": ratio,
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=REPO).stdout.strip()}
    out = args.out or REPO / "bench" / "results" / f"sftp-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
