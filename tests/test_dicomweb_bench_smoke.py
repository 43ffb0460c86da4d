"""The dicomweb benchmark runs end to end (--quick); speed is not asserted, memory is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO

pytestmark = pytest.mark.peers


def test_dicomweb_bench_quick_delivers_and_stays_small(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "dicomweb_bench.py"), "--quick",
                        "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| bundle | instances | MiB | seconds | MiB/s | RSS growth MiB |" in r.stdout
    results = {x["bundle"]: x for x in json.loads(out.read_text())["results"]}
    assert results["many"]["stored"] == 20 and results["large"]["stored"] == 1
    # a 25 MiB instance is streamed: the sender grows by far less than its size
    assert results["large"]["rss_growth_mib"] < 16
