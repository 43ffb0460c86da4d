"""The watchdog means progress: the real daemon, a fake systemd notify socket, a failpoint.

systemd itself runs the unit in tests/test_systemd_boot.py; here the daemon runs as a
process of the test with NOTIFY_SOCKET pointing at a datagram socket the test reads, the
way systemd's sd_notify protocol works.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers import Appliance, base_config, free_port, storescu, wait_for


class NotifySocket:
    """Collects sd_notify datagrams (READY=1, WATCHDOG=1, STATUS=...) with their times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def since(self, t: float, prefix: str) -> list[str]:
        return [m for when, m in list(self.messages) if when >= t and m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def test_a_frozen_pack_stage_withholds_the_watchdog_until_it_moves_again(
        appliance_factory: Callable[..., Appliance], notify: NotifySocket, samples: Path,
        tmp_path: Path) -> None:
    root = tmp_path / "a"
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5}
    cfg["health"] = {"stall_s": 5}
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    (root / "outbox").mkdir(parents=True)
    app = appliance_factory(cfg, root=root, start=False)
    app.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000",
               "APPLIANCE_FAILPOINTS": str(failpoints)}
    app.start()
    t0 = time.monotonic()
    wait_for(lambda: notify.since(t0, "WATCHDOG=1"), what="watchdog pings from an idle daemon")
    assert any(m == "READY=1" for _, m in notify.messages)

    (failpoints / "pack.hang").write_text("hang")
    files = sorted((samples / "series" / "MR_Philips_abdomen_11sl").iterdir())
    assert storescu(app.port, files).returncode == 0
    wait_for(lambda: notify.since(t0, "STATUS=stuck: pack: pack without progress"), timeout=30,
             what="the stuck pack stage in STATUS")
    stuck_at = time.monotonic()
    time.sleep(2.0)  # four watchdog periods
    assert notify.since(stuck_at, "WATCHDOG=1") == [], "a stuck stage must not feed the watchdog"
    assert app.status()["stages"]["pack"]["state"] == "stuck"

    (failpoints / "pack.hang").unlink()
    resumed = time.monotonic()
    wait_for(lambda: notify.since(resumed, "WATCHDOG=1"), what="watchdog pings again")
    wait_for(lambda: list((root / "outbox").glob("*.bundle")), what="the study packed and delivered")
    assert "watchdog.withheld" in app.log_text() and "watchdog.resumed" in app.log_text()


def test_a_stage_that_only_waits_for_work_keeps_feeding_the_watchdog(
        appliance_factory: Callable[..., Appliance], notify: NotifySocket, tmp_path: Path) -> None:
    root = tmp_path / "b"
    cfg = base_config(root, free_port())
    cfg["health"] = {"stall_s": 5}
    app = appliance_factory(cfg, root=root, start=False)
    app.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    app.start()
    time.sleep(7)  # longer than stall_s with nothing to do
    pings = notify.since(0, "WATCHDOG=1")
    assert len(pings) >= 10
    assert {s["state"] for s in app.status()["stages"].values()} == {"idle"}
