"""The appliance over the emulated WAN (tests/wan.py): modality and appliance in `site`,
the reading center's Orthanc in `center`, one link between them.

Scenarios (issue 11, item 10): a study over a 20 Mbit/s link arrives complete and
identical; with 5 % loss each way everything is delivered; with the link flapping
(3 s cut, 3 s up, for a minute) everything is delivered, nothing is left `active` in
`queue list`, and the PACS holds every instance exactly once.

The center's Orthanc runs a Lua `ReceivedInstanceFilter` that logs every C-STORE it is
given (before its own de-duplication), so a test can count what was sent twice: over a
cut link a C-STORE whose response was lost must be sent again (DICOM is at-least-once),
but the PACS must end with each instance once and nothing else.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.receive_bench import generate_study
from tests.e2e_support import (
    J2K_LOSSLESS,
    appliance_config,
    compare_instance,
    dicom_destination,
    queue_db,
    queue_rows,
    read_dataset,
    settled,
)
from tests.orthanc import Orthanc
from tests.peers import Appliance, free_port, storescu, wait_for
from tests.wan import Wan

pytestmark = pytest.mark.wan

SLICES = 150
COUNT_STORES_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print("C-STORE-RECEIVED " .. dicom.SOPInstanceUID)
  return true
end
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_study(tmp_path_factory.mktemp("study"), SLICES)


@dataclass
class Bed:
    wan: Wan
    pacs: Orthanc
    app: Appliance

    def send(self, files: list[Path]) -> None:
        r = storescu(self.app.port, files, netns=self.wan.site.name, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    def stores_received(self) -> collections.Counter[str]:
        """SOP Instance UID -> how many C-STOREs of it the center's Orthanc was given."""
        marks = (line.rsplit(" ", 1)[-1] for line in self.pacs.log_text().splitlines()
                 if "C-STORE-RECEIVED " in line)
        return collections.Counter(marks)

    def detail(self) -> str:
        try:
            states = collections.Counter(r["state"] for r in queue_db(self.app.state_dir))
        except Exception as e:  # the index may not exist yet
            states = collections.Counter({repr(e): 1})
        return f"queue: {dict(states)}; pacs: {self.pacs.count()}\n{self.app.log_text()[-3000:]}"


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    if os.geteuid() != 0:
        pytest.fail("the WAN scenarios need root (CI runs as root)")
    lua = tmp_path / "count-stores.lua"
    lua.write_text(COUNT_STORES_LUA)
    with Wan() as wan:
        pacs = Orthanc(tmp_path / "center", netns=wan.center.name,
                       extra={"LuaScripts": [str(lua)]}).start()
        root = tmp_path / "appliance"
        app = Appliance(root, appliance_config(
            root, free_port(), dicom_destination(pacs.dicom_port, host=wan.center.addr)))
        app.netns = wan.site.name
        try:
            app.start()
            yield Bed(wan, pacs, app)
        finally:
            app.stop()
            app.kill9()
            pacs.stop()


def wait_delivered(bed: Bed, n: int, timeout: float) -> None:
    wait_for(lambda: settled(bed.app.state_dir), timeout, "every bundle delivered", poll=0.5,
             detail=bed.detail)
    assert bed.pacs.count() == n, bed.detail()


def assert_each_once(bed: Bed, files: list[Path]) -> collections.Counter[str]:
    """The PACS holds exactly the instances sent, each once; returns the C-STORE counts."""
    sent = {str(read_dataset(f).SOPInstanceUID) for f in files}
    held = [str(bed.pacs.instance_tags(oid)["SOPInstanceUID"]) for oid in bed.pacs.instances()]
    assert len(held) == len(set(held)) == len(files)
    assert set(held) == sent
    stores = bed.stores_received()
    assert set(stores) == sent, "a C-STORE of an instance nobody sent"
    return stores


def test_a_study_over_20_mbit_arrives_complete_and_identical(bed: Bed, study: list[Path]) -> None:
    bed.wan.link.rate(20)
    t0 = time.monotonic()
    bed.send(study)
    wait_delivered(bed, len(study), 300)
    elapsed = time.monotonic() - t0
    stores = assert_each_once(bed, study)
    by_uid = {str(read_dataset(f).SOPInstanceUID): f for f in study}
    problems = []
    for oid in bed.pacs.instances():
        data = bed.pacs.instance_file(oid)
        original = by_uid[str(read_dataset(data).SOPInstanceUID)]
        c, category = compare_instance(original, data, J2K_LOSSLESS)
        if c.problems or category != "compressed":
            problems.append(f"{original.name}: {category}: {c.problems[:4]}")
    assert not problems, problems
    print(f"\n{len(study)} slices over 20 Mbit/s in {elapsed:.1f} s; "
          f"{sum(stores.values()) - len(stores)} C-STOREs repeated")


def test_five_percent_loss_everything_delivered(bed: Bed, study: list[Path]) -> None:
    files = study[:60]
    bed.wan.link.rate(20)
    bed.wan.link.loss(5)
    t0 = time.monotonic()
    bed.send(files)
    wait_delivered(bed, len(files), 400)
    stores = assert_each_once(bed, files)
    print(f"\n{len(files)} slices over 20 Mbit/s, 5 % loss each way, in {time.monotonic() - t0:.1f} s;"
          f" {sum(stores.values()) - len(stores)} C-STOREs repeated")


def test_flapping_link_everything_delivered_nothing_stuck_active(bed: Bed, study: list[Path]) -> None:
    """10 Mbit/s; cut 3 s / up 3 s for 60 s while the study is sent and forwarded."""
    bed.wan.link.rate(10)
    stop = threading.Event()
    held_at_cut: list[int] = []

    def flap() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end and not stop.is_set():
            held_at_cut.append(bed.pacs.count())
            bed.wan.link.partition()
            stop.wait(3)
            bed.wan.link.heal()
            stop.wait(3)

    flapper = threading.Thread(target=flap, daemon=True)
    t0 = time.monotonic()
    flapper.start()
    try:
        bed.send(study)
    finally:
        flapper.join(90)
        stop.set()
    bed.wan.link.heal()
    flapped_s = time.monotonic() - t0
    wait_delivered(bed, len(study), 400)
    stores = assert_each_once(bed, study)
    rows = queue_rows(bed.app.config_path)
    assert rows and not [r for r in rows if r.get("state") == "active"], rows
    print(f"\n{len(study)} slices, {len(held_at_cut)} cuts over {flapped_s:.0f} s, delivered "
          f"{time.monotonic() - t0:.1f} s after the first C-STORE; PACS held {held_at_cut} at the cuts;"
          f" {sum(stores.values()) - len(stores)} C-STOREs repeated")
    assert len(held_at_cut) >= 9
    # The link was cut at least three times while the study was part-way across.
    assert len([n for n in held_at_cut if 0 < n < len(study)]) >= 3, held_at_cut
