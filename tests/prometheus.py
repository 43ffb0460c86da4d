"""A real Prometheus (Debian `prometheus`) for the alert tests: the shipped
config/ops-center/prometheus.yml and alerts.yml copied into a temp dir, the config's
intervals shortened and its fleet target pointed at a test's `fleet serve`, on a free
loopback port with a temp storage dir; stopped by PID (SIGTERM, then SIGKILL).

Only the intervals, the fleet target and the Alertmanager address change: the rules are
the shipped file, unchanged (their `for:` included), so a test waits as long as a real
operations center would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers import REPO, free_port, wait_for

PROMETHEUS = "/usr/bin/prometheus"
SHIPPED = REPO / "config" / "ops-center"


def config_for_test(shipped: str, fleet_target: str, interval_s: int | None = 1) -> str:
    """The shipped config with every interval `interval_s` (None: the shipped ones), the
    fleet job at `fleet_target` and no Alertmanager. Each rewrite must hit exactly once: a
    config that drifts from what this expects fails here, not silently."""
    rewrites = [
        ('      - targets: ["127.0.0.1:9120"]\n', f'      - targets: ["{fleet_target}"]\n'),
        ('alerting:\n  alertmanagers:\n    - static_configs:\n'
         '        - targets: ["127.0.0.1:9093"]  # Debian prometheus-alertmanager\n', ""),
    ]
    if interval_s is not None:
        rewrites += [
            ("  scrape_interval: 15s\n  evaluation_interval: 15s\n",
             f"  scrape_interval: {interval_s}s\n  evaluation_interval: {interval_s}s\n"),
            ("    scrape_interval: 10s\n    scrape_timeout: 5s\n",
             f"    scrape_interval: {interval_s}s\n    scrape_timeout: {interval_s}s\n"),
        ]
    text = shipped
    for old, new in rewrites:
        assert text.count(old) == 1, f"prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Prometheus:
    def __init__(self, root: Path, fleet_target: str, interval_s: int | None = 1) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = root / "prometheus.yml"
        self.config.write_text(config_for_test((SHIPPED / "prometheus.yml").read_text(), fleet_target,
                                                interval_s))
        (root / "alerts.yml").write_text((SHIPPED / "alerts.yml").read_text())
        self.log = root / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        wait_for(self._ready, 60, "prometheus ready", detail=self.log_text)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as r:  # noqa: S310 (http, loopback)
                return bool(r.status == 200)
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http, loopback)
            doc = json.loads(r.read(1 << 20))
        assert doc["status"] == "success", doc
        return doc["data"]

    def api_text(self, path: str, **params: str) -> str:
        """A non-API path's text, e.g. `federate` (every series in the text format)."""
        url = f"{self.url}/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http, loopback)
            text: str = r.read(16 << 20).decode()
        return text

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) with their labels and annotations."""
        result: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return result

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
