"""`bundle.VerifiedBundle` / `InstanceStream`: a bundle's instances read piece by piece
after a verified first pass, for a forwarder that must hold neither a whole large instance
in memory nor plaintext on disk. The end of a stream (b"") is the proof that the instance
is whole and unaltered; a file that changed between the passes must never produce it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from pathlib import Path
from typing import BinaryIO

import pytest

from appliance.bundle import format as bundle
from appliance.bundle.format import BundleWriter, InstanceStream, VerifiedBundle
from appliance.core import crypto
from appliance.core.errors import IntegrityError
from tests.test_bundle import BID, CHUNK, KEY_A, KEY_B, _manifest, _rec, info, make

D, E = bundle.REC_DATA, bundle.REC_END


def read_all(stream: InstanceStream, n: int) -> bytes:
    out = bytearray()
    while piece := stream.read(n):
        assert len(piece) <= n
        out += piece
    return bytes(out)


INSTANCES = [
    [b"a" * 100],
    [],  # an empty instance
    [b"b" * 5, b"c" * 3, b"d" * 200],  # several DATA records across chunks
    [os.urandom(1000)],
]


@pytest.mark.parametrize("n", [1, 7, CHUNK, 4096])
def test_streams_give_the_same_bytes_as_iter_instances(n: int) -> None:
    blob = make(INSTANCES)
    expected = list(bundle.iter_instances(io.BytesIO(blob), KEY_A))
    assert [d for _, d in expected] == [b"".join(p) for p in INSTANCES]
    vb = VerifiedBundle(io.BytesIO(blob), KEY_A)
    assert vb.manifest == bundle.read_manifest(io.BytesIO(blob), KEY_A)
    got = [(e, read_all(s, n)) for e, s in vb.streams()]
    assert got == expected


def test_read_all_at_once_and_read_zero() -> None:
    blob = make(INSTANCES)
    streams = VerifiedBundle(io.BytesIO(blob), KEY_A).streams()
    e, s = next(streams)
    assert s.size == e.size == 100
    assert s.read(0) == b""
    assert s.read(10) == b"a" * 10
    assert s.read() == b"a" * 90
    assert s.read() == b"" and s.read(5) == b""


def test_a_stream_left_unread_is_verified_and_skipped() -> None:
    blob = make(INSTANCES)
    vb = VerifiedBundle(io.BytesIO(blob), KEY_A)
    got = {}
    for e, s in vb.streams():
        if e.index in (0, 3):
            got[e.index] = s.read()
        elif e.index == 2:
            s.read(3)  # part read, the rest skipped
    assert got == {0: b"a" * 100, 3: b"".join(INSTANCES[3])}


def test_streams_can_be_read_again_from_the_start() -> None:
    blob = make(INSTANCES)
    vb = VerifiedBundle(io.BytesIO(blob), KEY_A)
    first = [s.read() for _, s in vb.streams()]
    assert [s.read() for _, s in vb.streams()] == first


def test_an_invalid_bundle_fails_before_any_stream() -> None:
    blob = bytearray(make(INSTANCES))
    blob[-1] ^= 1
    with pytest.raises(IntegrityError, match="authentication failed"):
        VerifiedBundle(io.BytesIO(bytes(blob)), KEY_A)
    with pytest.raises(IntegrityError, match="no recipient entry"):
        VerifiedBundle(io.BytesIO(make(INSTANCES)), KEY_B)


# --- the file changes between the verifying pass and the streaming pass -----------------


def _twins(body_a: bytes, body_b: bytes) -> tuple[bytes, bytes]:
    """Two bundles with the same header and data key (as only a holder of the data key
    could make), so that swapping one for the other passes the header check and every
    chunk of the second pass opens: only the instance checks can notice."""
    out = io.BytesIO()
    header, key = bundle._start(out, BID, [KEY_A.public_key()], CHUNK, 1700000000)
    sealed = []
    for body in (body_a, body_b):
        dst = io.BytesIO()
        dst.write(header)
        crypto.stream_seal(key, header, io.BytesIO(body), dst, CHUNK)
        sealed.append(dst.getvalue())
    return sealed[0], sealed[1]


def _body(*datas: bytes) -> bytes:
    return b"".join(_rec(D, d) + _rec(E, b"") for d in datas) + _manifest(list(datas))


def _swap_after_first_pass(path: Path, a: bytes, b: bytes) -> tuple[VerifiedBundle, BinaryIO]:
    path.write_bytes(a)
    f = path.open("rb")
    vb = VerifiedBundle(f, KEY_A)
    with path.open("r+b") as w:  # the same inode, rewritten: what the open file reads next
        w.truncate(0)
        w.write(b)
    return vb, f


def assert_never_ends_cleanly(stream: InstanceStream, n: int,
                              match: str = "changed while it was being read") -> bytes:
    """Read until the stream raises; it must raise, and keep raising, instead of b""."""
    got = bytearray()
    with pytest.raises(IntegrityError, match=match):
        while True:
            piece = stream.read(n)
            assert piece != b"", "the stream reported a clean end for altered data"
            got += piece
    for again in (n, -1):
        with pytest.raises(IntegrityError):
            stream.read(again)
    with pytest.raises(IntegrityError):
        stream.drain()
    return bytes(got)


GOOD = bytes(range(256)) * 3  # 768 bytes: 12 chunks of 64


@pytest.mark.parametrize(("case", "altered"), [
    ("same size, one byte changed", GOOD[:700] + b"X" + GOOD[701:]),
    ("shorter", GOOD[:-1]),
    ("longer", GOOD + b"!"),
])
def test_an_instance_altered_between_the_passes_never_ends_cleanly(
        tmp_path: Path, case: str, altered: bytes) -> None:
    a, b = _twins(_body(GOOD), _body(altered))
    vb, f = _swap_after_first_pass(tmp_path / "b.bundle", a, b)
    try:
        entry, stream = next(vb.streams())
        assert entry.sha256 == hashlib.sha256(GOOD).hexdigest()
        got = assert_never_ends_cleanly(stream, 100)
        # It handed out bytes before it knew (that is why a consumer holds back its last
        # piece), but never more than the verified size.
        assert len(got) <= len(GOOD)
    finally:
        f.close()


def test_a_bundle_truncated_between_the_passes_never_ends_cleanly(tmp_path: Path) -> None:
    a = make([[GOOD]])
    vb, f = _swap_after_first_pass(tmp_path / "b.bundle", a, a[: len(a) // 2])
    try:
        _, stream = next(vb.streams())
        assert_never_ends_cleanly(stream, 64, match="authentication failed at chunk")
    finally:
        f.close()


def test_a_bundle_replaced_between_the_passes_fails_before_any_stream(tmp_path: Path) -> None:
    a, b = make([[GOOD]]), make([[GOOD]])  # same content, another data key
    vb, f = _swap_after_first_pass(tmp_path / "b.bundle", a, b)
    try:
        with pytest.raises(IntegrityError, match="changed while it was being read"):
            next(vb.streams())
    finally:
        f.close()


def test_an_instance_added_between_the_passes_is_noticed(tmp_path: Path) -> None:
    a, b = _twins(_body(GOOD), _body(GOOD, b"extra"))
    vb, f = _swap_after_first_pass(tmp_path / "b.bundle", a, b)
    try:
        streams = vb.streams()
        _, s = next(streams)
        assert s.read() == GOOD  # instance 0 itself is intact
        with pytest.raises(IntegrityError, match="changed while it was being read"):
            next(streams)
    finally:
        f.close()


# --- memory ---------------------------------------------------------------------------


def test_streaming_memory_is_bounded_by_a_few_chunks(tmp_path: Path) -> None:
    chunk = 64 * 1024
    src = tmp_path / "b.bundle"
    piece = os.urandom(1 << 20)
    with src.open("wb") as f:
        w = BundleWriter(f, BID, [KEY_A.public_key()], "s", chunk)
        w.begin_instance(info())
        for _ in range(16):  # a 16 MiB instance
            w.write(piece)
        w.end_instance()
        w.close()
    expected = hashlib.sha256(piece * 16).hexdigest()
    del piece
    h = hashlib.sha256()
    total = 0
    tracemalloc.start()
    try:
        with src.open("rb") as f:
            for _, s in VerifiedBundle(f, KEY_A).streams():
                while data := s.read(16 * 1024):
                    h.update(data)
                    total += len(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 16 << 20 and h.hexdigest() == expected
    assert peak < 8 * chunk, f"peak {peak} bytes"
