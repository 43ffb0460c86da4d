"""The composition root: builds the stages from config, runs them, shuts them down.

Start order (each step must succeed before the next; a failure exits with the error's
code and systemd sees it):
1. take an exclusive lock on `STATE/run/daemon.lock` (two daemons on one spool would
   corrupt each other's view of it);
2. load and check the spool key;
3. open the queue index and recover the spool (temp files, orphans, quarantine);
4. bind the DICOM listeners and the status socket;
5. tell systemd READY=1.

Shutdown (SIGTERM/SIGINT) runs in reverse: stop accepting associations, give running
associations up to `receive.dimse_timeout_s` to finish (an instance they are sending is
either committed before its Success or not acknowledged at all, so cutting them short
loses nothing acknowledged), then close the index.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from appliance import __version__, crypto, durable
from appliance.config import Config
from appliance.db import open_index
from appliance.errors import StateError
from appliance.health.notify import Notifier
from appliance.health.status import StatusServer
from appliance.receive import Receiver, ReceiveStats, identify_stored
from appliance.spool import Spool

log = structlog.get_logger("appliance.daemon")

WATCHDOG_INTERVAL_S = 5.0


def lock_state_dir(state_dir: Path) -> int:
    """Take the daemon lock; returns the fd (kept open for the process lifetime)."""
    run = state_dir / "run"
    try:
        durable.make_dirs(run)
    except OSError as e:
        raise StateError(f"cannot create the state directory {state_dir}: {e.strerror}") from None
    fd = os.open(run / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"another appliance daemon is already running on {state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.notifier = Notifier()
        self.stats = ReceiveStats()
        self.started = time.time()
        self.listeners: list[tuple[str, int, bool]] = []

    def run(self) -> int:
        cfg = self.cfg
        lock_fd = lock_state_dir(cfg.appliance.state_dir)
        key = crypto.load_spool_key(cfg.spool.key_file)
        index = open_index(cfg.appliance.state_dir)
        self.spool = spool = Spool(
            cfg.appliance.state_dir, key, index, cfg.spool.reserve_free_mb << 20,
            cfg.pack.segment_max_instances, cfg.pack.segment_max_mb << 20)
        counts = spool.recover(adopt=identify_stored)
        log.info("spool.recovered", **counts)
        receiver = Receiver(cfg.receive, spool, self.stats)
        status = StatusServer(cfg.status_socket, self.snapshot)
        self._install_signals()
        try:
            self.listeners = receiver.start()
            status.start()
            for host, port, tls in self.listeners:
                log.info("listening", host=host, port=port, tls=tls, ae_title=cfg.receive.ae_title)
            self.notifier.ready(self.status_line())
            log.info("appliance.ready", name=cfg.appliance.name, version=__version__)
            while not self.stop_event.wait(WATCHDOG_INTERVAL_S):
                self.notifier.watchdog()
                self.notifier.status(self.status_line())
        finally:
            self.notifier.stopping()
            log.info("appliance.stopping")
            receiver.stop()
            self._drain(cfg.receive.dimse_timeout_s)
            status.stop()
            index.close()
            os.close(lock_fd)
            log.info("appliance.stopped")
        return 0

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.stats.associations_active and time.monotonic() < deadline:
            time.sleep(0.05)

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self.stop_event.set()
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, stop)
        with contextlib.suppress(AttributeError):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def status_line(self) -> str:
        s = self.stats.snapshot()
        sp = self.spool.stats()
        return (f"received {s['instances_received']}, refused {sum(s['instances_refused'].values())},"
                f" spooled {sp['instances']}, free {sp['free_bytes'] >> 20} MiB")

    def snapshot(self) -> dict[str, Any]:
        sp = self.spool.stats()
        return {
            "name": self.cfg.appliance.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "listening": [{"host": h, "port": p, "tls": t} for h, p, t in self.listeners],
            "ae_title": self.cfg.receive.ae_title,
            "receive": self.stats.snapshot(),
            "spool": sp,
        }
