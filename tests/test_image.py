"""The appliance image (image-build/out/appliance.img, made by `make image`) booted in QEMU
(tests/qemu.py: TCG, OVMF, the disk in snapshot mode, the console in a file). What it
shows: the image, written to a disk 1 GiB larger than itself, grows /data to fill it
and boots to the appliance unit's ready marker (printed after READY=1),
DCMTK's echoscu and storescu on the host get answers from it, and what it stores is
packed and delivered to the default config's outbox (its log lines on the console).

Also, without booting or mounting it, the disk as built (sfdisk, debugfs, mtools): its
partitions, fstab, no SSH server and no passwords, GRUB on the ESP, the APPLCONFIG label,
and the SBOM in it and beside it. Run with `make image-test`.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import SAMPLES, dcmtk_env, wait_for
from tests.qemu import IMAGE, READY, SBOM, Guest, booted, disk_copy, require_tools

pytestmark = [pytest.mark.image]

CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


GROWN = 1 << 30  # the disk the image is written to is this much larger than the image
DATA_BUILT = 512 << 20  # /data's partition as built


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """The image, written to a disk 1 GiB larger than itself (a sparse copy), booted
    until the appliance unit is ready; QEMU stopped by PID after."""
    require_tools("echoscu", "storescu")
    tmp = tmp_path_factory.mktemp("qemu")
    with booted(tmp, disk=disk_copy(tmp / "grown.img", GROWN)) as g:
        yield g


def test_image_boots_to_the_ready_appliance_unit(guest: Guest) -> None:
    text = guest.console_text()
    assert READY in text
    # The daemon's own log line from the same boot: the DICOM listener on port 104.
    listening = [line for line in text.splitlines() if '"listening"' in line]
    assert any(re.search(r'"port": ?104\b', line) for line in listening), guest.tail()


def test_image_grows_data_to_fill_a_bigger_disk_at_its_first_boot(guest: Guest) -> None:
    """systemd-repart grows partition 5 into the free space after it (the 1 GiB added
    and the 1 MiB the image keeps for its backup GPT), then systemd-growfs (fstab's
    x-systemd.growfs) grows its ext4 online: the kernel says so on the console."""
    text = guest.console_text()
    asked = re.search(r"EXT4-fs \(vda5\): resizing filesystem from (\d+) to \d+ blocks", text)
    done = re.search(r"EXT4-fs \(vda5\): resized filesystem to (\d+)", text)
    assert asked and done, guest.tail()
    before, after = int(asked[1]), int(done[1])
    block = DATA_BUILT // before  # the file system filled its partition as built
    assert before * block == DATA_BUILT
    # (ext4 drops a last block group too small to be worth it: a few MiB at most)
    assert GROWN - (8 << 20) <= after * block - DATA_BUILT <= GROWN + (1 << 20), (before, after)


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


def delivered_to_outbox(text: str) -> list[dict[str, Any]]:
    """The `bundle.delivered` log lines (JSON after the kernel's prefix) for the outbox."""
    events = (json.loads(line[line.index("{"):]) for line in text.splitlines()
              if '"bundle.delivered"' in line and "{" in line)
    return [e for e in events if e.get("destination") == "outbox"]


def test_image_packs_and_delivers_a_stored_study_to_its_outbox(guest: Guest) -> None:
    seen = len(guest.console_text())
    files = sorted(CT.iterdir())[3:6]
    r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "EDGE", "-R", "127.0.0.1",
                        str(guest.dicom_port), *map(str, files)],
                       capture_output=True, text=True, timeout=300, env=dcmtk_env())
    assert r.returncode == 0, r.stderr + guest.tail()
    # study_quiet_s (10 s), then packing with verification under TCG: minutes at most.
    events = wait_for(lambda: delivered_to_outbox(guest.console_text()[seen:]), timeout=300, poll=1.0,
                      what="bundle.delivered to the outbox on the console", detail=guest.tail)
    assert sum(int(e["instances"]) for e in events) >= 3, events


# --- the disk as built (read without mounting: sfdisk, debugfs, mtools) -----------------

Parts = dict[str, dict[str, Any]]  # sfdisk --json's partitions by GPT name
PARTS = [("esp", 64, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
         ("root-a", 1536, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
         ("root-b", 1536, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
         ("APPLCONFIG", 16, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
         ("data", 512, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")]


@pytest.fixture(scope="module")
def partitions() -> Parts:
    if not IMAGE.is_file():
        pytest.fail(f"{IMAGE} not found: build it with `make image`")
    r = subprocess.run(["sfdisk", "--json", str(IMAGE)], capture_output=True, text=True, check=True,
                       timeout=60)
    return {p["name"]: p for p in json.loads(r.stdout)["partitiontable"]["partitions"]}


def root_a_file(partitions: Parts, path: str) -> str:
    """A file of root A's ext4, read with debugfs at the partition's offset."""
    offset = int(partitions["root-a"]["start"]) * 512
    r = subprocess.run(["debugfs", "-R", f"cat {path}", f"{IMAGE}?offset={offset}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fat(partitions: Parts, name: str) -> str:
    return f"{IMAGE}@@{int(partitions[name]['start']) * 512}"


def test_image_has_esp_two_root_slots_applconfig_and_data(partitions: Parts) -> None:
    assert [(n, int(p["size"]) // 2048, p["type"]) for n, p in partitions.items()] == PARTS


def test_image_fstab_mounts_data_by_partition_uuid_and_leaves_root_to_grub(
        partitions: Parts) -> None:
    """No line for /: the same root file system goes into slot A or B (RAUC), and GRUB
    names the slot it boots, read-only (tests/test_image_update.py boots both)."""
    mounts = {f[1]: f for line in root_a_file(partitions, "/etc/fstab").splitlines()
              if (f := line.split()) and not f[0].startswith("#")}
    assert "/" not in mounts
    assert mounts["/boot/efi"][0] == f"PARTUUID={str(partitions['esp']['uuid']).lower()}"
    assert mounts["/data"][0] == f"PARTUUID={str(partitions['data']['uuid']).lower()}"
    assert mounts["/var/lib/appliance"][:2] == ["/data/appliance", "/var/lib/appliance"]


def test_image_has_no_ssh_server_and_no_account_with_a_password(
        partitions: Parts) -> None:
    offset = int(partitions["root-a"]["start"]) * 512
    r = subprocess.run(["debugfs", "-R", "stat /usr/sbin/sshd", f"{IMAGE}?offset={offset}"],
                       capture_output=True, text=True, timeout=60)
    assert "File not found" in r.stderr
    shadow = [line.split(":") for line in root_a_file(partitions, "/etc/shadow").splitlines()]
    assert shadow and all(f[1].startswith(("*", "!")) for f in shadow), [f[0] for f in shadow]


def test_image_esp_has_grub_on_the_removable_media_path(partitions: Parts) -> None:
    r = subprocess.run(["mdir", "-b", "-i", fat(partitions, "esp"), "::/EFI/BOOT"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "::/EFI/BOOT/BOOTX64.EFI" in r.stdout.splitlines()


def test_image_applconfig_is_fat_labelled_applconfig(partitions: Parts) -> None:
    r = subprocess.run(["minfo", "-i", fat(partitions, "APPLCONFIG"), "::"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r'disk label="APPLCONFIG *"', r.stdout), r.stdout


def test_image_carries_the_sbom_written_beside_it(partitions: Parts) -> None:
    inside = root_a_file(partitions, "/usr/share/appliance/sbom.cdx.json")
    assert json.loads(inside) == json.loads(SBOM.read_text())


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
