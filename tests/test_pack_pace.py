"""The packer's codec choice (`pack.adaptive`, pack/pace.py wired in): the rates it
asks with, and through the real daemon: a fast folder that would wait for a slow packer
gets a faster codec, a capped link keeps JPEG 2000, and every instance decoded at the
destination equals the original pixel for pixel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from structlog.testing import capture_logs

from appliance.bundle import format as bundle
from appliance.core import crypto
from appliance.core.config import Pack
from appliance.pack.pace import Throughput, equivalent_bytes
from appliance.pack.packer import Packer
from appliance.pack.pool import CodecPool
from appliance.pack.window import Window
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.receive.identify import identify
from appliance.spool.store import Spool
from tests.peers import Appliance, base_config, cli, free_port, storescu, wait_for

MB = 1e6
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
CT = "series/CT_Philips_Ingenuity_phantom_28sl"


@pytest.fixture
def pool() -> Iterator[CodecPool]:
    p = CodecPool(workers=1)
    yield p
    p.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _packer(root: Path, pool: CodecPool, link: tuple[str | None, float | None],
            **pack: Any) -> Packer:
    key = crypto.create_spool_key(root / "spool.key")
    index = open_index(root)
    spool = Spool(root, key, index, 0)
    return Packer(Pack(**pack), spool, Queue(root, index), [], pool, link=lambda: link)


def _measured(packer: Packer, raw_bytes_per_s: float, ratio: float) -> None:
    """As if the packer had packed 10 s of segments with its configured codec."""
    clock = Clock()
    meter = packer.packed = Throughput(clock=clock)
    meter.begin()
    clock.now += 10.0
    meter.end(raw_bytes_per_s * 10)
    packer.ratio.add(raw_bytes_per_s * 10, raw_bytes_per_s * 10 / ratio)


def test_packer_keeps_the_configured_codec_while_its_pack_rate_is_unknown(
        tmp_path: Path, pool: CodecPool) -> None:
    packer = _packer(tmp_path, pool, ("pacs", 1000 * MB))
    assert packer.choose_codec() == "jpeg2000"


def test_packer_keeps_the_configured_codec_while_the_send_rate_is_unknown(
        tmp_path: Path, pool: CodecPool) -> None:
    packer = _packer(tmp_path, pool, ("pacs", None))
    _measured(packer, 17 * MB, 3.0)
    assert packer.choose_codec() == "jpeg2000"


def test_packer_chooses_a_faster_codec_when_the_link_would_wait(
        tmp_path: Path, pool: CodecPool) -> None:
    packer = _packer(tmp_path, pool, ("pacs", 12.5 * MB))  # 100 Mbit/s
    _measured(packer, 17 * MB, 3.0)
    with capture_logs() as logs:
        assert packer.choose_codec() == "jpeg-ls"
        assert packer.choose_codec() == "jpeg-ls"
    chosen = [e for e in logs if e["event"] == "pack.codec_chosen"]
    assert len(chosen) == 1  # logged when it changes, not for every segment
    assert chosen[0]["codec"] == "jpeg-ls" and chosen[0]["was"] == "jpeg2000"
    assert chosen[0]["destination"] == "pacs" and chosen[0]["send_bps"] == 12_500_000
    assert chosen[0]["pack_bps"] == 17_000_000 and chosen[0]["ratio"] == 3.0


def test_packer_keeps_jpeg2000_on_a_thin_link(tmp_path: Path, pool: CodecPool) -> None:
    packer = _packer(tmp_path, pool, ("pacs", 2.5 * MB))  # 20 Mbit/s
    _measured(packer, 17 * MB, 3.0)
    assert packer.choose_codec() == "jpeg2000"


def test_packer_with_adaptive_off_keeps_the_configured_codec(
        tmp_path: Path, pool: CodecPool) -> None:
    packer = _packer(tmp_path, pool, ("pacs", 1000 * MB), adaptive=False)
    _measured(packer, 17 * MB, 3.0)
    assert packer.choose_codec() == "jpeg2000"


def test_adaptive_is_on_by_default() -> None:
    assert Pack().adaptive is True


def test_bytes_packed_with_a_faster_codec_count_as_fewer_configured_ones() -> None:
    assert equivalent_bytes({"jpeg2000": 10 * MB}, "jpeg2000") == 10 * MB
    assert equivalent_bytes({"jpeg2000": 10 * MB, "none": 10 * MB}, "jpeg2000") == pytest.approx(11 * MB)


def test_the_window_goes_to_the_first_segment_in_rank_still_submitting() -> None:
    w = Window(2)
    w.feeding("routine", (0, 1.0, "routine"))
    w.feeding("stat", (-10, 5.0, "stat"))  # sealed later, ranks first
    assert not w.acquire("routine", 0)
    assert w.acquire("stat", 0)
    w.fed("stat")  # all its jobs submitted: the routine one fills what it leaves free
    assert w.acquire("routine", 0)
    assert not w.acquire("routine", 0)  # two places, both taken
    w.release()
    assert w.acquire("routine", 0)


def test_a_switch_takes_effect_within_a_segment(tmp_path: Path, pool: CodecPool, samples: Path) -> None:
    """The codec is chosen per instance as its job goes to the pool: once the link's rate
    is known, the rest of the segment being packed goes out with the faster codec."""
    asked: list[int] = []

    def link() -> tuple[str | None, float | None]:
        asked.append(1)
        return ("pacs", None if len(asked) == 1 else 1000 * MB)

    key = crypto.create_spool_key(tmp_path / "spool.key")
    index = open_index(tmp_path)
    spool, q = Spool(tmp_path, key, index, 0), Queue(tmp_path, index)
    crypto.create_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    packer = Packer(Pack(), spool, q, [crypto.load_public_key(tmp_path / "a.pub")], pool, link=link)
    _measured(packer, 17 * MB, 3.0)
    files = sorted((samples / CT).iterdir())[:2]
    raws = [f.read_bytes() for f in files]
    seg = {spool.store([r], identify([r], pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID,
                                     "MODALITY")).segment_id for r, f in zip(raws, files, strict=True)}
    with index.tx() as c:
        c.executemany("UPDATE segments SET state='sealed' WHERE id=?", [(x,) for x in seg])
    assert packer.pack_pending() == 1
    with q.path(seg.pop()).open("rb") as f:
        got = [e for e, _ in bundle.iter_instances(f, crypto.load_private_key(tmp_path / "a.key"))]
    assert [e.transfer_syntax for e in got] == [J2K_LOSSLESS, "1.2.840.10008.1.2.1"]
    assert [e.reason for e in got] == ["ok", "codec-none"]


# --- through the daemon ----------------------------------------------------------------------


def _cfg(root: Path, **dest: Any) -> dict[str, Any]:
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 30, "workers": 2}
    cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1, "min_rate_kbit_s": 64}
    cfg["destinations"][0].update(dest)
    (root / "outbox").mkdir(parents=True, exist_ok=True)
    return cfg


def _delivered(app: Appliance, bundles: int) -> list[Path]:
    """Wait until `bundles` bundles are delivered and nothing else is queued; their files."""
    def done() -> list[Path] | None:
        import json
        r = cli("queue", "list", "--json", "--config", str(app.config_path), check=True)
        rows = json.loads(r.stdout)
        if len(rows) == bundles and all(x["state"] == "delivered" for x in rows):
            return sorted(app.root.joinpath("outbox").glob("*.bundle"), key=lambda p: p.stat().st_mtime)
        return None
    out: list[Path] = wait_for(done, timeout=120, what=f"{bundles} bundle(s) delivered")
    return out


def _extract(bundle: Path, app: Appliance, out: Path) -> list[pydicom.Dataset]:
    r = cli("bundle", "extract", str(bundle), "--key", str(app.root / "keys" / "appliance.key"),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]


def _same_pixels(decoded: list[pydicom.Dataset], files: list[Path]) -> None:
    originals = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, files)}
    assert sorted(ds.SOPInstanceUID for ds in decoded) == sorted(originals)
    for ds in decoded:
        orig = originals[ds.SOPInstanceUID]
        assert np.array_equal(ds.pixel_array, orig.pixel_array)
        for elem in orig:
            if elem.tag != 0x7FE00010:
                assert ds[elem.tag].value == elem.value, elem.tag


def _two_batches(app: Appliance, files: list[Path], tmp_path: Path, n: int = 4,
                 first_packed: Callable[[], None] = lambda: None) -> tuple[list[pydicom.Dataset], ...]:
    """Send files[:n], let them be packed and delivered (the rates are measured), then
    files[n:n+4]; the instances of each batch as decoded from their bundles."""
    assert storescu(app.port, files[:n]).returncode == 0
    first_packed()
    first = _delivered(app, 1)
    assert storescu(app.port, files[n:n + 4]).returncode == 0
    both = _delivered(app, 2)
    assert both[0] == first[0]
    return (_extract(both[0], app, tmp_path / "x1"), _extract(both[1], app, tmp_path / "x2"))


def test_a_fast_folder_waiting_for_a_slow_packer_gets_a_faster_codec_losslessly(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "a"
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    app = appliance_factory(_cfg(root), root=root, start=False)
    app.env = {"APPLIANCE_FAILPOINTS": str(failpoints)}
    app.start()
    files = sorted((samples / CT).iterdir())
    (failpoints / "pack.hang").write_text("hang")

    def slow_first_pack() -> None:  # the packer takes 2 s more over its first segment
        wait_for(lambda: "failpoint.hit" in app.log_text(), what="the packer at the failpoint")
        time.sleep(2.0)
        (failpoints / "pack.hang").unlink()

    first, second = _two_batches(app, files, tmp_path, first_packed=slow_first_pack)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in first} == {J2K_LOSSLESS}
    assert J2K_LOSSLESS not in {str(ds.file_meta.TransferSyntaxUID) for ds in second}
    assert "pack.codec_chosen" in app.log_text()
    _same_pixels(first + second, files[:8])


def test_a_capped_link_keeps_jpeg2000(
        appliance_factory: Callable[..., Appliance], samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    app = appliance_factory(_cfg(root, max_kbit_s=1000), root=root)
    files = sorted((samples / CT).iterdir())
    # 12 slices: a J2K bundle of two 1 MiB chunks, so that the folder's cap (which lets
    # one chunk go at once, bandwidth.BURST_S) shows in the measured send rate
    first, second = _two_batches(app, files, tmp_path, n=12)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in first + second} == {J2K_LOSSLESS}
    assert "pack.codec_chosen" not in app.log_text()
    _same_pixels(first + second, files[:16])
