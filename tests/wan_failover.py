"""Failover over the emulated WAN, shared by tests/test_wan_failover.py and
bench/failover_bench.py: the bed with two reading centers, an Orthanc in each, and the
appliance in `site` sending to center A first and to center B when A is down.

    with two_centers(root) as bed:
        bed.wan.link.rate(10)                       # site <-> center A
        sender = Modality(bed.app.port, files, bed.wan.site.name)
        cut = bed.cut_mid_bundle(min_at_a=15)       # nft partition of A's link, mid-bundle
        cut.seconds                                 # cut -> first instance stored at B

Each center's Orthanc logs every C-STORE it is given (a Lua `ReceivedInstanceFilter`,
before Orthanc's own de-duplication), so `stores(pacs)` sees an instance sent twice to
the same PACS even though Orthanc would keep it once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e_support import appliance_config, dicom_destination, queue_db
from tests.orthanc import Orthanc
from tests.peers import Appliance, free_port, storescu, wait_for
from tests.wan import Wan

COUNT_STORES_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print("C-STORE-RECEIVED " .. dicom.SOPInstanceUID)
  return true
end
"""
# The DICOM timeout is long on purpose: the silent link must be noticed by the link
# timeout (`link_timeout_s`, its default), not by waiting out the PACS's timeout.
TIMEOUT_S = 60


def stores(pacs: Orthanc) -> collections.Counter[str]:
    """SOP Instance UID -> how many C-STOREs of it this Orthanc was given."""
    marks = (line.rsplit(" ", 1)[-1] for line in pacs.log_text().splitlines()
             if "C-STORE-RECEIVED " in line)
    return collections.Counter(marks)


def held(pacs: Orthanc) -> list[str]:
    """The SOP Instance UIDs this Orthanc holds (one entry per stored instance)."""
    rows: list[dict[str, Any]] = pacs.get("/instances?expand")
    return [str(r["MainDicomTags"]["SOPInstanceUID"]) for r in rows]


def problems(a: Orthanc, b: Orthanc, sent: set[str]) -> list[str]:
    """What is wrong with what the two centers hold, after a failover of the instances
    `sent`: one at neither center (lost), one nobody sent, one held twice or C-STOREd more
    than once by the same PACS (an instance at both A and B is fine: a bundle cut at A
    moves whole to B). No UIDs in the text."""
    out = []
    at_a, at_b = held(a), held(b)
    if lost := sent - set(at_a) - set(at_b):
        out.append(f"{len(lost)} instance(s) at neither center")
    for name, pacs, uids in (("A", a, at_a), ("B", b, at_b)):
        if len(uids) != len(set(uids)):
            out.append(f"an instance held twice at {name}")
        if set(uids) - sent:
            out.append(f"{len(set(uids) - sent)} instance(s) at {name} that were not sent")
        if repeated := [u for u, n in stores(pacs).items() if n > 1]:
            out.append(f"{len(repeated)} instance(s) C-STOREd more than once at {name}")
    return out


class Modality(threading.Thread):
    """A scanner in `site` that keeps sending: `files` in associations of `per` images,
    `pause` s apart, so that a cut falls while the study is still arriving."""

    def __init__(self, port: int, files: list[Path], netns: str, per: int = 10,
                 pause: float = 0.3) -> None:
        super().__init__(name="modality", daemon=True)
        self.port, self.files, self.netns, self.per, self.pause = port, files, netns, per, pause
        self.codes: list[int] = []
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for i in range(0, len(self.files), self.per):
                r = storescu(self.port, self.files[i:i + self.per], netns=self.netns, timeout=300)
                self.codes.append(r.returncode)
                time.sleep(self.pause)
        finally:
            self.done.set()


@dataclass
class Cut:
    seconds: float  # from the partition to the first instance stored at B
    wall: float  # time.time() of the partition (to place the daemon's log lines)
    at_a: int  # instances A held when the link was cut
    active: int  # bundles being sent (state active) when the link was cut


@dataclass
class TwoCenters:
    wan: Wan
    a: Orthanc
    b: Orthanc
    app: Appliance

    def destinations(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.app.status()["destinations"]}

    def active(self) -> int:
        return len([r for r in queue_db(self.app.state_dir) if r["state"] == "active"])

    def cut_mid_bundle(self, min_at_a: int, timeout: float = 180) -> Cut:
        """Once A holds `min_at_a` instances and a bundle is on its way, partition A's link
        (a silent link: no RST, no ICMP); then wait for the first instance at B."""
        wait_for(lambda: self.a.count() >= min_at_a and self.active() > 0, timeout,
                 f"{min_at_a} instances at center A and a bundle in flight", poll=0.05,
                 detail=self.detail)
        active = self.active()
        self.wan.link.partition()
        t0, wall = time.monotonic(), time.time()
        at_a = self.a.count()
        wait_for(lambda: self.b.count() > 0, timeout, "the first instance at center B", poll=0.05,
                 detail=self.detail)
        return Cut(time.monotonic() - t0, wall, at_a, active)

    def detail(self) -> str:
        try:
            states = collections.Counter(r["state"] for r in queue_db(self.app.state_dir))
        except Exception as e:  # the index may not exist yet
            states = collections.Counter({repr(e): 1})
        return (f"queue: {dict(states)}; A: {self.a.count()}, B: {self.b.count()}\n"
                f"{self.app.log_text()[-3000:]}")


@contextlib.contextmanager
def two_centers(root: Path, segment_instances: int = 10, **destination: Any) -> Iterator[TwoCenters]:
    """The bed (`site`, `center`, `center_b`), an Orthanc in each center, and the
    appliance in `site` with destinations center-a (first) and center-b (`destination`:
    more keys for both, e.g. link_timeout_s). Everything is
    stopped by PID on exit, also when the body fails."""
    if os.geteuid() != 0:
        raise PermissionError("the WAN failover bed needs root (network namespaces)")
    root.mkdir(parents=True, exist_ok=True)
    lua = root / "count-stores.lua"
    lua.write_text(COUNT_STORES_LUA)
    with Wan(centers=("center", "center_b")) as wan:
        center_b = wan.by_role("center_b")
        a = Orthanc(root / "center-a", netns=wan.center.name, extra={"LuaScripts": [str(lua)]})
        b = Orthanc(root / "center-b", netns=center_b.name, extra={"LuaScripts": [str(lua)]})
        app: Appliance | None = None
        try:
            a.start()
            b.start()
            app_root = root / "appliance"
            cfg = appliance_config(app_root, free_port(), {}, segment_max_instances=segment_instances)
            cfg["destinations"] = [
                dicom_destination(a.dicom_port, name="center-a", host=wan.center.addr,
                                  timeout_s=TIMEOUT_S, **destination),
                dicom_destination(b.dicom_port, name="center-b", host=center_b.addr,
                                  timeout_s=TIMEOUT_S, **destination)]
            cfg["queue"] = {"retry_min_s": 0.5, "retry_max_s": 2, "lanes": 2,
                            "probe_min_s": 1, "probe_max_s": 2}
            app = Appliance(app_root, cfg)
            app.netns = wan.site.name
            app.start()
            yield TwoCenters(wan, a, b, app)
        finally:
            if app is not None:
                app.stop()
                app.kill9()
            a.stop()
            b.stop()
