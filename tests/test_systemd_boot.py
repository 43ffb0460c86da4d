"""The shipped unit, booted under real systemd: Debian 12 in systemd-nspawn (tests/nspawn.py).

What it shows, each against `systemd/appliance.service` as shipped plus, where a test
says so, a drop-in: the daemon lives under the unit's system call filter (numpy's mbind,
the codec workers' priority calls) and feeds the watchdog; a C-STORE into the container
ends as a JPEG 2000 bundle; core dumps are off; a bad config fails the unit once and
leaves it failed (and why the check is not an ExecStartPre=); a state_dir or destination
outside /var/lib/appliance works once the drop-in `appliance config systemd-dropin`
writes is in place, and is refused or held with the fix named until then; a frozen
daemon, and a frozen pack stage (with the stage supervisor), are restarted by the
watchdog and nothing acknowledged is lost; a desired config pushed by `appliance fleet
config push` through a real Mosquitto is written into remote.d and applied under the
unit's sandbox, and one that breaks the start is rolled back; the keys the image's
appliance-keys.service makes at the first boot are recorded in the audit trail.

Run alone with `make test-boot`. Needs root, mmdebstrap, systemd-nspawn and DCMTK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests import nspawn
from tests.mosquitto import MOSQUITTO, Broker, fleet_ca, sign
from tests.nspawn import Container
from tests.peers import cli, dcmtk_env, to_toml, wait_for

pytestmark = [pytest.mark.systemd_boot, pytest.mark.root]

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
WATCHDOG_S = 10  # shorter than the unit's 30 s, so that a test sees more than one period
SHORT_WATCHDOG = f"[Service]\nWatchdogSec={WATCHDOG_S}\n"
FAILPOINTS = "/run/appliance-failpoints"
CT = "series/CT_Philips_Ingenuity_phantom_28sl"
SCHED_IDLE = 5


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("booting a container needs root (CI runs as root)")
    if missing := nspawn.missing_tools():
        pytest.fail(f"not found: {', '.join(missing)} (make peers installs them)")
    if shutil.which("storescu") is None:
        pytest.fail("storescu not found (Debian package dcmtk)")
    return nspawn.cached_rootfs(tmp_path_factory.mktemp("rootfs") / "build.log")


@pytest.fixture(scope="module")
def installed(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ...]]:
    """The layers each container boots over: this checkout's wheel and unit, the cached tree."""
    tmp = tmp_path_factory.mktemp("installed")
    nspawn.build_wheels(tmp / "wheel", "--no-deps")
    layer = nspawn.install_layer(rootfs, tmp / "layer", next((tmp / "wheel").glob("appliance-*.whl")))
    yield (layer, rootfs)
    shutil.rmtree(tmp / "layer", ignore_errors=True)


def wait_active(c: Container, timeout: float = 120) -> None:
    wait_for(lambda: c.show("ActiveState")["ActiveState"] == "active", timeout,
             "the appliance unit to be active", poll=0.5, detail=c.journal)


@pytest.fixture(scope="module")
def running(installed: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One container for the tests that only look and send."""
    tmp = tmp_path_factory.mktemp("running")
    with nspawn.booted(installed, tmp, nspawn.site_config(), {"test.conf": SHORT_WATCHDOG}) as c:
        wait_active(c)
        yield c


def send(c: Container, files: list[Path]) -> None:
    """DCMTK storescu from the host, in the container's network namespace, to port 104;
    every instance must be acknowledged (a Success response for each)."""
    r = c.run_in_netns("storescu", "-v", "-aet", "MODALITY", "-aec", "EDGE", "-R", "127.0.0.1", "104",
                       *map(str, files), env=dcmtk_env())
    acknowledged = (r.stdout + r.stderr).count("Received Store Response (Success)")
    assert (r.returncode, acknowledged) == (0, len(files)), r.stdout + r.stderr + c.journal()


def ct_files(samples: Path) -> list[Path]:
    return sorted((samples / CT).iterdir())


def extract_all(c: Container, outbox: str, tmp: Path) -> list[pydicom.Dataset]:
    """Every instance of every bundle in `outbox`, opened with the container's appliance
    key (copied out: the CLI refuses a key file another user owns)."""
    key = tmp / "appliance.key"
    if not key.exists():
        shutil.copy(c.path("/etc/appliance/keys/appliance.key"), key)
        key.chmod(0o600)
    out: list[pydicom.Dataset] = []
    for i, bundle in enumerate(sorted(c.path(outbox).glob("*.bundle"))):
        folder = tmp / f"extract-{i}"
        r = cli("bundle", "extract", str(bundle), "--key", str(key), "--out", str(folder))
        assert r.returncode == 0, r.stderr
        out += [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    return out


def instances_in(c: Container, outbox: str) -> int:
    """How many instances the bundles in `outbox` hold, from their manifests."""
    total = 0
    for bundle in c.path(outbox).glob("*.bundle"):
        r = c.appliance("bundle", "inspect", f"{outbox}/{bundle.name}",
                        "--key", "/etc/appliance/keys/appliance.key", "--json")
        assert r.returncode == 0, r.stderr
        total += len(json.loads(r.stdout)["instances"])
    return total


def proc_stat(c: Container, pid: str) -> list[str]:
    """/proc/PID/stat fields from field 3 (state) on: the name may hold spaces."""
    text = c.run("cat", f"/proc/{pid}/stat", check=True).stdout
    return text[text.rindex(")") + 2:].split()


def unit_pids(c: Container) -> list[str]:
    """The daemon and every process under it (forkserver, codec workers, resource tracker)."""
    pids = [c.show("MainPID")["MainPID"]]
    for pid in pids:  # grows while it is walked: breadth first
        r = c.run("sh", "-c", f"cat /proc/{pid}/task/*/children")
        pids += r.stdout.split()
    return pids


# --- the unit as shipped --------------------------------------------------------------


def test_unit_stays_active_feeding_the_watchdog_past_more_than_one_period(running: Container) -> None:
    since = time.monotonic()
    wait_for(lambda: time.monotonic() - since > 1.5 * WATCHDOG_S, 3 * WATCHDOG_S,
             "one and a half watchdog periods to pass", poll=1)
    p = running.show("ActiveState", "SubState", "NRestarts", "WatchdogUSec", "StatusText",
                     "WatchdogTimestampMonotonic")
    assert (p["ActiveState"], p["SubState"], p["NRestarts"]) == ("active", "running", "0"), running.journal()
    assert p["WatchdogUSec"] == f"{WATCHDOG_S}s"
    assert p["StatusText"].startswith("received "), p["StatusText"]
    last_ping_age_s = time.monotonic() - int(p["WatchdogTimestampMonotonic"]) / 1e6
    assert 0 <= last_ping_age_s < WATCHDOG_S


def test_a_c_store_through_the_container_ends_in_a_jpeg2000_bundle(
        running: Container, samples: Path, tmp_path: Path) -> None:
    files = ct_files(samples)
    send(running, files)
    outbox = "/var/lib/appliance/outbox"
    wait_for(lambda: instances_in(running, outbox) >= len(files), 180,
             "every instance in a bundle in the outbox", poll=1, detail=running.journal)
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    got = [ds for ds in extract_all(running, outbox, tmp_path) if ds.SOPInstanceUID in originals]
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(originals)
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == J2K_LOSSLESS  # compressed by a live worker
        assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID].pixel_array)


def test_codec_workers_run_at_idle_priority_under_the_system_call_filter(
        running: Container, samples: Path) -> None:
    send(running, ct_files(samples)[:1])  # the pool starts its workers on the first job
    main_pid = running.show("MainPID")["MainPID"]

    def workers() -> list[list[str]]:
        stats = {pid: proc_stat(running, pid) for pid in unit_pids(running)}
        forkservers = {pid for pid, st in stats.items() if st[1] == main_pid}  # children of the daemon
        return [st for st in stats.values() if st[1] in forkservers]  # their children: the workers
    found = wait_for(workers, 60, "codec worker processes", poll=0.5, detail=running.journal)
    for st in found:
        assert (st[16], st[38]) == ("10", str(SCHED_IDLE))  # nice 10, SCHED_IDLE: both calls allowed
    status = running.run("cat", f"/proc/{main_pid}/status", check=True).stdout
    assert "Seccomp:\t2" in status  # the filter is in force (mode 2 = filter)


def test_the_daemon_and_its_workers_cannot_dump_core(running: Container) -> None:
    main_pid = running.show("MainPID")["MainPID"]
    for pid in unit_pids(running):
        limits = running.run("cat", f"/proc/{pid}/limits", check=True).stdout
        core = next(ln for ln in limits.splitlines() if ln.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
    # PR_SET_DUMPABLE=0 makes the kernel hand the files in /proc/PID to root, though the
    # daemon runs as the appliance user.
    owner = running.run("stat", "-c", "%U", f"/proc/{main_pid}/status", check=True).stdout.strip()
    assert (owner, _user_of(running, main_pid)) == ("root", "appliance")


def _user_of(c: Container, pid: str) -> str:
    uid = next(ln.split()[1] for ln in c.run("cat", f"/proc/{pid}/status", check=True).stdout.splitlines()
               if ln.startswith("Uid:"))
    return c.run("id", "-nu", uid, check=True).stdout.strip()


# --- failures ------------------------------------------------------------------------------


def test_a_bad_config_fails_the_unit_once_and_it_stays_failed(
        installed: tuple[Path, ...], tmp_path: Path) -> None:
    bad = nspawn.site_config(receive__port=70000)
    with nspawn.booted(installed, tmp_path, nspawn.site_config(), boot_config=bad) as c:
        wait_for(lambda: c.show("ActiveState")["ActiveState"] == "failed", 120, "the unit to fail",
                 poll=0.5, detail=c.journal)
        failed_at = time.monotonic()
        # RestartSec=5: more than two restart intervals without a new start
        wait_for(lambda: time.monotonic() - failed_at > 12, 20, "12 s to pass", poll=1)
        p = c.show("ActiveState", "NRestarts", "Result", "ExecMainStatus")
        assert p == {"ActiveState": "failed", "NRestarts": "0", "Result": "exit-code",
                     "ExecMainStatus": "78"}, c.journal()
        assert "receive.port: must be 1..65535" in c.journal()


def restarted_by_the_watchdog(c: Container) -> None:
    wait_for(lambda: int(c.show("NRestarts")["NRestarts"]) >= 1, 300,
             "systemd to restart the daemon through the watchdog", poll=1, detail=c.journal)
    assert "Watchdog timeout" in c.journal()


def all_in_bundles(c: Container, files: list[Path], tmp: Path) -> None:
    """Every file sent (acknowledged) is in a bundle in the outbox, once."""
    outbox = "/var/lib/appliance/outbox"
    wait_for(lambda: instances_in(c, outbox) >= len(files), 180,
             "every acknowledged instance in a bundle after the restart", poll=1, detail=c.journal)
    sent = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
    assert sorted(ds.SOPInstanceUID for ds in extract_all(c, outbox, tmp)) == sent


def test_a_frozen_daemon_is_restarted_by_the_watchdog_and_nothing_acknowledged_is_lost(
        installed: tuple[Path, ...], samples: Path, tmp_path: Path) -> None:
    # study_quiet_s=15: the study is still unsealed when the daemon freezes; TimeoutAbortSec:
    # a stopped process cannot act on the watchdog's SIGABRT, so systemd kills it after that
    cfg = nspawn.site_config(pack={"codec": "jpeg2000", "verify": True, "study_quiet_s": 15.0})
    dropin = SHORT_WATCHDOG + "TimeoutAbortSec=5\n"
    with nspawn.booted(installed, tmp_path, cfg, {"test.conf": dropin}) as c:
        wait_active(c)
        files = ct_files(samples)[:4]
        send(c, files)
        c.run("sh", "-c", f"kill -STOP {c.show('MainPID')['MainPID']}", check=True)  # all threads
        assert instances_in(c, "/var/lib/appliance/outbox") == 0  # acknowledged, not yet packed
        restarted_by_the_watchdog(c)
        wait_active(c)
        all_in_bundles(c, files, tmp_path)


def test_a_frozen_pack_stage_is_restarted_by_the_watchdog_and_nothing_acknowledged_is_lost(
        installed: tuple[Path, ...], samples: Path, tmp_path: Path) -> None:
    dropin = SHORT_WATCHDOG + f"Environment=APPLIANCE_FAILPOINTS={FAILPOINTS}\n"
    cfg = nspawn.site_config(health={"stall_s": 5.0})  # a pack job silent for 5 s is stuck
    with nspawn.booted(installed, tmp_path, cfg, {"test.conf": dropin}) as c:
        wait_active(c)
        c.run("mkdir", "-p", FAILPOINTS, check=True)
        c.run("touch", f"{FAILPOINTS}/pack.hang", check=True)  # pack blocks while it exists
        files = ct_files(samples)
        send(c, files)
        restarted_by_the_watchdog(c)
        c.run("rm", f"{FAILPOINTS}/pack.hang", check=True)
        wait_active(c)
        all_in_bundles(c, files, tmp_path)


PRE_FAILS = """[Service]
Type=notify
ExecStartPre=/bin/sh -c 'exit 78'
ExecStart=/bin/sleep 600
Restart=on-failure
RestartSec=1
RestartPreventExitStatus=78
"""


def test_systemd_restarts_a_failing_exec_start_pre_despite_restart_prevent_exit_status(
        running: Container) -> None:
    """Why the unit has no ExecStartPre= config check: systemd 252 applies
    RestartPreventExitStatus= to the main process only (docs/systemd.md)."""
    running.path("/etc/systemd/system/pre-check.service").write_text(PRE_FAILS)
    running.run("systemctl", "daemon-reload", check=True)
    running.run("systemctl", "start", "pre-check.service")
    wait_for(lambda: int(running.show("NRestarts", unit="pre-check.service")["NRestarts"]) >= 2, 60,
             "systemd to restart the unit after its ExecStartPre= exited 78", poll=0.5)
    running.run("systemctl", "stop", "pre-check.service")
    assert running.show("ExecMainStatus", unit="pre-check.service")["ExecMainStatus"] == "0"


# --- paths outside /var/lib/appliance --------------------------------------------------------


def queue_rows(c: Container) -> list[dict[str, object]]:
    r = c.appliance("queue", "list", "--json", "--config", str(nspawn.CONFIG))
    rows: list[dict[str, object]] = json.loads(r.stdout) if r.returncode == 0 else []
    return rows


def test_a_destination_outside_the_state_dir_is_held_naming_the_dropin_until_it_is_written(
        installed: tuple[Path, ...], samples: Path, tmp_path: Path) -> None:
    outbox = "/srv/outbox"
    cfg = nspawn.site_config(destinations=[{"name": "share", "transport": "directory", "path": outbox}])
    with nspawn.booted(installed, tmp_path, cfg, dirs=(outbox,)) as c:
        wait_active(c)
        check = c.appliance("config", "check", "--config", str(nspawn.CONFIG))
        assert check.returncode == 78
        assert f"destinations[0].path: {outbox} is read-only" in check.stderr
        assert "/etc/systemd/system/appliance.service.d/paths.conf" in check.stderr
        send(c, ct_files(samples)[:2])
        held = wait_for(lambda: [r for r in queue_rows(c) if r["state"] == "held"], 120,
                        "the bundle to be held", poll=1, detail=c.journal)
        assert "systemd-dropin" in str(held[0]["reason"]) and "Read-only" in str(held[0]["reason"])

        wrote = c.appliance("config", "systemd-dropin", "--write", "--config", str(nspawn.CONFIG),
                            user=None)
        assert wrote.returncode == 0, wrote.stderr
        assert c.appliance("config", "check", "--config", str(nspawn.CONFIG)).returncode == 0
        c.run("systemctl", "daemon-reload", check=True)
        c.run("systemctl", "restart", "appliance.service", check=True)
        wait_active(c)
        released = c.appliance("queue", "release", "--all", "--config", str(nspawn.CONFIG))
        assert released.returncode == 0, released.stderr
        wait_for(lambda: instances_in(c, outbox) == 2, 120, "the released bundle in the share",
                 poll=1, detail=c.journal)


def test_a_moved_state_dir_fails_the_unit_once_naming_the_dropin_then_runs_with_it(
        installed: tuple[Path, ...], samples: Path, tmp_path: Path) -> None:
    state = "/srv/appliance"
    cfg = nspawn.site_config(
        appliance={"name": "nspawn-test", "log_format": "json", "state_dir": state},
        destinations=[{"name": "outbox", "transport": "directory", "path": f"{state}/outbox"}])
    with nspawn.booted(installed, tmp_path, cfg, dirs=(state, f"{state}/outbox")) as c:
        wait_for(lambda: c.show("ActiveState")["ActiveState"] == "failed", 120, "the unit to fail",
                 poll=0.5, detail=c.journal)
        p = c.show("NRestarts", "ExecMainStatus")
        assert p == {"NRestarts": "0", "ExecMainStatus": "78"}, c.journal()
        assert f"appliance.state_dir: {state} is on a read-only file system" in c.journal()

        wrote = c.appliance("config", "systemd-dropin", "--write", "--config", str(nspawn.CONFIG),
                            user=None)
        assert wrote.returncode == 0, wrote.stderr
        c.run("systemctl", "daemon-reload", check=True)
        c.run("systemctl", "start", "appliance.service", check=True)
        wait_active(c)
        send(c, ct_files(samples)[:1])
        wait_for(lambda: instances_in(c, f"{state}/outbox") == 1, 120, "a bundle in the moved state dir",
                 poll=1, detail=c.journal)


# --- the image's first boot (image-build/overlay: appliance-keys.service) ---------------------

IMAGE_DROPIN = nspawn.IMAGE_UNITS / "appliance.service.d" / "image.conf"


def test_keys_the_image_unit_makes_at_first_boot_are_recorded_in_the_audit_trail(
        installed: tuple[Path, ...], tmp_path: Path) -> None:
    """No key before the boot: the image's appliance-keys.service makes them, under its
    sandbox, and its "keys created" record must reach the trail in STATE/audit (the
    daemon's unit, with the image's drop-in, then starts with those keys)."""
    cfg = nspawn.site_config(
        spool={"reserve_free_mb": 256, "key_file": "/data/keys/spool.key"},
        encryption={"appliance_key": "/data/keys/appliance.key",
                    "appliance_public_key": "/data/keys/appliance.pub"})
    with nspawn.booted(installed, tmp_path, cfg, {"image.conf": IMAGE_DROPIN.read_text()},
                       dirs=("/data/keys", "/data/config", "/data/config/remote.d"),
                       keys_unit=True) as c:
        wait_active(c)
        keys = c.show("Result", "ExecMainStatus", unit="appliance-keys.service")
        assert keys == {"Result": "success", "ExecMainStatus": "0"}, c.journal("appliance-keys.service")
        assert "audit trail not written" not in c.journal("appliance-keys.service")
        shown = c.appliance("audit", "show", "--config", str(nspawn.CONFIG))
        assert shown.returncode == 0, shown.stderr
        assert "keys created: spool key: /data/keys/spool.key created" in shown.stdout, (
            shown.stdout + c.journal("appliance-keys.service"))


# --- desired config under the unit (ops/desired.py; docs/operations.md "Desired config") --

BOX = "nspawn-test"
REMOTE = "/etc/appliance/remote.d"


class NetnsBroker(Broker):
    """Mosquitto (the host's binary, the shipped config) in the container's network
    namespace only (the container has a private network), so that the daemon in it
    reaches the broker on 127.0.0.1 as a box reaches its operations center."""

    def __init__(self, root: Path, ca: Path, c: Container) -> None:
        super().__init__(root, ca)
        self.c = c

    def start(self) -> NetnsBroker:
        with self.log.open("ab") as log:  # nsenter execs mosquitto: this PID is the broker's
            self.proc = subprocess.Popen(["nsenter", "-t", str(self.c.leader), "-n", MOSQUITTO, "-c",
                                          str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self._in_netns, 30, "mosquitto listening in the container", detail=self.log_text)
        return self

    def _in_netns(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited {self.proc.returncode}:\n{self.log_text()}")
        probe = f"import socket; socket.create_connection(('127.0.0.1', {self.port}), 2).close()"
        return self.c.run_in_netns(sys.executable, "-c", probe, timeout=30).returncode == 0


def enroll(c: Container, root: Path, ca: Path, port: int, **extra: object) -> None:
    """The box joins the fleet as on site: [operations] in its config, `keys init` (as the
    service user) makes its MQTT key and CSR, the fleet CA signs it; then a restart."""
    cfg = nspawn.site_config(**extra, operations={
        "host": "127.0.0.1", "port": port, "ca": "/etc/appliance/ops/ca.pem",
        "cert": "/etc/appliance/keys/mqtt.pem", "key": "/etc/appliance/keys/mqtt.key",
        "heartbeat_s": 2, "keepalive_s": 5, "command_keys": ["/etc/appliance/ops/command.pub"],
        "metrics_bind": "", "config_deadline_s": 90})
    (c.path("/etc/appliance/ops")).mkdir(mode=0o755)
    shutil.copy(ca / "ca.pem", c.path("/etc/appliance/ops/ca.pem"))
    shutil.copy(root / "center" / "command.pub", c.path("/etc/appliance/ops/command.pub"))
    c.path(str(nspawn.CONFIG)).write_text(to_toml(cfg))
    r = c.appliance("keys", "init", "--config", str(nspawn.CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copy(c.path("/etc/appliance/keys/mqtt.csr"), root / "mqtt.csr")
    shutil.copy(sign(ca, root / "mqtt.csr"), c.path("/etc/appliance/keys/mqtt.pem"))
    c.run("chmod", "0644", "/etc/appliance/keys/mqtt.pem", "/etc/appliance/ops/ca.pem",
          "/etc/appliance/ops/command.pub", check=True)
    c.run("systemctl", "restart", "appliance.service", check=True)
    wait_active(c)


def push(c: Container, root: Path, ca: Path, port: int, version: int,
         text: str) -> tuple[int, dict[str, Any]]:
    """`appliance fleet config push` from the host, in the container's network namespace."""
    f = root / f"v{version}.toml"
    f.write_text(text)
    r = c.run_in_netns(sys.executable, "-m", "appliance", "fleet", "config", "push", str(f),
                       "--version", str(version), "--box", BOX, "--key", str(root / "center" / "command.key"),
                       "--ca", str(ca), "--port", str(port), "--timeout", "240", timeout=600)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}


def test_a_pushed_config_is_applied_in_remote_d_under_the_unit_and_a_bad_one_rolled_back(
        installed: tuple[Path, ...], tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    # the box's clock counts as synchronised (a container's is the host's; timedated may not say so)
    clock = "[Service]\nEnvironment=APPLIANCE_CLOCK_SYNCED=1\n"
    with nspawn.booted(installed, tmp_path / "box", nspawn.site_config(), {"test.conf": clock},
                       dirs=(REMOTE,)) as c:
        wait_active(c)
        broker = NetnsBroker(root / "broker", ca, c).start()
        try:
            enroll(c, root, ca, broker.port)
            pid = c.show("MainPID")["MainPID"]
            rc, out = push(c, root, ca, broker.port, 1, '[receive]\nae_title = "REMOTE"\n')
            assert (rc, out.get("boxes")) == (0, {BOX: "applied"}), str(out) + c.journal()
            # written by the daemon under ProtectSystem=strict into its one writable config folder;
            # applied by a re-exec: the same main process, no restart counted by systemd
            assert c.path(f"{REMOTE}/50-remote.toml").read_text() == '[receive]\nae_title = "REMOTE"\n'
            assert c.show("MainPID", "NRestarts") == {"MainPID": pid, "NRestarts": "0"}
            shown = c.appliance("config", "check", "--config", str(nspawn.CONFIG))
            assert f"# set by {REMOTE}/50-remote.toml (operations center: remote config): receive.ae_title" \
                in shown.stdout, shown.stdout + shown.stderr
            # version 2 takes the broker's port for DICOM: the start fails, the unit rolls it back
            rc, out = push(c, root, ca, broker.port, 2, f"[receive]\nport = {broker.port}\n")
            assert (rc, out.get("boxes")) == (1, {BOX: "rolled back"}), str(out) + c.journal()
            assert c.path(f"{REMOTE}/50-remote.toml").read_text() == '[receive]\nae_title = "REMOTE"\n'
            wait_active(c)
            st = json.loads(c.appliance("status", "--json", "--config", str(nspawn.CONFIG)).stdout)
            assert (st["ae_title"], st["config"]["version"], st["config"]["rolled_back"]) == ("REMOTE", 1, 2)
            assert '"event": "config.rolled_back"' in c.journal()
        finally:
            broker.stop()


# --- a remote update under the units (update/handoff.py; docs/updates.md "Remote updates") --

SERVE = """
import sys
from pathlib import Path
from tests.bundle_server import BundleServer
srv = BundleServer(Path(sys.argv[1]), Path(sys.argv[2]).read_bytes()).__enter__()
print(srv.port, flush=True)
sys.stdin.read()
"""


def stand_in_rauc(c: Container, tmp: Path) -> Path:
    """tests/test_update_remote.py's stand-in `rauc`, as /usr/local/bin/rauc in the container
    (first on the root unit's PATH; only QEMU runs the real one); returns its folder there."""
    from tests.test_update_remote import fake_rauc

    made = fake_rauc(tmp / "rauc")
    inside = c.path("/opt/fake-rauc")
    inside.mkdir()
    for f in made.iterdir():
        (inside / f.name).write_text(f.read_text().replace(str(made), "/opt/fake-rauc"))
    c.run("chmod", "0755", "/opt/fake-rauc/rauc", check=True)
    c.run("ln", "-s", "/opt/fake-rauc/rauc", "/usr/local/bin/rauc", check=True)
    return inside


def test_an_update_command_is_fetched_by_the_daemon_user_and_installed_by_the_root_path_unit(
        installed: tuple[Path, ...], tmp_path: Path) -> None:
    from tests.test_update_remote import DATA, SHA

    root = tmp_path / "fleet"
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    (tmp_path / "bundle").write_bytes(DATA)
    clock = "[Service]\nEnvironment=APPLIANCE_CLOCK_SYNCED=1\n"
    with nspawn.booted(installed, tmp_path / "box", nspawn.site_config(), {"test.conf": clock}) as c:
        wait_active(c)
        rauc = stand_in_rauc(c, tmp_path)
        # the HTTPS server on the container's loopback, as the box's update source
        srv = subprocess.Popen(["nsenter", "-t", str(c.leader), "-n", sys.executable, "-c", SERVE,
                                str(tmp_path / "srv"), str(tmp_path / "bundle")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=nspawn.REPO)
        broker = NetnsBroker(root / "broker", ca, c).start()
        try:
            assert srv.stdout is not None
            port = int(srv.stdout.readline())
            url = f"https://127.0.0.1:{port}/updates/update.raucb"
            shutil.copy(tmp_path / "srv" / "tls" / "ca.pem", c.path("/etc/appliance/update-ca.pem"))
            c.run("chmod", "0644", "/etc/appliance/update-ca.pem", check=True)
            enroll(c, root, ca, broker.port, update={
                "sources": [f"https://127.0.0.1:{port}/updates/"], "ca": "/etc/appliance/update-ca.pem",
                "deadline_s": 120})
            r = c.run_in_netns(sys.executable, "-m", "appliance", "fleet", "send", BOX, "update",
                               "--arg", f"url={url}", "--arg", f"sha256={SHA}", "--arg", "reboot=false",
                               "--key", str(root / "center" / "command.key"), "--ca", str(ca),
                               "--port", str(broker.port), "--timeout", "120", timeout=300)
            res = json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}
            assert r.returncode == 0 and res.get("result") == {"accepted": True}, str(res) + c.journal()
            event = wait_for(lambda: _update_outcome(c, res["cmd_id"], tmp_path / "outbox"), 240,
                             "the update's outcome event", poll=1, detail=lambda: _update_detail(c))
            assert (event["kind"], event["bundle_version"], event["slot"], event["reboot"]) == \
                ("update.installed", "2.0", "B", False), event
            # installed by the root unit from the folder the daemon's user filled
            assert f"install /var/lib/appliance/update-ready/{SHA}.raucb" in (rauc / "args").read_text()
            assert "handed-off update: update.installed" in c.journal("appliance-update-install.service")
            assert _user_of(c, c.show("MainPID")["MainPID"]) == "appliance"
            # the daemon removes the root side's result once it sent the event
            wait_for(lambda: list(c.path("/var/lib/appliance/update-ready").iterdir()) == [], 30,
                     "the update-ready folder emptied", detail=lambda: _update_detail(c))
            trial = json.loads(c.path("/data/update/trial.json").read_text())
            assert (trial["slot"], trial["version"]) == ("B", "2.0")
        finally:
            broker.stop()
            srv.terminate()
            srv.communicate(timeout=30)  # and its pipes closed


def _update_detail(c: Container) -> str:
    return "\n".join((c.journal(), c.journal("appliance-update-install.service"),
                      c.run("ls", "-la", "/var/lib/appliance/update-ready").stdout,
                      c.run("cat", "/var/lib/appliance/update-ready/result.json").stdout))


def _update_outcome(c: Container, cmd_id: str, tmp: Path) -> dict[str, Any] | None:
    """The final update.* event for `cmd_id` in the daemon's outbox of ops events (what the
    link sends the center), read from a copy: SQLite resolves /proc/PID/root to the host's /."""
    import sqlite3

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ("outbox.db", "outbox.db-wal"):
        if c.path(f"/var/lib/appliance/ops/{name}").exists():
            shutil.copy(c.path(f"/var/lib/appliance/ops/{name}"), tmp / name)
    if not (tmp / "outbox.db").exists():
        return None
    db = sqlite3.connect(tmp / "outbox.db")
    try:
        events = [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY seq")]
    except sqlite3.Error:  # copied mid-write: read again
        return None
    finally:
        db.close()
    return next((e for e in events if e.get("cmd_id") == cmd_id and e["kind"] in
                 ("update.installed", "update.refused", "update.failed")), None)
