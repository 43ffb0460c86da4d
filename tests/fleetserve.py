"""`appliance fleet serve` as a subprocess for tests and benches: subscribed to a test
broker (tests/mosquitto.py) with the fleet CA's operations-center certificate, serving on
a free loopback port; stopped by PID (SIGTERM, then SIGKILL). `json()` reads /fleet.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.mosquitto import Broker
from tests.peers import REPO, free_port, wait_for


class FleetServe:
    """`appliance fleet serve` as a subprocess on a free loopback port."""

    def __init__(self, root: Path, ca: Path, broker: Broker, heartbeat_s: float = 15) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "fleet-serve.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "fleet", "serve", "--ca", str(ca), "--host", "127.0.0.1",
                 "--port", str(broker.port), "--heartbeat", str(heartbeat_s),
                 "--bind", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        wait_for(lambda: "serving http://" in self.log_text() or self._exited(), 30, "fleet serve listening",
                 detail=self.log_text)
        assert self.proc.poll() is None, self.log_text()

    def _exited(self) -> bool:
        return self.proc.poll() is not None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:  # noqa: S310 (http, loopback)
            body: bytes = r.read(8 << 20)
        return body

    def json(self) -> list[dict[str, Any]]:
        """The fleet view: every box (ops/fleet.py box_view)."""
        boxes: list[dict[str, Any]] = json.loads(self.get("/fleet.json"))
        return boxes
