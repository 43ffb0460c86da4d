"""Test helpers: run the real appliance daemon and the real DCMTK tools on loopback.

Every process a test starts is started here, in the test's temp directory, on a free
loopback port, and stopped by PID at teardown. Nothing outside the temp dirs is touched.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tests.wan import entered, exec_prefix

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("APPLIANCE_SAMPLES", REPO.parent / "shared" / "dicom-samples"))


def wait_for(cond: Callable[[], T], timeout: float = 20.0, what: str = "condition",
             poll: float = 0.05, detail: Callable[[], str] = lambda: "") -> T:
    """Poll `cond` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail()}")
        time.sleep(poll)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port nobody listens on now, chosen at random below the kernel's
    ephemeral range: a port from bind(0) comes from that range, where every outgoing
    connection on this shared machine also takes its local port, so one could take it
    between our choosing it and the server binding it ("Address already in use")."""
    lo = _ephemeral_range()[0]
    for _ in range(100):
        port = random.randrange(10_000, max(lo, 10_001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the low range is crowded: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    # DCMTK stalls ~45 ms per image without TCP_NODELAY (Nagle + delayed ACK).
    return {**os.environ, "TCP_NODELAY": "1"}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(cfg: dict[str, Any]) -> str:
    """A tiny TOML writer for test configs: tables of scalars and arrays of tables."""
    lines: list[str] = []
    for section, body in cfg.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
            continue
        lines.append(f"[{section}]")
        subtables = {}
        for k, v in body.items():
            if isinstance(v, dict) or isinstance(v, list) and v and isinstance(v[0], dict):
                subtables[k] = v
            else:
                lines.append(f"{k} = {toml_value(v)}")
        for k, v in subtables.items():
            if isinstance(v, list):
                for item in v:
                    lines.append(f"[[{section}.{k}]]")
                    lines += [f"{kk} = {toml_value(x)}" for kk, x in item.items()]
            else:
                lines.append(f"[{section}.{k}]")
                lines += [f"{kk} = {toml_value(x)}" for kk, x in v.items()]
    return "\n".join(lines) + "\n"


def base_config(root: Path, port: int, **receive: Any) -> dict[str, Any]:
    return {
        "appliance": {"name": "test-appliance", "state_dir": str(root / "state"),
                      "log_format": "json", "log_level": "info"},
        "receive": {"ae_title": "EDGE", "bind": "127.0.0.1", "port": port,
                    "callers": [{"ae_title": "MODALITY"}], **receive},
        "spool": {"key_file": str(root / "keys" / "spool.key"), "reserve_free_mb": 0},
        "encryption": {"appliance_key": str(root / "keys" / "appliance.key"),
                       "appliance_public_key": str(root / "keys" / "appliance.pub")},
        "destinations": [{"name": "outbox", "transport": "directory", "path": str(root / "outbox")}],
    }


def cli(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=timeout, check=check, cwd=REPO)


class Appliance:
    """The daemon as a subprocess with its own config, state and log file."""

    def __init__(self, root: Path, cfg: dict[str, Any]) -> None:
        self.root = root
        self.cfg = cfg
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "appliance.toml"
        self.config_path.write_text(to_toml(cfg))
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = int(cfg["receive"]["port"])
        self.state_dir = Path(cfg["appliance"]["state_dir"])
        self.env: dict[str, str] = {}  # extra environment for the daemon (NOTIFY_SOCKET, ...)
        self.launcher: list[str] = []  # a command that runs the daemon's command line
        self.netns: str | None = None  # the network namespace it runs in (tests/wan.py)
        cli("keys", "init", "--config", str(self.config_path), check=True)

    def start(self, timeout: float = 30) -> Appliance:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*exec_prefix(self.netns), *self.launcher, sys.executable, "-m", "appliance", "run", "--config",
             str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if (self.state_dir / "run" / "control.sock").exists() and self._port_open():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready:\n{self.log_text()}")

    def _port_open(self) -> bool:
        with entered(self.netns) if self.netns else contextlib.nullcontext(), socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def status(self) -> dict[str, Any]:
        import json
        r = cli("status", "--json", "--config", str(self.config_path), check=True)
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    def spooled(self) -> dict[str, bytes]:
        """Decrypt every spooled instance: {record id: Part-10 bytes}."""
        from appliance.core import crypto
        from appliance.queue.index import open_index
        from appliance.spool.store import Spool

        key = crypto.load_spool_key(Path(self.cfg["spool"]["key_file"]))
        idx = open_index(self.state_dir, readonly=True)
        try:
            spool = Spool.__new__(Spool)
            spool.dir, spool.key = self.state_dir / "spool", key
            rows = idx.query("SELECT id FROM instances")
            return {r["id"]: spool.read(r["id"]) for r in rows}
        finally:
            idx.close()


def storescu(port: int, files: Iterable[Path | str], aet: str = "MODALITY", called: str = "EDGE",
             extra: Iterable[str] = (), timeout: float = 300, host: str = "127.0.0.1",
             netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, one association for all files; never aborts on a failing file.
    With `netns`, it runs inside that network namespace (tests/wan.py).

    Proposes only the contexts the files need (-R), unless `extra` names a config file
    (-xf): DCMTK refuses -R together with --config-file, whose profile then decides.
    """
    extra = list(extra)
    required = [] if {"-xf", "--config-file"} & set(extra) else ["-R"]
    return subprocess.run(
        [*exec_prefix(netns), "storescu", "-aet", aet, "-aec", called, "--no-halt", *required, *extra,
         host, str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def echoscu(port: int, aet: str = "MODALITY", extra: Iterable[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", "EDGE", *extra, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())


def in_read_only_bind(folder: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """`cmd` in a new mount namespace where `folder` is bound read-only onto itself."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        raise AssertionError("needs root and unshare (util-linux) for a private read-only bind mount")
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           str(folder), *cmd], capture_output=True, text=True, timeout=120, cwd=REPO)
