"""The SFTP upload benchmark runs end to end (4 MiB, 1 run, 5 ms each way); speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO


def test_sftp_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "sftp_bench.py"), "--runs", "1",
                        "--mb", "4", "--delay-ms", "5", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| appliance sftp |" in r.stdout and "| openssh sftp -b |" in r.stdout
    assert "appliance/openssh:" in r.stdout
    result = json.loads(out.read_text())
    assert result["rtt_ms"] == 10 and set(result["mb_s"]) == {"appliance sftp", "openssh sftp -b"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # temp dirs removed
