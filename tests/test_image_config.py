"""The image imports a technician's config from a USB stick labelled APPLCONFIG (QEMU).

One boot (tests/qemu.py) with a stick holding a valid site config plugged in from power-on
(usb-storage on the xhci controller; udev's 90-appliance-config.rules and
appliance-config-import@.service): the site config is installed under /data/config, the
daemon answers as the site's AE title, and the stick's appliance-result.txt says so. Then
a second stick with a broken config is plugged in while the box runs (the QEMU monitor's
drive_add/device_add): it is refused, the result file on it gives the check's error
line, and the daemon keeps the site config and is not restarted. The same boot also shows
the clock (chrony, its state on /data) and, last, the hardware watchdog: an NMI panics
the guest and QEMU's i6300esb, armed by systemd's RuntimeWatchdogSec=, resets it. The
reset's second boot shows what the first left on /data: the machine id GRUB passes again
and, after an ACPI power-off, the journal (read from the disk, a copy of the image)
listing both boots. The sticks are files
made with mkfs.vfat and mtools (no loop mounts) and read back with mtools once the guest
says it has unmounted them. Run with `make image-test` (marker image).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import REPO, dcmtk_env, wait_for
from tests.qemu import BOOT_DEADLINE_S, READY, Guest, booted, disk_copy, require_tools

pytestmark = [pytest.mark.image]

DEFAULT = REPO / "image-build" / "overlay" / "etc" / "appliance" / "appliance.toml"
IMPORT_S = 600  # the import under TCG on a loaded 2-core machine: ~10-30 s measured
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def site_config(name: str, ae_title: str, port: int = 104) -> str:
    """The image's default config made a site's: another name, AE title, caller and port."""
    text = DEFAULT.read_text()
    text = text.replace('name = "appliance"', f'name = "{name}"')
    text = text.replace('ae_title = "EDGE"', f'ae_title = "{ae_title}"')
    text = text.replace('callers = [{ ae_title = "MODALITY" }]', 'callers = [{ ae_title = "SCANNER" }]')
    assert "port = 104\n" in text
    return text.replace("port = 104\n", f"port = {port}\n")


def make_stick(path: Path, config: str) -> Path:
    """An 8 MiB FAT 'stick' labelled APPLCONFIG with appliance.toml on it."""
    subprocess.run(["truncate", "-s", "8M", str(path)], check=True, timeout=30)
    subprocess.run(["mkfs.vfat", "-n", "APPLCONFIG", str(path)], check=True, capture_output=True, timeout=30)
    src = path.with_suffix(".toml")
    src.write_text(config)
    subprocess.run(["mcopy", "-i", str(path), str(src), "::appliance.toml"], check=True, timeout=30,
                   env=MTOOLS)
    return path


def stick_file(stick: Path, name: str) -> str:
    out = stick.parent / f"{stick.stem}-{name}"
    out.unlink(missing_ok=True)
    subprocess.run(["mcopy", "-n", "-i", str(stick), f"::{name}", str(out)], check=True, timeout=30,
                   env=MTOOLS, capture_output=True)
    return out.read_bytes().decode()


def done_lines(guest: Guest) -> list[tuple[str, str]]:
    """(stick, the import unit's result) for each stick imported and unmounted since boot:
    `applconfig: sda done (success)`, then `applconfig: sda unmounted; ...`."""
    text = guest.console_text()
    unmounted = set(re.findall(r"applconfig: (sd[a-z]+\d*) unmounted", text))
    return [(s, r) for s, r in re.findall(r"applconfig: (sd[a-z]+\d*) done \(([a-z-]+)\)", text)
            if s in unmounted]


def echo(guest: Guest, called: str, calling: str) -> bool:
    r = subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(guest.dicom_port)],
                       capture_output=True, text=True, timeout=120, env=dcmtk_env())
    return r.returncode == 0


@pytest.fixture(scope="module")
def sticks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for tool in ("mkfs.vfat", "mcopy"):
        require_tools(tool)
    d = tmp_path_factory.mktemp("sticks")
    return {"site": make_stick(d / "site.img", site_config("site-box", "SITEAE")),
            "broken": make_stick(d / "broken.img", site_config("broken-box", "BROKEN", port=99999))}


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, sticks: dict[str, Path]) -> Iterator[Guest]:
    """Booted with the site stick plugged in; the stick's import is over when it yields."""
    require_tools("echoscu")
    stick = ["-drive", f"if=none,id=site,format=raw,file={sticks['site']}",
             "-device", "usb-storage,bus=xhci.0,drive=site"]
    tmp = tmp_path_factory.mktemp("qemu")
    with booted(tmp, stick, disk=disk_copy(tmp / "disk.img")) as g:
        wait_for(lambda: done_lines(g), timeout=IMPORT_S, poll=1.0, what="the site stick's import",
                 detail=g.tail)
        yield g


def test_image_imports_a_site_config_from_a_stick_and_says_so_on_it(
        guest: Guest, sticks: dict[str, Path]) -> None:
    assert done_lines(guest)[0][1] == "success", guest.tail()
    result = stick_file(sticks["site"], "appliance-result.txt")
    assert result.startswith("appliance config import: INSTALLED\r\n"), result
    assert "config check: ok\r\n" in result
    assert "config in force: /data/config/current/appliance.toml\r\n" in result
    assert "box name: site-box\r\n" in result
    assert re.search(r"appliance key \(X25519\) sha256: ([0-9a-f]{4} ){15}[0-9a-f]{4}\r\n", result), result


def test_image_answers_as_the_imported_site_config(guest: Guest) -> None:
    """The daemon runs the site config (started after the import, or restarted by it)."""
    assert wait_for(lambda: echo(guest, "SITEAE", "SCANNER"), timeout=IMPORT_S, poll=5.0,
                    what="C-ECHO to the site's AE title", detail=guest.tail)
    assert not echo(guest, "EDGE", "MODALITY")


def test_image_imported_the_disks_own_applconfig_partition_at_boot(guest: Guest) -> None:
    """The disk's APPLCONFIG partition holds only its README: nothing to import."""
    assert "appliance config import: NOTHING TO IMPORT" in guest.console_text()
    assert "applconfig: boot done (success)" in guest.console_text()


def test_image_refuses_a_broken_stick_and_keeps_the_config_in_force(
        guest: Guest, sticks: dict[str, Path]) -> None:
    wait_for(lambda: echo(guest, "SITEAE", "SCANNER"), timeout=IMPORT_S, poll=5.0,
             what="the site config in force first", detail=guest.tail)
    seen = len(done_lines(guest))
    readies = guest.console_text().count(READY)
    out = guest.monitor(f"drive_add 0 if=none,id=broken,format=raw,file={sticks['broken']}")
    assert "OK" in out, out
    out = guest.monitor("device_add usb-storage,bus=xhci.0,drive=broken,id=broken-stick")
    assert "Error" not in out, out
    lines = wait_for(lambda: done_lines(guest)[seen:], timeout=IMPORT_S, poll=1.0,
                     what="the broken stick's import", detail=guest.tail)
    assert lines[0][1] == "exit-code", guest.tail()
    result = stick_file(sticks["broken"], "appliance-result.txt")
    assert result.startswith("appliance config import: REFUSED\r\n"), result
    assert "config check: appliance.toml: receive.port: must be 1..65535\r\n" in result, result
    assert "box name: site-box\r\n" in result  # the identity of the config that stays
    assert echo(guest, "SITEAE", "SCANNER")
    assert guest.console_text().count(READY) == readies  # not restarted


def test_image_shows_the_identity_on_the_console(guest: Guest) -> None:
    """The login screen's /etc/issue.d/appliance.issue: `appliance keys show`."""
    shown = re.compile(r"appliance key \(X25519\) sha256: [0-9a-f ]{79}")
    assert wait_for(lambda: shown.search(guest.console_text()), timeout=120, poll=1.0,
                    what="the identity on the console", detail=guest.tail)


# --- the same boot: the clock ---------------------------------------------------------------


def test_image_runs_chrony_with_its_state_on_data(guest: Guest) -> None:
    text = guest.console_text()
    assert re.search(r"Started .*chrony", text), guest.tail()
    assert re.search(r"Mounted .*var-lib-chrony", text), guest.tail()  # /data/chrony


# --- last, as it resets the guest: the hardware watchdog ----------------------------------


def test_image_hung_by_a_kernel_panic_is_reset_by_the_watchdog(guest: Guest) -> None:
    """RuntimeWatchdogSec=60s on QEMU's i6300esb: the NMI panics the kernel (sysctl
    kernel.unknown_nmi_panic), nothing pets the watchdog, and it resets the machine: the
    firmware and the kernel start again. Must come after the tests of the first boot."""
    boots = guest.console_text().count("Linux version")
    guest.monitor("nmi")
    wait_for(lambda: "Kernel panic" in guest.console_text(), timeout=120, poll=1.0,
             what="the kernel's panic after the NMI", detail=guest.tail)
    wait_for(lambda: guest.console_text().count("Linux version") > boots, timeout=600, poll=2.0,
             what="a second boot (the watchdog's reset)", detail=guest.tail)


# --- after the reset: what the first boot left on /data ---------------------------------------


def boots(guest: Guest) -> list[str]:
    """The console cut at each kernel's first line: one text per boot."""
    return guest.console_text().split("Linux version")[1:]


def test_image_keeps_its_machine_id_across_the_reset(guest: Guest) -> None:
    """The first boot keeps the machine id PID 1 made in /data/machine-id.grubenv
    (appliance-machine-id.service says it on the console); GRUB passes it to the next
    boot as systemd.machine_id=."""
    kept = re.search(r"appliance: machine id ([0-9a-f]{32}) kept in /data", boots(guest)[0])
    assert kept, guest.tail()
    passed = wait_for(lambda: len(boots(guest)) > 1 and re.search(
        r"Kernel command line: .*systemd\.machine_id=([0-9a-f]{32})", boots(guest)[1]),
        timeout=300, poll=1.0, what="the second boot's kernel command line", detail=guest.tail)
    assert passed[1] == kept[1]
    assert "appliance: machine id" not in boots(guest)[1]  # kept once, not made again


def test_image_journal_on_data_holds_both_boots(guest: Guest) -> None:
    """The journal is on /data (/var/log/journal), filed under the kept machine id. Once
    the second boot is ready, an ACPI power-off (logind) shuts the guest down cleanly;
    the disk's /data/journal, read with debugfs, lists two boots (the host's journalctl)."""
    wait_for(lambda: len(boots(guest)) > 1 and READY in boots(guest)[1], timeout=BOOT_DEADLINE_S,
             poll=2.0, what="the second boot's ready marker", detail=guest.tail)
    machine_id = re.search(r"systemd\.machine_id=([0-9a-f]{32})", boots(guest)[1])
    assert machine_id, guest.tail()
    guest.monitor("system_powerdown")
    wait_for(lambda: guest.proc.poll() is not None, timeout=300, poll=2.0,
             what="the guest's power-off", detail=guest.tail)
    disk = guest.console.parent / "disk.img"
    r = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True,
                       timeout=60)
    data = json.loads(r.stdout)["partitiontable"]["partitions"][4]
    out = guest.console.parent / "journal"
    r = subprocess.run(["debugfs", "-R", f"rdump /journal {out.parent}",
                        f"{disk}?offset={int(data['start']) * 512}"],
                       capture_output=True, text=True, timeout=120)
    assert (out / machine_id[1]).is_dir(), r.stderr + str(list(out.iterdir()))
    r = subprocess.run(["journalctl", "--directory", str(out / machine_id[1]), "--list-boots", "--no-pager"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = [line for line in r.stdout.splitlines() if re.match(r"\s*-?\d+ [0-9a-f]{32} ", line)]
    assert len(listed) >= 2, r.stdout
