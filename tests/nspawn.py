"""Boot the appliance's systemd unit in a Debian 12 container (systemd-nspawn) for tests.

Three layers, each built from the one before:
1. the root file system (`tests/nspawn-rootfs.sh`: mmdebstrap, the `appliance` user, a
   venv with the dependencies), cached in `.cache/nspawn/rootfs-<key>/` (git-ignored) where
   the key hashes the package list, the script and the pinned dependency versions (those
   installed in this checkout's venv), so that a run that changes none of them reuses it;
2. overlay layers over it (overlayfs, mounted in a private mount namespace, so the cache
   never changes and nothing stays mounted): one per test module with the appliance
   installed from a wheel of this checkout (`pip wheel` on the host, `pip install
   --no-index` in the chroot) and the units from `systemd/` (`install_layer`: the
   daemon's, and the remote update's root path unit); one per
   booted container with a config in /etc/appliance, keys made by `appliance keys init`
   run as the `appliance` user, and the test's unit drop-ins (`boot_script`);
3. the running container: `systemd-nspawn --register=no --keep-unit --private-network -b`
   on the merged tree, exec'd by the script that mounted it, so a child process of the
   test stopped by PID. Commands reach it through `nsenter` into
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
import shlex
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
# the root side of a remote update (update/handoff.py): the path unit is enabled, as on the image
INSTALL_UNITS = (REPO / "systemd" / "appliance-update-install.path",
                 REPO / "systemd" / "appliance-update-install.service")
# the image's units (image-build/overlay): a test may boot the one that makes the keys
IMAGE_UNITS = REPO / "image-build" / "overlay" / "usr" / "lib" / "systemd" / "system"
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
    a directory destination in its state dir, JPEG 2000 with verification (pinned:
    `pack.adaptive` off, so that every bundle shows a live codec worker's J2K)."""
    cfg: dict[str, dict[str, object] | list[dict[str, object]]] = {
        "appliance": {"name": "nspawn-test", "log_format": "json"},
        "receive": {"ae_title": "EDGE", "bind": "127.0.0.1", "port": 104,
                    "callers": [{"ae_title": "MODALITY"}]},
        "spool": {"reserve_free_mb": 256},
        "pack": {"codec": "jpeg2000", "verify": True, "study_quiet_s": 1.0,
                 "segment_max_age_s": 1.0, "adaptive": False},
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


def _overlay(lowers: tuple[Path, ...], upper: Path, merged: Path) -> str:
    """Shell lines that mount an overlay of `lowers` (top first) with `upper` on `merged`.

    Run inside `unshare --mount --propagation private`: the mount exists only in that
    private mount namespace and goes away with its last process, so nothing is left
    mounted on the host whatever happens to the test; the lower layers never change.
    """
    work = upper.parent / f"{upper.name}.work"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    return f"set -eu\nmount -t overlay overlay -o {shlex.quote(opts)} {shlex.quote(str(merged))}\n"


def _in_chroot(root: Path, *cmd: str, user: str | None = None) -> str:
    spec = f"--userspec={user}:{user} " if user else ""
    return (f"chroot {spec}{shlex.quote(str(root))} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/ "
            f"{shlex.join(cmd)}\n")


def _private_mounts(script: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def install_layer(cache: Path, layer: Path, wheel: Path) -> Path:
    """This checkout over the cached tree, as an overlay layer in `layer/upper`: the wheel
    installed into the venv, the unit from systemd/ enabled. Made once per test module;
    each container stacks its own layer on it. Returns the upper directory."""
    upper, merged = layer / "upper", layer / "merged"
    root = shlex.quote(str(merged))
    script = _overlay((cache,), upper, merged) + (
        f"cp {shlex.quote(str(wheel))} {root}/opt/\n"
        + _in_chroot(merged, str(VENV_BIN / "pip"), "install", "--quiet", "--no-index", "--no-deps",
                     "--force-reinstall", f"/opt/{wheel.name}")
        + f"rm {root}/opt/{shlex.quote(wheel.name)}\n"
        f"install -m 0644 {shlex.quote(str(UNIT))} {root}/etc/systemd/system/appliance.service\n"
        f"mkdir -p {root}/etc/systemd/system/multi-user.target.wants\n"
        f"ln -s /etc/systemd/system/appliance.service"
        f" {root}/etc/systemd/system/multi-user.target.wants/appliance.service\n"
        + "".join(f"install -m 0644 {shlex.quote(str(u))} {root}/etc/systemd/system/{u.name}\n"
                  for u in INSTALL_UNITS)
        + f"ln -s /etc/systemd/system/{INSTALL_UNITS[0].name}"
        f" {root}/etc/systemd/system/multi-user.target.wants/{INSTALL_UNITS[0].name}\n")
    subprocess.run(_private_mounts(script), check=True, timeout=600, capture_output=True, text=True)
    return upper


def boot_script(lowers: tuple[Path, ...], tmp: Path, config: dict[str, object],
                dropins: dict[str, str], dirs: tuple[str, ...],
                boot_config: dict[str, object] | None, keys_unit: bool = False) -> str:
    """The shell script that lays a container's own layer over `lowers` and execs nspawn.

    The layer: /etc/appliance/appliance.toml, the unit drop-ins, folders for the
    appliance user, and keys made by `appliance keys init` run as that user (or, with
    `keys_unit`, by the image's appliance-keys.service at boot, enabled as the image
    enables it); then `boot_config`, if given, replaces the config (so a test can boot a
    broken one)."""
    stage = tmp / "stage"
    (stage / "etc/appliance").mkdir(parents=True)
    (stage / "etc/appliance/appliance.toml").write_text(to_toml(config))
    if keys_unit:
        units = stage / "etc/systemd/system"
        (units / "multi-user.target.wants").mkdir(parents=True)
        shutil.copy(IMAGE_UNITS / "appliance-keys.service", units / "appliance-keys.service")
        (units / "appliance-keys.service").chmod(0o644)
        (units / "multi-user.target.wants/appliance-keys.service").symlink_to(
            "/etc/systemd/system/appliance-keys.service")
    if dropins:
        (stage / "etc/systemd/system/appliance.service.d").mkdir(parents=True)
        for name, text in dropins.items():
            (stage / "etc/systemd/system/appliance.service.d" / name).write_text(text)
    merged = tmp / "root"
    root = shlex.quote(str(merged))
    script = _overlay(lowers, tmp / "upper", merged)
    # --no-overwrite-dir: /etc and the other folders keep their owner and mode
    script += f"tar -C {shlex.quote(str(stage))} -cf - . | tar -C {root} --no-overwrite-dir -xf -\n"
    for d in ("/var/lib/appliance", "/var/lib/appliance/outbox", "/etc/appliance/keys", *dirs):
        script += _in_chroot(merged, "install", "-d", "-m", "0700", "-o", "appliance", "-g", "appliance", d)
    if not keys_unit:
        script += _in_chroot(merged, str(VENV_BIN / "appliance"), "keys", "init", "--config",
                             str(CONFIG), user="appliance")
    if boot_config is not None:
        (tmp / "boot.toml").write_text(to_toml(boot_config))
        script += f"install -m 0644 {shlex.quote(str(tmp / 'boot.toml'))} {root}{CONFIG}\n"
    return script + ("exec systemd-nspawn --register=no --keep-unit --private-network -b"
                     f" --console=read-only -D {root}\n")


# --- layer 3: the running container ------------------------------------------------------


class Container:
    """A booted container: its nspawn process (ours, stopped by PID) and its PID 1."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.command = command
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> Container:
        with self.log.open("ab") as out:
            # the command ends by exec'ing systemd-nspawn: this PID is nspawn's
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
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
def booted(lowers: tuple[Path, ...], tmp: Path, config: dict[str, object],
           dropins: dict[str, str] | None = None, dirs: tuple[str, ...] = (),
           boot_config: dict[str, object] | None = None,
           keys_unit: bool = False) -> Iterator[Container]:
    """A container booted from its own overlay layer over `lowers` (see `boot_script`);
    the layer is removed afterwards, its nspawn.log stays in `tmp`."""
    script = boot_script(lowers, tmp, config, dropins or {}, dirs, boot_config, keys_unit)
    c = Container(_private_mounts(script), tmp / "nspawn.log")
    try:
        yield c.boot()
    finally:
        c.stop()
        for d in ("upper", "upper.work", "root", "stage"):
            shutil.rmtree(tmp / d, ignore_errors=True)
