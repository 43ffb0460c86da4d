"""The packer: sealing rules, and what it does with instances it cannot read."""

from __future__ import annotations

import errno
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.bundle import format as bundle
from appliance.core import crypto
from appliance.core.config import Pack
from appliance.pack import policy
from appliance.pack.packer import Packer
from appliance.pack.policy import (
    PACK_ATTEMPTS,
    SegmentTimes,
    after_failure,
    due_for_sealing,
    job_limit,
)
from appliance.pack.pool import CodecPool
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.receive.identify import identify, identify_stored
from appliance.spool.store import Spool
from tests.pack_support import poisoned_instance
from tests.peers import SAMPLES, wait_for


def test_a_quiet_study_is_sealed() -> None:
    cfg = Pack(study_quiet_s=10, segment_max_age_s=60)
    assert due_for_sealing(SegmentTimes(created=100, updated=105), cfg, now=114) is None
    assert due_for_sealing(SegmentTimes(created=100, updated=105), cfg, now=115) == "quiet"


def test_a_study_still_arriving_is_sealed_by_age() -> None:
    cfg = Pack(study_quiet_s=10, segment_max_age_s=60)
    assert due_for_sealing(SegmentTimes(created=100, updated=159), cfg, now=160) == "age"


@pytest.fixture
def pool() -> Iterator[CodecPool]:
    p = CodecPool(workers=2)
    yield p
    p.close()


def _spool(tmp_path: Path) -> tuple[Spool, Queue]:
    key = crypto.create_spool_key(tmp_path / "spool.key")
    index = open_index(tmp_path)
    return Spool(tmp_path, key, index, 0), Queue(tmp_path, index)


def _part10(path: Path) -> bytes:
    """The file as the receiver would spool it (its own file meta + the data set)."""
    return path.read_bytes()


def test_an_instance_that_fails_authentication_is_quarantined_and_the_rest_packed(
        tmp_path: Path, pool: CodecPool) -> None:
    spool, queue = _spool(tmp_path)
    files = sorted((SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[:3]
    stored = [spool.store([_part10(f)], identify_stored(_part10(f))) for f in files]
    seg = stored[0].segment_id
    bad = spool.dir / stored[1].id
    raw = bytearray(bad.read_bytes())
    raw[-100] ^= 1  # one flipped bit in the last chunk
    bad.write_bytes(bytes(raw))
    with spool.index.tx() as c:
        c.execute("UPDATE segments SET state='sealed' WHERE id=?", (seg,))
    priv_path, pub_path = tmp_path / "a.key", tmp_path / "a.pub"
    crypto.create_keypair(priv_path, pub_path)
    packer = Packer(Pack(codec="jpeg-ls"), spool, queue, [crypto.load_public_key(pub_path)], pool)
    packer.pack(seg)
    assert queue.get(seg).state == "ready"
    with queue.path(seg).open("rb") as f:
        got = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
               for _, data in bundle.iter_instances(f, crypto.load_private_key(priv_path))]
    want = [pydicom.dcmread(f).SOPInstanceUID for f in (files[0], files[2])]
    assert got == want
    assert [p.name.split(".")[0] for p in spool.quarantine_dir.iterdir()] == [stored[1].id]
    assert list(spool.dir.iterdir()) == []  # packed copies removed, the bad one moved aside


def test_packing_waits_for_a_burst_but_not_longer_than_the_segment_age() -> None:
    from appliance.pack.policy import may_pack_now
    cfg = Pack(segment_max_age_s=10)
    assert may_pack_now(sealed_at=100, receiving_burst=False, cfg=cfg, now=100)
    assert not may_pack_now(sealed_at=100, receiving_burst=True, cfg=cfg, now=109)
    assert may_pack_now(sealed_at=100, receiving_burst=True, cfg=cfg, now=110)


# --- isolation: one instance, one segment ------------------------------------------------

CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def _box(tmp_path: Path, pool: CodecPool, **pack: Any) -> tuple[Spool, Queue, Packer, Any]:
    spool, queue = _spool(tmp_path)
    crypto.create_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    packer = Packer(Pack(codec="jpeg-ls", **pack), spool, queue,
                    [crypto.load_public_key(tmp_path / "a.pub")], pool)
    return spool, queue, packer, crypto.load_private_key(tmp_path / "a.key")


def _sop(raw: bytes) -> str:
    """The SOP Instance UID in the file meta (read without the data set)."""
    fp = io.BytesIO(raw)
    fp.seek(132)
    return str(pydicom.filereader._read_file_meta_info(fp).MediaStorageSOPInstanceUID)


def _store(spool: Spool, raws: list[bytes]) -> list[Any]:
    """Spool as the receiver does (`identify`), then seal the segments."""
    stored = [spool.store([raw], identify([raw], _sop(raw), "MODALITY")) for raw in raws]
    with spool.index.tx() as c:
        c.executemany("UPDATE segments SET state='sealed' WHERE id=?",
                      [(s,) for s in {x.segment_id for x in stored}])
    return stored


def _bundle(queue: Queue, seg: str, key: Any) -> list[tuple[bundle.ManifestEntry, bytes]]:
    with queue.path(seg).open("rb") as f:
        return list(bundle.iter_instances(f, key))


def test_after_failure_counts_tries_and_holds_at_the_last() -> None:
    e = ValueError("quotes a value")
    first, second, third = (after_failure(e, n) for n in range(3))
    assert [x.hold for x in (first, second, third)] == [False, False, True]
    assert [x.attempts for x in (first, second, third)] == [1, 2, 3] and PACK_ATTEMPTS == 3
    assert first.delay_s < second.delay_s
    assert third.reason == "ValueError"  # the class only: a message can quote patient data


def test_a_full_disk_is_waited_out_and_never_holds_a_segment() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    for n in range(10):
        what = after_failure(full, 2)
        assert (what.hold, what.attempts, what.reason) == (False, 2, "OSError ENOSPC"), n


def test_the_job_limit_grows_with_the_instance() -> None:
    cfg = Pack(job_timeout_s=60, job_timeout_s_per_mb=1)
    assert job_limit(0, cfg) == 60
    assert job_limit(1 << 30, cfg) == 60 + 1024  # a 1 GiB object is not killed at 60 s


def test_a_poisoned_instance_is_passed_through_and_the_rest_compressed(
        tmp_path: Path, pool: CodecPool) -> None:
    spool, queue, packer, key = _box(tmp_path, pool)
    healthy = [f.read_bytes() for f in sorted(CT.iterdir())[:2]]
    study = str(pydicom.dcmread(sorted(CT.iterdir())[0], stop_before_pixels=True).StudyInstanceUID)
    poison, _ = poisoned_instance(study)
    with pytest.raises(OSError, match="No tag to read"):  # what stopped all packing before
        pydicom.dcmread(io.BytesIO(poison))
    stored = _store(spool, [healthy[0], poison, healthy[1]])
    assert packer.pack_pending() == 1
    got = _bundle(queue, stored[0].segment_id, key)
    assert [(e.action, e.reason) for e, _ in got] == [
        ("compressed", "ok"), ("passthrough", "unparseable"), ("compressed", "ok")]
    assert got[1][1] == poison  # byte for byte as received
    assert queue.get(stored[0].segment_id).incomplete == 0


def test_a_segment_that_keeps_failing_is_held_and_the_next_one_packed(
        tmp_path: Path, pool: CodecPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "PACK_RETRY_S", 0.05)
    spool, queue, packer, key = _box(tmp_path, pool)
    files = sorted(CT.iterdir())[:2]
    first = _store(spool, [files[0].read_bytes()])[0].segment_id
    (queue.dir / f"{first}.bundle").mkdir()  # the bundle cannot be renamed into place
    second = _store(spool, [_other_study(files[1])])[0].segment_id
    wait_for(lambda: packer.pack_pending() == 0 and queue.get(first).state == "unpackable", 30,
             "the failing segment to be held")
    assert queue.get(first).reason == "pack failed: IsADirectoryError EISDIR"
    assert queue.get(second).state == "ready"
    assert spool.stats()["instances"] == 1  # the held one's instance is kept in the spool

    (queue.dir / f"{first}.bundle").rmdir()
    queue.release(first)
    assert packer.pack_pending() == 1
    assert queue.get(first).state == "ready" and len(_bundle(queue, first, key)) == 1


def test_missing_and_unreadable_instances_mark_the_segment_incomplete(
        tmp_path: Path, pool: CodecPool) -> None:
    spool, queue, packer, key = _box(tmp_path, pool)
    files = sorted(CT.iterdir())[:4]
    stored = _store(spool, [f.read_bytes() for f in files])
    seg = stored[0].segment_id
    (spool.dir / stored[1].id).unlink()  # lost after it was acknowledged
    flipped = spool.dir / stored[2].id
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 1
    flipped.write_bytes(bytes(raw))
    packer.pack(seg)
    item = queue.get(seg)
    assert (item.state, item.incomplete) == ("ready", 2)
    got = _bundle(queue, seg, key)
    want = [pydicom.dcmread(f).SOPInstanceUID for f in (files[0], files[3])]
    assert [pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for _, d in got] == want
    assert [p.name.split(".")[0] for p in spool.quarantine_dir.iterdir()] == [stored[2].id]


def _other_study(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_each_bundle_is_announced_as_soon_as_it_is_ready_and_stat_goes_first(
        tmp_path: Path, pool: CodecPool) -> None:
    """on_packed is called per segment, before the next one is packed (the forwarder may
    send the first bundle while the rest are packed), and a stat segment sealed while
    others are packed goes next, ahead of routine ones seen before it."""
    spool, queue, packer, _ = _box(tmp_path, pool)
    files = sorted(CT.iterdir())
    segs = [_store(spool, [_other_study(f)])[0].segment_id for f in files[:3]]
    late_stat = _store(spool, [_other_study(files[3])])[0].segment_id
    with queue.index.tx() as c:  # sealed "later": the routine ones were listed first
        c.execute("UPDATE segments SET created=created+100 WHERE id=?", (late_stat,))
    seen: list[tuple[str, list[str]]] = []

    def announced(seg: str) -> None:
        ready = [s for s in [*segs, late_stat] if queue.get(s).state == "ready"]
        seen.append((seg, ready))
        if seg == segs[0]:  # the stat study's instance becomes stat after packing began
            with queue.index.tx() as c:
                c.execute("UPDATE segments SET priority=10 WHERE id=?", (late_stat,))

    packer.on_packed = announced
    packer.segments_at_once = 1  # the order of places, one at a time (side by side: below)
    assert packer.pack_pending() == 4
    assert [s for s, _ in seen] == [segs[0], late_stat, segs[1], segs[2]]
    assert [len(ready) for _, ready in seen] == [1, 2, 3, 4]  # announced one at a time


def _studies(spool: Spool, n: int, per_study: int) -> list[str]:
    """`n` sealed segments of `per_study` CT slices each (a study each), oldest first."""
    files = sorted(CT.iterdir())
    segs = []
    for i in range(n):
        study = generate_uid()
        raws = []
        for f in files[i * per_study:(i + 1) * per_study]:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID = study
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            raws.append(buf.getvalue())
        segs.append(_store(spool, raws)[0].segment_id)
    return segs


def test_two_sealed_segments_are_packed_side_by_side(tmp_path: Path, pool: CodecPool) -> None:
    """The oldest segment is held inside its pack until the next one is ready: that
    happens only if the two are packed at once (one at a time, it times out first)."""
    spool, queue, packer, key = _box(tmp_path, pool)
    first, second = _studies(spool, 2, 2)
    second_ready = threading.Event()
    waited: list[bool] = []
    pack = packer._pack

    def held(seg: str, codec: str) -> int:
        if seg == first:
            waited.append(second_ready.wait(60))
        return pack(seg, codec)

    packer._pack = held  # type: ignore[method-assign]
    packer.on_packed = lambda seg: second_ready.set() if seg == second else None
    assert packer.segments_at_once == 2  # one per worker
    assert packer.pack_pending() == 2
    assert waited == [True]
    assert [len(_bundle(queue, s, key)) for s in (first, second)] == [2, 2]


def test_segments_side_by_side_start_stat_first_then_oldest(tmp_path: Path, pool: CodecPool) -> None:
    spool, queue, packer, _ = _box(tmp_path, pool)
    old, mid, new, stat = _studies(spool, 4, 1)
    with queue.index.tx() as c:
        c.execute("UPDATE segments SET priority=10 WHERE id=?", (stat,))
    started: list[str] = []
    pick = packer._next_sealed

    def noted(exclude: Any = frozenset()) -> str | None:
        seg = pick(exclude)
        if seg is not None:
            started.append(seg)
        return seg

    packer._next_sealed = noted  # type: ignore[method-assign]
    assert packer.pack_pending() == 4
    assert started == [stat, old, mid, new]


def test_segments_side_by_side_share_one_window_of_results(tmp_path: Path, pool: CodecPool) -> None:
    """Memory stays what one segment at a time held: at most `window` codec results in
    flight or waiting to be written, all segments together."""
    spool, queue, packer, key = _box(tmp_path, pool)
    segs = _studies(spool, 2, 6)
    in_flight, most = [0], [0]
    lock = threading.Lock()
    submit, write = packer._submit, packer._write

    def counted_submit(*a: Any) -> Any:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        return submit(*a)

    def counted_write(*a: Any) -> None:
        write(*a)
        with lock:
            in_flight[0] -= 1

    packer._submit = counted_submit  # type: ignore[method-assign]
    packer._write = counted_write  # type: ignore[method-assign]
    assert packer.pack_pending() == 2
    assert 0 < most[0] <= packer.window == 4
    assert in_flight[0] == 0
    assert [len(_bundle(queue, s, key)) for s in segs] == [6, 6]
