"""Boot the appliance's systemd unit in a Debian 12 container (systemd-nspawn) for tests.

Three layers, each built from the one before:
1. the root file system (`tests/nspawn-rootfs.sh`: mmdebstrap, the `appliance` user, a
   venv with the dependencies), cached in `.cache/nspawn/rootfs-<key>/` (git-ignored) where
   the key hashes the package list, the script and the pinned dependency versions (those
   installed in this checkout's venv), so that a run that changes none of them reuses it;
2. a copy of it per test module, in a temp dir, so that a run never changes the cache:
   the appliance installed from a wheel of this checkout (`pip wheel` on the host,
   `pip install --no-index` in the copy) and the unit from `systemd/` (`install_tree`);
   and a copy of that per booted container with a config in /etc/appliance, keys made
   by `appliance keys init` run as the `appliance` user, and the test's unit drop-ins
   (`configure_tree`);
3. the running container: `systemd-nspawn --register=no --keep-unit --private-network -b`,
   a child process of the test stopped by PID. Commands reach it through `nsenter` into
   the namespaces of its PID 1 (the "leader"); `machinectl` needs machined, which
   --register=no leaves out. Host programs (DCMTK's storescu) run in its network
   namespace only (`run_in_netns`), where the daemon listens on 127.0.0.1.

Needs root, `mmdebstrap`, `systemd-nspawn` (Debian package systemd-container), `nsenter`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement

from tests.peers import REPO, to_toml, wait_for

PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
BUILD_SCRIPT = REPO / "tests" / "nspawn-rootfs.sh"
CACHE = REPO / ".cache" / "nspawn"
UNIT = REPO / "systemd" / "appliance.service"
CONFIG = Path("/etc/appliance/appliance.toml")
VENV_BIN = Path("/opt/appliance/venv/bin")
TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


# --- layer 1: the cached root file system --------------------------------------------


def _closure(name: str, seen: dict[str, str]) -> None:
    """Every distribution `name` needs at run time, with the version installed here."""
    dist = md.distribution(name)
    key = dist.metadata["Name"].lower().replace("_", "-")
    if key in seen:
        return
    seen[key] = dist.version
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _closure(req.name, seen)


def dependency_pins() -> str:
    """`name==version` lines for the appliance's runtime dependencies, as installed in
    the venv the tests run from (so the container runs what the host suite tests)."""
    seen: dict[str, str] = {}
    _closure("appliance", seen)
    seen.pop("appliance")
    return "".join(f"{n}=={v}\n" for n, v in sorted(seen.items()))


def rootfs_key(pins: str) -> str:
    h = hashlib.sha256()
    for part in (",".join(PACKAGES).encode(), BUILD_SCRIPT.read_bytes(), pins.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build_wheels(out: Path, *args: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--wheel-dir", str(out), *args, str(REPO)],
                   check=True, timeout=900, capture_output=True, text=True)


def cached_rootfs(log: Path) -> Path:
    """The cached root file system, built (under a lock) if it is not there yet; older
    builds are removed once a new one is complete."""
    pins = dependency_pins()
    key = rootfs_key(pins)
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"rootfs-{key}"
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(pins)
            build_wheels(Path(tmp) / "wheelhouse", "-c", str(constraints))
            partial = Path(tmp) / "rootfs"
            with log.open("ab") as out:
                subprocess.run(["bash", str(BUILD_SCRIPT), str(partial), str(Path(tmp) / "wheelhouse"),
                                ",".join(PACKAGES)], check=True, timeout=1200, stdout=out,
                               stderr=subprocess.STDOUT)
            partial.rename(target)
        for old in CACHE.glob("rootfs-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


# --- layer 2: one container's tree ------------------------------------------------------


def site_config(**override: object) -> dict[str, object]:
    """The config the container's appliance runs with: port 104 (the unit's capability),
    a directory destination in its state dir, JPEG 2000 with verification."""
    cfg: dict[str, dict[str, object] | list[dict[str, object]]] = {
        "appliance": {"name": "nspawn-test", "log_format": "json"},
        "receive": {"ae_title": "EDGE", "bind": "127.0.0.1", "port": 104,
                    "callers": [{"ae_title": "MODALITY"}]},
        "spool": {"reserve_free_mb": 256},
        "pack": {"codec": "jpeg2000", "verify": True, "study_quiet_s": 1.0,
                 "segment_max_age_s": 1.0},
        "destinations": [{"name": "outbox", "transport": "directory",
                          "path": "/var/lib/appliance/outbox"}],
    }
    for key, value in override.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value  # type: ignore[index]
        else:
            cfg[section] = value  # type: ignore[assignment]
    return cfg


def _chroot(root: Path, *cmd: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    spec = ["--userspec", f"{user}:{user}"] if user else []
    return subprocess.run(["chroot", *spec, str(root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin",
                           "HOME=/", *cmd], check=True, timeout=300, capture_output=True, text=True)


def install_tree(cache: Path, root: Path, wheel: Path) -> None:
    """Copy the cached tree to `root` and install this checkout into it: the wheel, and
    the unit from systemd/ enabled (done once per test module; each container copies it)."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(cache), str(root)], check=True, timeout=600)
    shutil.copy(wheel, root / "opt" / wheel.name)
    _chroot(root, str(VENV_BIN / "pip"), "install", "--quiet", "--no-index", "--no-deps",
            "--force-reinstall", f"/opt/{wheel.name}")
    (root / "opt" / wheel.name).unlink()
    units = root / "etc/systemd/system"
    shutil.copy(UNIT, units / "appliance.service")
    (units / "multi-user.target.wants").mkdir(exist_ok=True)
    (units / "multi-user.target.wants/appliance.service").symlink_to(
        "/etc/systemd/system/appliance.service")


def configure_tree(installed: Path, root: Path, config: dict[str, object],
                   dropins: dict[str, str], dirs: tuple[str, ...] = ()) -> None:
    """Copy the installed tree to `root`, with its config, keys and unit drop-ins.

    `dropins` are written to /etc/systemd/system/appliance.service.d/<name>; `dirs` are
    folders created for the appliance user (a destination outside its state dir)."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(installed), str(root)], check=True, timeout=600)
    if dropins:
        d = root / "etc/systemd/system/appliance.service.d"
        d.mkdir()
        for name, text in dropins.items():
            (d / name).write_text(text)
    etc = root / "etc/appliance"
    etc.mkdir()
    (etc / "appliance.toml").write_text(to_toml(config))
    for d in ("/var/lib/appliance", "/var/lib/appliance/outbox", "/etc/appliance/keys", *dirs):
        _chroot(root, "install", "-d", "-m", "0700", "-o", "appliance", "-g", "appliance", d)
    _chroot(root, str(VENV_BIN / "appliance"), "keys", "init", "--config", str(CONFIG),
            user="appliance")


# --- layer 3: the running container ------------------------------------------------------


class Container:
    """A booted container: its nspawn process (ours, stopped by PID) and its PID 1."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> Container:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network", "-b",
                 "--console=read-only", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.leader = wait_for(self._find_leader, timeout, "the container's PID 1",
                               detail=self.log_tail)
        wait_for(self._booted, timeout, "systemd in the container to finish booting",
                 poll=0.2, detail=self.log_tail)
        return self

    def _find_leader(self) -> int:
        """nspawn's child in another PID namespace: the container's systemd."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self.proc.returncode}\n{self.log_tail()}")
        mine = os.readlink("/proc/self/ns/pid")
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for pid in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/ns/pid") != mine:
                            return int(pid)
        return 0

    def _booted(self) -> bool:
        r = self.run("systemctl", "is-system-running")
        return r.stdout.strip() in ("running", "degraded")

    def run(self, *cmd: str, user: str | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces), as root or `user`."""
        prefix = ["runuser", "-u", user, "--"] if user else []
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *prefix, *cmd],
                              capture_output=True, text=True, timeout=timeout, check=check)

    def run_in_netns(self, *cmd: str, env: dict[str, str] | None = None,
                     timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A host program in the container's network namespace only."""
        return subprocess.run(["nsenter", "-t", str(self.leader), "-n", *cmd], capture_output=True,
                              text=True, timeout=timeout, env=env)

    def appliance(self, *args: str, user: str | None = "appliance") -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "appliance"), *args, user=user)

    def show(self, *props: str, unit: str = "appliance.service") -> dict[str, str]:
        r = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=True)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str = "appliance.service") -> str:
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit).stdout

    def path(self, inside: str) -> Path:
        """A path of the running container as the host sees it (tmpfs mounts included)."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def log_tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-40:])

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to nspawn powers the container off; its PID 1 is killed if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)  # ends the whole PID namespace
            self.proc.kill()
            self.proc.wait(30)


@contextlib.contextmanager
def booted(installed: Path, tmp: Path, config: dict[str, object],
           dropins: dict[str, str] | None = None, dirs: tuple[str, ...] = (),
           boot_config: dict[str, object] | None = None) -> Iterator[Container]:
    """A container booted from a fresh copy; `boot_config`, if given, replaces the config
    after the keys were made with `config` (so a test can boot with a broken one). The
    copy is removed afterwards; its nspawn.log stays in `tmp`."""
    root = tmp / "root"
    configure_tree(installed, root, config, dropins or {}, dirs)
    if boot_config is not None:
        (root / str(CONFIG).lstrip("/")).write_text(to_toml(boot_config))
    c = Container(root, tmp / "nspawn.log")
    try:
        yield c.boot()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def unit_status_lines(text: str) -> list[str]:
    """The appliance's JSON log lines from a journal dump (for failure messages)."""
    return [ln for ln in text.splitlines() if re.search(r"appliance\[\d+\]", ln)]
