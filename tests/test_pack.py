"""The packer: sealing rules, and what it does with instances it cannot read."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.bundle import format as bundle
from appliance.core import crypto
from appliance.core.config import Pack
from appliance.pack.packer import Packer, SegmentTimes, due_for_sealing
from appliance.pack.pool import CodecPool
from appliance.queue.index import open_index
from appliance.queue.store import Queue
from appliance.receive.scp import identify_stored
from appliance.spool.store import Spool
from tests.peers import SAMPLES


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
    from appliance.pack.packer import may_pack_now
    cfg = Pack(segment_max_age_s=10)
    assert may_pack_now(sealed_at=100, receiving_burst=False, cfg=cfg, now=100)
    assert not may_pack_now(sealed_at=100, receiving_burst=True, cfg=cfg, now=109)
    assert may_pack_now(sealed_at=100, receiving_burst=True, cfg=cfg, now=110)
