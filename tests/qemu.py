"""The appliance image (image-build/out/appliance.img) booted in QEMU, for the image tests.

Shared by tests/test_image*.py. QEMU in TCG mode (`/dev/kvm` here cannot boot a Debian
kernel) with OVMF: the firmware code read-only, a copy of OVMF_VARS in the test's temp
dir. The disk is opened with `snapshot=on`, so the guest's writes go to a temp file QEMU
deletes and the built image never changes. The serial console goes to a file the tests
read; user networking forwards a free loopback port to the guest's DICOM port 104 and,
`restrict=on`, routes nothing the guest sends anywhere (its NTP client, chrony, would
reach for public servers through QEMU's NAT otherwise). A
human monitor (HMP) listens on a Unix socket in the temp dir, for tests that plug a
device in while the guest runs (`Guest.monitor`). QEMU is stopped by its PID.

`booted(tmp, extra)` is the context manager a module-scoped fixture wraps: it boots,
waits for the appliance unit's ready marker (or a sign that it will never come), and
stops QEMU on the way out.
"""

from __future__ import annotations

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

    def monitor(self, command: str, timeout: float = 30.0) -> str:
        """One HMP command (`device_add ...`); returns what the monitor printed for it."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor_socket))
            got = _read_until_prompt(s, timeout)  # the banner
            s.sendall(command.encode() + b"\n")
            got = _read_until_prompt(s, timeout)
        return got.decode(errors="replace")


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


def qemu_command(tmp: Path, console: Path, port: int, monitor: Path,
                 extra: Sequence[str] = ()) -> list[str]:
    """`-cpu max`: numpy 2's wheels need x86-64-v2 (SSE4.2, POPCNT), which QEMU's default
    CPU model lacks (the daemon dies with SIGILL at import); any box we ship on has it.
    A qemu-xhci USB controller (id `xhci`) is always there, for USB sticks, and an
    i6300esb watchdog, which systemd's RuntimeWatchdogSec= arms."""
    vars_copy = tmp / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
        "-nographic", "-monitor", f"unix:{monitor},server=on,wait=off", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"if=virtio,format=raw,snapshot=on,file={IMAGE}",
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:104",
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


@contextmanager
def booted(tmp: Path, extra: Sequence[str] = ()) -> Iterator[Guest]:
    """The image booted until the appliance unit is ready; QEMU stopped by PID after."""
    require_tools()
    console, port, monitor = tmp / "console.log", free_port(), tmp / "monitor.sock"
    with (tmp / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(qemu_command(tmp, console, port, monitor, extra),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    g = Guest(proc, console, port, monitor)
    try:
        wait_for(g.settled,
                 timeout=BOOT_DEADLINE_S, poll=1.0, what="the appliance's ready marker on the console",
                 detail=g.tail)
        assert proc.poll() is None, f"QEMU exited ({proc.returncode}):\n{(tmp / 'qemu.out').read_text()}"
        assert READY in g.console_text(), f"the guest did not come up:\n{g.tail()}"
        yield g
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
