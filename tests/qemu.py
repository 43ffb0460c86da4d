"""The appliance image (image-build/out/appliance.img) booted in QEMU, for the image tests.

Shared by tests/test_image*.py. QEMU in TCG mode (`/dev/kvm` here cannot boot a Debian
kernel) with OVMF: the firmware code read-only, the variables in a copy (per run, or one
a test keeps across runs). The disk is the built image opened with `snapshot=on` (the
guest's writes go to a temp file QEMU deletes, so the built image never changes), or a
copy a test made (its own drop-ins, or a disk that outlives several runs). The serial
console goes to a file the tests read; user networking forwards a free loopback port to
the guest's DICOM port 104 and, `restrict=on`, routes nothing the guest sends anywhere
(its NTP client, chrony, would reach for public servers through QEMU's NAT otherwise;
the VPN test turns it off: its guest must reach the host's 10.0.2.2). A human monitor
(HMP) listens on a Unix socket in the temp dir, for tests that plug a device in while
the guest runs (`Guest.monitor`). QEMU is stopped by its PID.

`start(tmp, ...)` starts one run and returns its `Guest`; `Guest.wait(pattern)` waits for
a console line, `Guest.stop()` shuts QEMU down, `Guest.kill()` is a power cut.
`booted(tmp, extra, ...)` is the context manager a module-scoped fixture wraps: it boots,
waits for the appliance unit's ready marker (or a sign that it will never come), and
stops QEMU on the way out.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import REPO, free_port, wait_for

IMAGE = REPO / "image-build" / "out" / "appliance.img"
SBOM = REPO / "image-build" / "out" / "appliance.sbom.json"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
READY = "appliance: ready (READY=1)"
# Boots that will never print READY: stop waiting at the first sign (systemd's status
# line shortens unit names, so match the start of the name only; a config import that
# failed, appliance-config-import@, is not one: appliance-keys failing shows as appliance's
# dependency failing).
GAVE_UP = re.compile(r"You are in emergency mode|Failed to start .*appliance(?!-)"
                     r"|Dependency failed for .*appliance")
# Power-on to READY under TCG on this 2-core machine, shared with other work; a boot
# that takes longer than this is a defect to look at, not to wait out.
BOOT_DEADLINE_S = 600


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    console: Path
    dicom_port: int
    monitor_socket: Path

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def settled(self) -> bool:
        """The boot is over, one way or the other: ready, given up, or QEMU gone."""
        text = self.console_text()
        return READY in text or GAVE_UP.search(text) is not None or self.proc.poll() is not None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def wait(self, pattern: str, after: int = 0, timeout: float = BOOT_DEADLINE_S) -> re.Match[str]:
        """The first match of `pattern` on the console after character `after`; QEMU
        exiting first is a failure."""
        rx = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}):\n{self.tail(80)}")
            return rx.search(self.console_text(), after)

        m = wait_for(seen, timeout=timeout, poll=1.0, what=f"{pattern!r} on the console",
                     detail=lambda: self.tail(80))
        assert m is not None  # wait_for returns only what is truthy
        return m

    def monitor(self, command: str, timeout: float = 30.0) -> str:
        """One HMP command (`device_add ...`); returns what the monitor printed for it."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor_socket))
            got = _read_until_prompt(s, timeout)  # the banner
            s.sendall(command.encode() + b"\n")
            got = _read_until_prompt(s, timeout)
        return got.decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (QEMU exits at once, like a power-off), SIGKILL if it does not."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """A power cut: SIGKILL, no shutdown, nothing flushed."""
        self.proc.kill()
        self.proc.wait(timeout=60)


def _read_until_prompt(s: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"(qemu) "):
        if time.monotonic() > deadline or len(buf) > 1 << 20:
            raise AssertionError(f"no QEMU monitor prompt: {buf[-500:]!r}")
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def qemu_command(vars_file: Path, console: Path, port: int, monitor: Path,
                 extra: Sequence[str] = (), disk: Path = IMAGE, restrict: bool = True) -> list[str]:
    """`-cpu max`: numpy 2's wheels need x86-64-v2 (SSE4.2, POPCNT), which QEMU's default
    CPU model lacks (the daemon dies with SIGILL at import); any box we ship on has it.
    A qemu-xhci USB controller (id `xhci`) is always there, for USB sticks, and an
    i6300esb watchdog, which systemd's RuntimeWatchdogSec= arms. The built image is
    opened in snapshot mode; any other disk (a test's copy) is written."""
    drive = f"if=virtio,format=raw,snapshot=on,file={IMAGE}" if disk == IMAGE \
        else f"if=virtio,format=raw,file={disk}"
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
        "-nographic", "-monitor", f"unix:{monitor},server=on,wait=off", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        "-drive", drive,
        "-netdev", f"user,id=net0,{'restrict=on,' if restrict else ''}hostfwd=tcp:127.0.0.1:{port}-:104",
        "-device", "virtio-net-pci,netdev=net0",
        "-device", "qemu-xhci,id=xhci",
        "-device", "i6300esb",
        *extra,
    ]


def require_tools(*tools: str) -> None:
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} not found: build it with `make image` (make image-test does)")
    for tool in ("qemu-system-x86_64", *tools):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found (make peers installs it)")
    if not OVMF_CODE.is_file():
        pytest.fail(f"{OVMF_CODE} not found (Debian package ovmf)")


def disk_copy(path: Path, grow_bytes: int = 0) -> Path:
    """A sparse copy of the built image, on a disk `grow_bytes` larger (truncate): the
    image as a technician writes it to a bigger disk. The guest writes the copy, which a
    test can read after the guest has stopped (unlike the snapshot of the image)."""
    subprocess.run(["cp", "--sparse=always", str(IMAGE), str(path)], check=True, timeout=300)
    os.truncate(path, IMAGE.stat().st_size + grow_bytes)
    return path


def fresh_vars(path: Path) -> Path:
    """A writable copy of OVMF's variable store (a test keeps one across runs of a disk)."""
    shutil.copyfile(OVMF_VARS, path)
    return path


def start(tmp: Path, extra: Sequence[str] = (), *, disk: Path = IMAGE, vars_file: Path | None = None,
          name: str = "", restrict: bool = True) -> Guest:
    """One QEMU run; its console is `tmp/console<name>.log`. The caller stops it."""
    console, port, monitor = tmp / f"console{name}.log", free_port(), tmp / f"monitor{name}.sock"
    if vars_file is None:
        vars_file = fresh_vars(tmp / f"OVMF_VARS{name}.fd")
    cmd = qemu_command(vars_file, console, port, monitor, extra, disk, restrict)
    with (tmp / f"qemu{name}.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return Guest(proc, console, port, monitor)


@contextmanager
def booted(tmp: Path, extra: Sequence[str] = (), *, disk: Path = IMAGE,
           restrict: bool = True) -> Iterator[Guest]:
    """The image booted until the appliance unit is ready; QEMU stopped by PID after."""
    require_tools()
    g = start(tmp, extra, disk=disk, restrict=restrict)
    try:
        wait_for(g.settled,
                 timeout=BOOT_DEADLINE_S, poll=1.0, what="the appliance's ready marker on the console",
                 detail=g.tail)
        assert g.proc.poll() is None, f"QEMU exited ({g.proc.returncode}):\n{(tmp / 'qemu.out').read_text()}"
        assert READY in g.console_text(), f"the guest did not come up:\n{g.tail()}"
        yield g
    finally:
        g.stop()
