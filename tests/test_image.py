"""The appliance image (image-build/out/appliance.img, made by `make image`) booted in QEMU.

QEMU in TCG mode (`/dev/kvm` here cannot boot a Debian kernel) with OVMF: the firmware
code read-only, a copy of OVMF_VARS in the test's temp dir. The disk is opened with
`snapshot=on`, so the guest's writes go to a temp file QEMU deletes and the built image
never changes. The serial console goes to a file the tests read; user networking forwards
a free loopback port to the guest's DICOM port 104. What it shows: the image boots to
the appliance unit's ready marker (printed after READY=1), and DCMTK's echoscu and
storescu on the host get answers from it. QEMU is stopped by its PID.

Also checks the SBOM written beside the image. Run with `make image-test`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import REPO, SAMPLES, dcmtk_env, free_port, wait_for

pytestmark = [pytest.mark.image]

IMAGE = REPO / "image-build" / "out" / "appliance.img"
SBOM = REPO / "image-build" / "out" / "appliance.sbom.json"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
READY = "appliance: ready (READY=1)"
EMERGENCY = "You are in emergency mode"  # a boot that ends here never gets READY: stop waiting
# Power-on to READY under TCG on this 2-core machine, shared with other work; a boot
# that takes longer than this is a defect to look at, not to wait out.
BOOT_DEADLINE_S = 600
CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    console: Path
    dicom_port: int

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])


def qemu_command(tmp: Path, console: Path, port: int) -> list[str]:
    """`-cpu max`: numpy 2's wheels need x86-64-v2 (SSE4.2, POPCNT), which QEMU's default
    CPU model lacks (the daemon dies with SIGILL at import); any box we ship on has it."""
    vars_copy = tmp / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2",
        "-nographic", "-monitor", "none", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"if=virtio,format=raw,snapshot=on,file={IMAGE}",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:104",
        "-device", "virtio-net-pci,netdev=net0",
    ]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """The image booted until the appliance unit is ready; QEMU stopped by PID after."""
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} not found: build it with `make image` (make image-test does)")
    for tool in ("qemu-system-x86_64", "echoscu", "storescu"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found (make peers installs it)")
    if not OVMF_CODE.is_file():
        pytest.fail(f"{OVMF_CODE} not found (Debian package ovmf)")
    tmp = tmp_path_factory.mktemp("qemu")
    console, port = tmp / "console.log", free_port()
    with (tmp / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(qemu_command(tmp, console, port), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    g = Guest(proc, console, port)
    try:
        wait_for(lambda: any(m in g.console_text() for m in (READY, EMERGENCY)) or proc.poll() is not None,
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


def test_image_boots_to_the_ready_appliance_unit(guest: Guest) -> None:
    text = guest.console_text()
    assert READY in text
    # The daemon's own log line from the same boot: the DICOM listener on port 104.
    listening = [line for line in text.splitlines() if '"listening"' in line]
    assert any(re.search(r'"port": ?104\b', line) for line in listening), guest.tail()


def test_image_answers_c_echo_from_the_host(guest: Guest) -> None:
    r = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "EDGE", "127.0.0.1", str(guest.dicom_port)],
                       capture_output=True, text=True, timeout=120, env=dcmtk_env())
    assert r.returncode == 0, r.stderr + guest.tail()


def test_image_refuses_a_caller_not_in_its_config(guest: Guest) -> None:
    r = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", "EDGE", "127.0.0.1", str(guest.dicom_port)],
                       capture_output=True, text=True, timeout=120, env=dcmtk_env())
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr + r.stdout


def test_image_stores_a_c_store_from_the_host(guest: Guest) -> None:
    files = sorted(CT.iterdir())[:3]
    r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "EDGE", "-R", "127.0.0.1",
                        str(guest.dicom_port), *map(str, files)],
                       capture_output=True, text=True, timeout=300, env=dcmtk_env())
    assert r.returncode == 0, r.stderr + guest.tail()
    assert "Store Failed" not in r.stderr + r.stdout


def test_sbom_lists_the_wheels_and_debian_packages_in_the_image() -> None:
    if not SBOM.is_file():
        pytest.fail(f"{SBOM} not found: build the image with `make image`")
    doc = json.loads(SBOM.read_text())
    assert doc["bomFormat"] == "CycloneDX"
    versions = {c["purl"].split("@")[0]: c["version"] for c in doc["components"]}
    import pydicom
    import pynetdicom

    assert versions["pkg:pypi/pydicom"] == pydicom.__version__
    assert versions["pkg:pypi/pynetdicom"] == pynetdicom.__version__
    assert "pkg:pypi/appliance" in versions
    assert "pkg:deb/debian/python3.11" in versions
    assert "pkg:deb/debian/openssh-server" not in versions
