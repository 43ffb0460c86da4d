"""Capped inflation (issue 10, C.2): a deflated data set is inflated only in a codec
worker, incrementally, never past its cap, and one that would go past it is packed as it
came; the packing process itself never parses or inflates an instance, not even after
the workers died on it. The manifest's facts come from our own file meta."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless

from appliance.bundle import format as bundle
from appliance.core import crypto, part10
from appliance.core.config import Pack
from appliance.pack import codec, elements
from appliance.pack import packer as packer_mod
from appliance.pack import stream as stream_pack
from appliance.pack.packer import Packer
from appliance.pack.policy import inflate_cap
from appliance.pack.pool import CodecPool
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.spool.store import Spool
from tests.deflate_bomb import inflated_size, spool_bomb, write_bomb
from tests.peers import SAMPLES, Appliance, base_config, free_port, storescu, wait_for

MiB = 1 << 20


class Box:
    """A spool, a queue, a key pair, and a real Packer over a real CodecPool."""

    def __init__(self, root: Path, pool: CodecPool, **packer: Any) -> None:
        key = crypto.create_spool_key(root / "spool.key")
        index = open_index(root)
        self.spool, self.queue = Spool(root, key, index, 0), Queue(root, index)
        crypto.create_keypair(root / "a.key", root / "a.pub")
        self.private = crypto.load_private_key(root / "a.key")
        self.packer = Packer(Pack(codec="jpeg2000"), self.spool, self.queue,
                             [crypto.load_public_key(root / "a.pub")], pool, **packer)

    def bundle(self, seg: str) -> list[tuple[bundle.ManifestEntry, bytes]]:
        with self.queue.path(seg).open("rb") as f:
            return list(bundle.iter_instances(f, self.private))


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def worker_pids(pool: CodecPool) -> list[int]:
    return pool.pids()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.dcm")  # 512 MiB of zero pixels
    assert path.stat().st_size < 1 * MiB
    assert inflated_size(path) > 512 * MiB
    return path


def test_a_deflate_bomb_is_packed_as_it_came_and_its_worker_stays_small(
        tmp_path: Path, bomb: Path) -> None:
    """Through the real Packer and a one-worker pool, at the default caps (inflate at most
    min(receive.max_instance_mb, pack.stream_threshold_mb) = 64 MiB): the bundle holds
    the bomb byte for byte, passed through with reason "inflated-too-large"; the worker's
    peak RSS stays far below the 512 MiB it would take to inflate it, and the packing
    process (the daemon's pack thread) allocates no more than a chunk or two."""
    with CodecPool(workers=1) as pool:
        box = Box(tmp_path, pool)
        stored = spool_bomb(box.spool, bomb)
        peaks: dict[int, int] = {}
        done = threading.Event()

        def sample() -> None:  # the worker's VmHWM, read while it lives
            while not done.wait(0.05):
                for pid in worker_pids(pool):
                    with contextlib.suppress(OSError, AssertionError):  # not started, or gone
                        peaks[pid] = max(peaks.get(pid, 0), vm_hwm(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tracemalloc.start()
        try:
            box.packer.pack(stored.segment_id)
            pack_thread_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            for pid in worker_pids(pool):
                peaks[pid] = max(peaks.get(pid, 0), vm_hwm(pid))
            done.set()
            sampler.join()
    [(entry, data)] = box.bundle(stored.segment_id)
    assert (entry.action, entry.reason) == ("passthrough", "inflated-too-large")
    assert entry.transfer_syntax == entry.received_transfer_syntax == DeflatedExplicitVRLittleEndian
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(bomb.read_bytes()).hexdigest()
    worker = max(peaks.values())
    print(f"\nworker VmHWM {worker / MiB:.0f} MiB, pack thread allocated at most "
          f"{pack_thread_peak / MiB:.1f} MiB (the bomb inflates to {inflated_size(bomb) / MiB:.0f} MiB)")
    assert worker < 256 * MiB, f"worker peak RSS {worker / MiB:.0f} MiB"
    assert pack_thread_peak < 16 * MiB


def die(*_: Any) -> None:
    """Stands in for `prepare` in a worker: the worker dies on the instance."""
    os.kill(os.getpid(), signal.SIGKILL)


def forbidden(*_: Any, **__: Any) -> None:
    raise AssertionError("the packing process parsed or inflated an instance")


def test_after_the_workers_died_on_a_deflated_instance_it_is_passed_through_unparsed(
        tmp_path: Path, bomb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash fallback runs in the packing process (the daemon): it copies the sealed
    spool file chunk by chunk and reads our own file meta, nothing else. It used to run
    `prepare` (pydicom's dcmread, which inflates a deflated data set whole) there."""
    monkeypatch.setattr(packer_mod, "prepare", die)
    with CodecPool(workers=1) as dying:
        box = Box(tmp_path, dying)
        stored = spool_bomb(box.spool, bomb)
        for name in ("compress", "decompress", "_parse_dataset"):
            monkeypatch.setattr(codec, name, forbidden)
        monkeypatch.setattr(elements, "_parse_dataset", forbidden)  # where codec's helpers find it
        monkeypatch.setattr(part10, "inflate", forbidden)
        monkeypatch.setattr(zlib, "decompressobj", forbidden)
        monkeypatch.setattr(zlib, "decompress", forbidden)
        monkeypatch.setattr(pydicom, "dcmread", forbidden)
        tracemalloc.start()
        try:
            box.packer.pack(stored.segment_id)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    [(entry, data)] = box.bundle(stored.segment_id)
    assert (entry.action, entry.reason) == ("passthrough", "worker-crashed")
    assert data == bomb.read_bytes()
    assert entry.received_sha256 == entry.sha256
    assert peak < 16 * MiB
    assert list(box.spool.dir.iterdir()) == []


CT_SLICE = SAMPLES / "series/CT_Philips_Ingenuity_phantom_28sl/I120"


def small_deflated() -> bytes:
    """A real 512 x 512 CT slice in Deflated Explicit VR LE (~0.5 MiB inflated)."""
    ds = pydicom.dcmread(CT_SLICE)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


INFLATED = len(CT_SLICE.read_bytes())  # about what its data set inflates to


def test_a_deflated_instance_within_the_cap_is_inflated_and_compressed() -> None:
    raw = small_deflated()
    r = codec.compress(raw, "jpeg2000", max_inflated=INFLATED)
    assert (r.action, r.transfer_syntax) == ("compressed", JPEG2000Lossless)
    assert "inflated" in r.notes


def test_a_deflated_instance_over_the_cap_is_passed_through_as_it_came() -> None:
    raw = small_deflated()
    r = codec.compress(raw, "jpeg2000", max_inflated=INFLATED // 2)
    assert (r.action, r.reason) == ("passthrough", "inflated-too-large")
    assert r.data is raw
    assert r.transfer_syntax == DeflatedExplicitVRLittleEndian


def test_decompress_inflates_no_more_than_its_output_cap() -> None:
    raw = small_deflated()
    assert pydicom.dcmread(io.BytesIO(codec.decompress(raw, max_output=INFLATED))).PixelData
    with pytest.raises(codec.CodecError, match="inflated-too-large"):
        codec.decompress(raw, max_output=INFLATED // 2)


def test_decompress_decodes_nothing_whose_attributes_say_it_is_over_the_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """512 x 512 x 16 bit says 512 KiB decoded: with a smaller cap the decoder never runs."""
    j2k = codec.compress(CT_SLICE.read_bytes(), "jpeg2000", verify=False).data
    assert len(codec.decompress(j2k, max_output=len(j2k) + 512 * 1024)) > 512 * 1024
    monkeypatch.setattr(codec, "_pydicom_decompress", forbidden)
    with pytest.raises(codec.CodecError, match="decoded-too-large"):
        codec.decompress(j2k, max_output=len(j2k) + 512 * 1024 - 1)


def test_the_inflation_cap_is_the_max_instance_size_and_no_more_than_the_in_memory_path() -> None:
    assert inflate_cap(Pack(stream_threshold_mb=64), 4096 * MiB) == 64 * MiB
    assert inflate_cap(Pack(stream_threshold_mb=64), 16 * MiB) == 16 * MiB


def test_the_packer_takes_the_max_instance_size_at_construction(tmp_path: Path) -> None:
    with CodecPool(workers=1) as pool:
        box = Box(tmp_path, pool, max_instance_bytes=8 * MiB)
    assert box.packer.inflate_cap == 8 * MiB


def test_the_streaming_path_never_inflates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deflated instance over pack.stream_threshold_mb is sent as it came by the
    streaming path, which reads its file meta and nothing inflated."""
    monkeypatch.setattr(part10, "inflate", forbidden)
    monkeypatch.setattr(zlib, "decompressobj", forbidden)
    raw = small_deflated()
    key = os.urandom(32)
    with open(tmp_path / "r1", "wb") as f:
        crypto.seal_spool_parts(crypto.SpoolKey(key), "r1", [raw], f)
    s = stream_pack.prepare_stream(str(tmp_path / "r1"), "r1", key, "jpeg2000", True,
                                   str(tmp_path / ".tmp-pack-x"))
    assert (s.action, s.reason) == ("passthrough", "stream-unsupported")
    assert s.facts is not None and s.facts["received_size"] == len(raw)


def sample_files() -> Iterator[Path]:
    return (p for p in sorted(SAMPLES.rglob("*")) if p.is_file() and p.suffix not in (".md", ".json"))


def test_manifest_facts_from_the_file_meta_are_pydicoms_on_every_sample() -> None:
    """What `meta_facts` reads from the file meta is what dcmread gave, for every sample
    whose meta has the three elements (every spool file has: receive writes them)."""
    compared = 0
    for f in sample_files():
        raw = f.read_bytes()
        try:
            fm = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta
            want = {"sop_instance_uid": str(fm.MediaStorageSOPInstanceUID),
                    "sop_class": str(fm.MediaStorageSOPClassUID),
                    "received_transfer_syntax": str(fm.TransferSyntaxUID)}
        except Exception:  # noqa: S112 - no meta, or one without these: not comparable
            continue
        assert stream_pack.meta_facts(raw, part10.meta(raw)) == want, f
        compared += 1
    assert compared > 350


def deflated_image(path: Path, n: int) -> Path:
    """An n x n 16-bit smooth image (n * n * 2 bytes of pixels) in Deflated Explicit VR LE."""
    ds = pydicom.dcmread(CT_SLICE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = n
    ramp = (np.add.outer(np.arange(n), np.arange(n)) % 4096).astype("<u2")
    ds.PixelData = ramp.tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.peers
def test_the_daemon_caps_inflation_at_its_configured_max_instance_size(
        appliance_factory: Callable[..., Appliance], tmp_path: Path) -> None:
    """`appliance run` with receive.max_instance_mb = 4: of two deflated images sent by
    storescu -xd, the one that inflates to 2 MiB is compressed, the one that inflates to
    8 MiB goes into the bundle as it came (the default cap would have been 64 MiB)."""
    root = tmp_path / "a"
    cfg = base_config(root, free_port(), max_instance_mb=4)
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 30}
    (root / "outbox").mkdir(parents=True)
    app = appliance_factory(cfg, root=root)
    small, large = deflated_image(tmp_path / "2m.dcm", 1024), deflated_image(tmp_path / "8m.dcm", 2048)
    assert max(small.stat().st_size, large.stat().st_size) < 1 * MiB
    sent = storescu(app.port, [small, large], extra=["-xd"])
    assert sent.returncode == 0, sent.stderr[-2000:]
    [path] = wait_for(lambda: list((root / "outbox").glob("*.bundle")), 180, "a bundle", detail=app.log_text)
    with path.open("rb") as f:
        got = {entry.sop_instance_uid: entry for entry, _ in
               bundle.iter_instances(f, crypto.load_private_key(root / "keys" / "appliance.key"))}
    assert (got[uid(small)].action, got[uid(small)].reason) == ("compressed", "ok")
    assert (got[uid(large)].action, got[uid(large)].reason) == ("passthrough", "inflated-too-large")
    assert got[uid(large)].transfer_syntax == DeflatedExplicitVRLittleEndian


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
