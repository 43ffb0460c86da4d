"""The WAN benchmarks run end to end over the bed: time to center (6 slices, 100 Mbit/s,
every mode) and failover (one run, 40 slices); speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO
from tests.wan import netns_list

pytestmark = pytest.mark.wan


def test_wan_bench_smoke(tmp_path: Path) -> None:
    """Every mode runs, the JSON has its figures, and no work dir or namespace is left."""
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "wan_bench.py"), "--slices", "6",
                        "--rates", "100", "--autoroute", "100", "--quiet", "1",
                        "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| 100 Mbit/s |" in r.stdout, r.stdout
    row = json.loads(out.read_text())["rows"][0]
    for mode in ("direct", "appliance", "autoroute"):
        assert row[mode]["total_s"] > 0, row
    assert row["appliance"]["bundle_mb"] > 0 and len(row["appliance"]["pack_s"]) >= 1, row
    assert 0.9 < row["link"]["wire_bps"] / 100e6 < 1.05, row["link"]
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert len(row["netns"]) == 2 and not set(row["netns"]) & set(netns_list())


def test_failover_bench_smoke(tmp_path: Path) -> None:
    """One failover run: the times are there and in order, nothing lost or repeated, and
    no work dir or namespace is left."""
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "failover_bench.py"), "--runs", "1",
                        "--slices", "40", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| **median** |" in r.stdout, r.stdout
    run = json.loads(out.read_text())["runs"][0]
    assert 0 < run["silent_s"] <= run["down_s"] <= run["first_b_s"], run
    assert run["problems"] == [] and run["at_b"] > 0, run
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert len(run["netns"]) == 3 and not set(run["netns"]) & set(netns_list())
