"""Updates with RAUC, in QEMU (image-build/out/appliance.img and the bundle `make
update-bundle` made, image-build/out/update.raucb).

One disk for the whole module: a sparse copy of the built image (which never changes),
kept across the QEMU runs the scenarios need, in order: the update installed from a
stick, booted and kept; then a broken update (its appliance.service fails) installed the
same way, QEMU killed during its trial boot (a power cut) and started again: GRUB tries
it again, the health gate rejects it, and the box falls back to the old slot by itself. The
stick is a second, read-only virtio disk with a file system labelled APPLUPDATE
(udev starts appliance-update-stick.service for it: `appliance update --once`). Each
check is on the serial console: GRUB's "grub: booting slot X", the updater's and the
mark-good unit's "appliance-update:" lines, and the `rauc status --output-format=json`
the mark-good unit prints once it has kept a slot. QEMU is stopped by its PID.

QEMU itself and the console helpers are tests/qemu.py's (`start`, `Guest.wait`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import qemu
from tests.peers import REPO

pytestmark = [pytest.mark.image, pytest.mark.image_update]

OUT = REPO / "image-build" / "out"
IMAGE, ROOTFS, BUNDLE = OUT / "appliance.img", OUT / "rootfs.ext4", OUT / "update.raucb"
# A boot under TCG is 45-90 s, an install a few minutes; a scenario is a few boots.
SCENARIO_DEADLINE_S = 1500
BROKEN_DROPIN = "[Service]\nExecStart=\nExecStart=/bin/false\n"


def wait(run: qemu.Guest, pattern: str, after: int = 0) -> re.Match[str]:
    return run.wait(pattern, after, SCENARIO_DEADLINE_S)


@dataclass
class Box:
    """The disk (a copy of the image) and firmware variables that outlive each QEMU run."""
    tmp: Path
    disk: Path
    vars: Path
    runs: int = 0

    def start(self, stick: Path | None) -> qemu.Guest:
        self.runs += 1
        extra = [] if stick is None else ["-drive", f"if=virtio,format=raw,readonly=on,file={stick}"]
        return qemu.start(self.tmp, extra, disk=self.disk, vars_file=self.vars, name=f"-{self.runs}",
                          restrict=False)


def make_stick(bundle: Path, stick: Path) -> None:
    """A file system labelled APPLUPDATE holding the bundle as update.raucb."""
    content = stick.with_suffix(".d")
    content.mkdir()
    shutil.copyfile(bundle, content / "update.raucb")
    size_mb = bundle.stat().st_size // (1 << 20) + 64
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "APPLUPDATE", "-d", str(content), str(stick),
                    f"{size_mb}M"], check=True, timeout=300)
    shutil.rmtree(content)


def make_broken_bundle(tmp: Path, version: str) -> Path:
    """The built root file system with a drop-in that makes appliance.service fail."""
    rootfs = tmp / "broken.ext4"
    subprocess.run(["cp", "--sparse=always", str(ROOTFS), str(rootfs)], check=True, timeout=300)
    dropin = tmp / "zz-broken.conf"
    dropin.write_text(BROKEN_DROPIN)
    dropin.chmod(0o644)
    cmds = tmp / "debugfs.cmds"
    cmds.write_text(f"cd /usr/lib/systemd/system/appliance.service.d\nwrite {dropin} zz-broken.conf\n")
    r = subprocess.run(["debugfs", "-w", "-f", str(cmds), str(rootfs)], capture_output=True, text=True,
                       timeout=120)
    assert "zz-broken.conf" not in r.stderr or r.returncode == 0, r.stderr
    check = subprocess.run(["debugfs", "-R", "cat /usr/lib/systemd/system/appliance.service.d/zz-broken.conf",
                            str(rootfs)], capture_output=True, text=True, timeout=60)
    assert check.stdout == BROKEN_DROPIN, check.stderr
    bundle = tmp / "broken.raucb"
    subprocess.run([str(REPO / "image-build" / "update-bundle.sh"), str(rootfs), str(bundle), version],
                   check=True, timeout=900, capture_output=True)
    rootfs.unlink()
    return bundle


def rauc_status(text: str) -> dict[str, Any]:
    """The last `rauc status` JSON the mark-good unit printed."""
    lines = [line for line in text.splitlines() if "appliance-update: rauc status {" in line]
    assert lines, "no rauc status line on the console"
    line = lines[-1]
    return dict(json.loads(line[line.index("{"):]))


def slot_by_bootname(st: dict[str, Any], bootname: str) -> dict[str, Any]:
    for entry in st["slots"]:
        for slot in entry.values():
            if slot.get("bootname") == bootname:
                return dict(slot)
    raise AssertionError(f"no slot {bootname} in {st}")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    for path in (IMAGE, ROOTFS, BUNDLE):
        if not path.is_file():
            pytest.fail(f"{path} not found: `make update-bundle` builds the image and the bundle")
    for tool in ("qemu-system-x86_64", "debugfs", "rauc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found (make peers installs it)")
    tmp = tmp_path_factory.mktemp("update")
    disk = tmp / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(IMAGE), str(disk)], check=True, timeout=600)
    yield Box(tmp, disk, qemu.fresh_vars(tmp / "OVMF_VARS.fd"))


@pytest.fixture(scope="module")
def kept(box: Box) -> Iterator[tuple[qemu.Guest, float]]:
    """The good bundle installed from the stick, booted and kept; the install's seconds."""
    stick = box.tmp / "stick-good.img"
    make_stick(BUNDLE, stick)
    run = box.start(stick)
    try:
        wait(run, r"grub: booting slot A")
        m = wait(run, r"appliance-update: installed into slot B in (\d+) s")
        wait(run, r"grub: booting slot B", after=m.end())
        kept = wait(run, r"appliance-update: kept slot B", after=m.end())
        wait(run, r"appliance-update: rauc status \{", after=kept.end())
    finally:
        run.stop()  # the disk is the next scenario's: one QEMU at a time
    yield run, float(m.group(1))


def test_update_bundle_is_installed_boots_and_is_kept(kept: tuple[qemu.Guest, float]) -> None:
    run, _ = kept
    st = rauc_status(run.console_text())
    assert st["booted"] == "B"
    b = slot_by_bootname(st, "B")
    assert b["boot_status"] == "good"
    keyring = REPO / ".cache" / "rauc-keys" / "keyring.pem"
    conf = REPO / "image-build" / "overlay" / "etc" / "rauc" / "system.conf"
    info = subprocess.run(["rauc", f"--conf={conf}", "info", "--output-format=json", f"--keyring={keyring}",
                           str(BUNDLE)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert b["slot_status"]["bundle"]["version"] == json.loads(info.stdout)["version"]
    print(f"install: {kept[1]:.0f} s (rauc install, as appliance update measured it)")


def test_broken_update_killed_in_its_trial_boot_falls_back_by_itself_spool_intact(
        box: Box, kept: tuple[qemu.Guest, float]) -> None:
    """A bundle whose appliance.service fails, installed from a stick; QEMU killed (power
    cut) during its first trial boot; powered on again without the stick: GRUB tries the
    new slot again (boot 2 of 3), the gate rejects it (the daemon restarted 3 times), and
    the box reboots into the old slot by itself, which it keeps; /data came through."""
    bundle = make_broken_bundle(box.tmp, f"broken-{int(time.time())}")
    stick = box.tmp / "stick-broken.img"
    make_stick(bundle, stick)
    run = box.start(stick)
    try:
        wait(run, r"grub: booting slot B")
        m = wait(run, r"appliance-update: installed into slot A in \d+ s")
        wait(run, r"grub: booting slot A \(boot 1 of 3\)", after=m.end())
    finally:
        run.kill()  # the power cut: no shutdown, no flush
    run = box.start(None)
    try:
        trial = wait(run, r"grub: booting slot A \(boot 2 of 3\)")
        t0 = time.monotonic()
        rejected = wait(run, r"appliance-update: rejected slot A \(appliance.service restarted",
                        after=trial.end())
        back = wait(run, r"grub: booting slot B", after=rejected.end())
        wait(run, r"appliance-update: slot A \(version broken-\d+\) failed its trial: back on slot B",
             after=back.end())
        kept_line = wait(run, r"appliance-update: kept slot B", after=back.end())
        wait(run, r"appliance-update: rauc status \{", after=kept_line.end())
        print(f"fallback: {time.monotonic() - t0:.0f} s from the trial boot's GRUB line to the old slot kept")
    finally:
        run.stop()
    text = run.console_text()
    st = rauc_status(text)
    assert st["booted"] == "B"
    assert slot_by_bootname(st, "A")["boot_status"] == "bad"
    assert slot_by_bootname(st, "B")["boot_status"] == "good"
    recovered = [json.loads(line[line.index("{"):]) for line in text[back.end():].splitlines()
                 if '"spool.recovered"' in line]
    assert recovered and recovered[-1]["quarantined"] == 0 and recovered[-1]["adopt_failed"] == 0, recovered
