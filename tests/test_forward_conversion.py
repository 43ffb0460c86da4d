"""Conversion for a PACS that refuses an instance's syntax runs in worker processes
(`forward.conversion`), capped: the output is byte for byte what `codec.decompress`
gives; a decoder that crashes, hangs or balloons costs that instance (Permanent) and a
worker, never the daemon; nothing completes unless its source was read to its verified
end."""

from __future__ import annotations

import ctypes
import io
import os
import socket
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from appliance.core import part10
from appliance.core.errors import IntegrityError
from appliance.forward import Permanent, conversion
from appliance.forward.dicom import transport as transport_mod
from appliance.pack import codec
from tests.e2e_support import appliance_config, dicom_destination, queue_rows, settled
from tests.orthanc import Orthanc
from tests.peers import Appliance, free_port, storescu, wait_for
from tests.test_end_to_end import make_study, series
from tests.test_forward_dicom import (  # noqa: F401 - pacs_factory, transports: fixtures
    CT_DIR,
    Progress,
    destination,
    j2k,
    make_bundle,
    pacs_factory,
    stored_ts,
    transport,
    transports,
    uid_of,
)
from tests.test_stream_convert import reencapsulate, write_j2k_multiframe
from tests.test_stream_pack import multiframe

MiB = 1 << 20


def ct_j2k() -> bytes:
    return j2k(sorted(CT_DIR.iterdir())[0].read_bytes())


def balloon(raw_j2k: bytes, size: int = 20000) -> bytes:
    """`raw_j2k` with its codestream's SIZ marker saying `size` x `size` (the header
    still says 512 x 512): OpenJPEG allocates and touches ~2.3 GiB for 20000 before it
    fails. A quarter MiB that balloons whatever decodes it."""
    at = raw_j2k.index(b"\xff\x4f\xff\x51") + 4  # SOC, then the SIZ marker segment
    out = bytearray(raw_j2k)
    struct.pack_into(">LLLLLL", out, at + 4, size, size, 0, 0, size, size)
    return bytes(out)


def data_set(part10_file: bytes) -> bytes:
    return part10_file[part10.dataset_offset(part10_file):]


def job(raw: bytes, how: str = "explicit", streamed: bool = False,
        max_output: int = 1 << 30) -> conversion.Job:
    ts = str(pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return conversion.Job(how, ts, len(raw), streamed, max_output)


def convert(c: conversion.Converter, raw: bytes, **kw: Any) -> bytes:
    with c.open(job(raw, **kw), io.BytesIO(raw).read) as conv:
        return conv.read_all()


@pytest.fixture
def converter() -> Iterator[conversion.Converter]:
    c = conversion.Converter(workers=1)
    yield c
    c.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- what comes out ---------------------------------------------------------------------


def test_a_whole_conversion_is_codec_decompress_byte_for_byte_in_one_reused_worker(
        converter: conversion.Converter) -> None:
    raw = ct_j2k()
    assert convert(converter, raw) == data_set(codec.decompress(raw))
    [pid] = converter.pids()
    assert pid != os.getpid()
    assert convert(converter, raw) == data_set(codec.decompress(raw))
    assert converter.pids() == [pid]


def test_a_streamed_conversion_is_codec_decompress_byte_for_byte(converter: conversion.Converter) -> None:
    raw = j2k(multiframe(frames=12))
    with converter.open(job(raw, streamed=True), io.BytesIO(raw).read) as conv:
        assert conv.streaming and conv.whole_reason is None
        out = conv.read_all()
    assert out == data_set(codec.decompress(raw))


def test_a_layout_the_stream_cannot_map_goes_whole_in_the_worker(converter: conversion.Converter) -> None:
    raw = reencapsulate(j2k(multiframe(frames=4, rows=64, columns=64)),
                        lambda f: encapsulate(f, fragments_per_frame=2, has_bot=False))
    with converter.open(job(raw, streamed=True), io.BytesIO(raw).read) as conv:
        assert not conv.streaming
        assert conv.whole_reason == "no offset table, and the first fragment is not a whole frame"
        out = conv.read_all()
    assert out == data_set(codec.decompress(raw))


def test_an_implicit_conversion_is_pydicoms_encoding(converter: conversion.Converter) -> None:
    raw = ct_j2k()
    want = encode(pydicom.dcmread(io.BytesIO(codec.decompress(raw)), force=True), True, True)
    got = convert(converter, raw, how="implicit")
    assert got == want
    ds = read_dataset(io.BytesIO(got), is_implicit_VR=True, is_little_endian=True)
    assert ds.SOPInstanceUID == uid_of(raw)


# --- what cannot be converted ----------------------------------------------------------------


def test_a_codestream_that_does_not_decode_is_refused_and_the_worker_kept(
        converter: conversion.Converter) -> None:
    good = ct_j2k()
    bad = reencapsulate(good, lambda f: encapsulate([f[0][: len(f[0]) // 3]], has_bot=True))
    convert(converter, good)
    [pid] = converter.pids()
    with pytest.raises(conversion.ConversionFailed) as e:
        convert(converter, bad)
    assert e.value.kind == "undecodable" and "decode-error" in str(e.value)
    assert convert(converter, good) == data_set(codec.decompress(good))
    assert converter.pids() == [pid]


def test_output_over_the_cap_is_refused_before_decoding(converter: conversion.Converter) -> None:
    raw = ct_j2k()  # 512 x 512 x 16 bit: 512 KiB of pixels
    with pytest.raises(conversion.ConversionFailed, match="decoded-too-large") as e:
        convert(converter, raw, max_output=256 * 1024)
    assert e.value.kind == "undecodable"
    with pytest.raises(conversion.ConversionFailed, match="decoded-too-large"):
        convert(converter, j2k(multiframe(frames=12)), streamed=True, max_output=32 * 1024)


def test_a_decoder_that_balloons_is_killed_at_the_memory_limit_and_the_daemon_untouched(
        converter: conversion.Converter) -> None:
    """A 20000 x 20000 SIZ in a 512 x 512 slice: the decoder would touch 2.3 GiB. The
    worker is killed at its limit (512 MiB + 16 x the instance above its idle size); the
    calling process allocates nothing of it; the next instance gets a fresh worker."""
    good, bad = ct_j2k(), balloon(ct_j2k())
    convert(converter, good)
    [pid] = converter.pids()
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(conversion.ConversionFailed, match="memory limit") as e:
            convert(converter, bad)
        seconds = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.kind == "worker"
    print(f"\nballoon: worker killed after {seconds:.1f} s; {e.value}")
    assert peak < 4 * MiB
    assert not alive(pid)
    assert convert(converter, good) == data_set(codec.decompress(good))
    assert converter.pids() != [pid]


def crash_in_decoder(sock: socket.socket) -> None:
    """A conversion worker whose frame decoder segfaults (pydicom's, which both the whole
    and the streamed conversion call), the real worker loop around it."""
    def segfault(*_: Any, **__: Any) -> None:
        ctypes.string_at(0)
    DecodeRunner._decode_frame = segfault  # type: ignore[method-assign]
    conversion._serve(sock)


def hang_in_decoder(sock: socket.socket) -> None:
    """A conversion worker whose frame decoder never returns."""
    def hang(*_: Any, **__: Any) -> None:
        time.sleep(3600)
    DecodeRunner._decode_frame = hang  # type: ignore[method-assign]
    conversion._serve(sock)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_decoder_crash_fails_the_instance_not_the_caller(streamed: bool) -> None:
    with conversion.Converter(workers=1, serve=crash_in_decoder) as c:
        with pytest.raises(conversion.ConversionFailed, match=r"worker died \(SIGSEGV\)") as e:
            convert(c, ct_j2k(), streamed=streamed)
        assert e.value.kind == "worker"
        with pytest.raises(conversion.ConversionFailed, match="SIGSEGV"):  # a fresh worker, same fate
            convert(c, ct_j2k(), streamed=streamed)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_hung_decoder_is_killed_at_the_time_limit(monkeypatch: pytest.MonkeyPatch, streamed: bool) -> None:
    monkeypatch.setattr(conversion, "TIME_BASE_S", 2.0)
    monkeypatch.setattr(conversion, "TIME_PER_MIB_S", 0.0)
    with conversion.Converter(workers=1, serve=hang_in_decoder) as c:
        t0 = time.monotonic()
        with pytest.raises(conversion.ConversionFailed, match="longer than its time limit"):
            convert(c, ct_j2k(), streamed=streamed)
        assert time.monotonic() - t0 < 10
        assert c.pids() == []  # killed, not kept


def test_nothing_completes_unless_the_source_ends_verified(
        converter: conversion.Converter, tmp_path: Path) -> None:
    """A source that gives every byte but then fails its check (as a bundle's
    InstanceStream does when the file changed): the conversion raises, never ends."""
    write_j2k_multiframe(tmp_path / "mf.dcm", frames=8)  # 512 x 512 noise: ~2.7 MiB
    raw = (tmp_path / "mf.dcm").read_bytes()
    src = io.BytesIO(raw)

    def read(n: int) -> bytes:
        piece = src.read(n)
        if not piece:
            raise IntegrityError("instance does not match the manifest")
        return piece

    got = bytearray()
    with pytest.raises(IntegrityError), converter.open(job(raw, streamed=True), read) as conv:
        while piece := conv.read(1 << 20):  # b"" (the end) would leave the loop: no error
            got += piece
    assert 0 < len(got) <= len(data_set(codec.decompress(raw)))
    assert converter.pids() == []  # the worker was mid-job: killed
    assert convert(converter, ct_j2k()) == data_set(codec.decompress(ct_j2k()))


def test_a_busy_converter_is_unavailable_not_blocking(
        converter: conversion.Converter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion, "CHECKOUT_S", 0.5)
    raw = j2k(multiframe(frames=12))
    with (converter.open(job(raw, streamed=True), io.BytesIO(raw).read),
          pytest.raises(conversion.Unavailable, match="busy")):
        convert(converter, ct_j2k())


# --- through the transport, to a PACS that refuses JPEG 2000 -----------------------------------


def refusing_j2k(pacs_factory: Callable[..., Orthanc]) -> Orthanc:  # noqa: F811
    return pacs_factory(extra={"Jpeg2000TransferSyntaxAccepted": False})


@pytest.mark.peers
def test_an_instance_that_balloons_the_decoder_is_permanent_and_the_transport_goes_on(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any]) -> None:  # noqa: F811
    pacs = refusing_j2k(pacs_factory)
    t = transport(transports, destination(pacs.dicom_port))
    bad = balloon(ct_j2k())
    with pytest.raises(Permanent, match=r"^instance 0: cannot be converted for this PACS: .*memory") as e:
        t.send("bad", make_bundle(tmp_path / "bad.bundle", [bad]), Progress())
    assert uid_of(bad) not in str(e.value)
    assert pacs.count() == 0
    good = ct_j2k()
    t.send("good", make_bundle(tmp_path / "good.bundle", [good], "b-2"), Progress())
    oid = pacs.find_instance(uid_of(good))
    assert oid is not None and stored_ts(pacs, oid) == ExplicitVRLittleEndian
    assert data_set(pacs.instance_file(oid)) == data_set(codec.decompress(good))


@pytest.mark.peers
@pytest.mark.parametrize("threshold", [transport_mod.STREAM_THRESHOLD, 0])
def test_a_conversion_worker_crash_is_permanent_for_that_bundle(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, threshold: int) -> None:
    """Whole and streamed: the decoder segfaults in the worker; the send is Permanent
    with the reason, Orthanc stores nothing, and the caller lives on."""
    monkeypatch.setattr(transport_mod, "STREAM_THRESHOLD", threshold)
    pacs = refusing_j2k(pacs_factory)
    crashing = conversion.Converter(workers=1, serve=crash_in_decoder)
    t = transport(transports, destination(pacs.dicom_port), converter=crashing)
    raw = ct_j2k()
    with pytest.raises(Permanent, match=r"^instance 0: cannot be converted for this PACS: .*SIGSEGV"):
        t.send("b", make_bundle(tmp_path / "b.bundle", [raw]), Progress())
    assert pacs.count() == 0


@pytest.mark.peers
def test_the_transport_converts_with_the_configured_cap(
        tmp_path: Path, pacs_factory: Callable[..., Orthanc], transports: list[Any]) -> None:  # noqa: F811
    """max_instance_bytes (the daemon passes receive.max_instance_mb) caps what a
    conversion may give: a slice that decodes to more is Permanent, refused before decoding."""
    pacs = refusing_j2k(pacs_factory)
    raw = ct_j2k()
    t = transport(transports, destination(pacs.dicom_port), max_instance_bytes=256 * 1024)
    with pytest.raises(Permanent, match=r"cannot be decompressed \(decoded-too-large\)"):
        t.send("b", make_bundle(tmp_path / "b.bundle", [raw]), Progress())
    assert pacs.count() == 0


# --- the real daemon --------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.peers
def test_the_daemon_lives_through_an_instance_that_balloons_the_decoder(
        appliance_factory: Callable[..., Appliance], pacs_factory: Callable[..., Orthanc],  # noqa: F811
        tmp_path: Path) -> None:
    """`appliance run` forwarding to an Orthanc that refuses JPEG 2000: a modality sends
    a JPEG 2000 slice whose codestream balloons the decoder (storescu -xv). The instance is
    parked with the reason (its bundle is then delivered without it), the daemon stays
    small and alive, and the next study (packed to JPEG 2000 by the daemon, converted back
    for this PACS) arrives with its pixels."""
    pacs = refusing_j2k(pacs_factory)
    root = tmp_path / "app"
    app = appliance_factory(appliance_config(root, free_port(), dicom_destination(pacs.dicom_port)),
                            root=root)
    assert app.proc is not None
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(balloon(ct_j2k()))
    sent = storescu(app.port, [bad], extra=["-xv", "-v"])
    assert sent.returncode == 0 and "Received Store Response (Success)" in sent.stderr, sent.stderr[-2000:]
    rows = wait_for(lambda: settled(app.state_dir, ("held", "delivered")), 180,
                    "the instance to be parked", detail=app.log_text)
    [held] = [r for r in rows if r["state"] == "held"]
    assert held["parent"] is not None  # a parked instance, not a held bundle
    shown = {r["id"]: r for r in queue_rows(app.config_path)}
    reason = shown[held["id"]]["reason"]
    assert "cannot be converted for this PACS" in reason and "memory" in reason, reason
    assert uid_of(bad.read_bytes()) not in reason

    good = make_study(series("CT_Philips_Ingenuity_phantom_28sl")[:3], tmp_path / "good", "E2E-GOOD")
    sent = storescu(app.port, good)
    assert sent.returncode == 0, sent.stderr[-2000:]
    wait_for(lambda: pacs.count() == len(good), 180, "the next study in Orthanc", detail=app.log_text)
    for f in good:
        oid = pacs.find_instance(uid_of(f.read_bytes()))
        assert oid is not None and stored_ts(pacs, oid) == ExplicitVRLittleEndian
        stored = pydicom.dcmread(io.BytesIO(pacs.instance_file(oid)))
        assert stored.PixelData == pydicom.dcmread(f).PixelData
    assert app.proc.poll() is None
    hwm = vm_hwm(app.proc.pid)
    print(f"\ndaemon VmHWM {hwm / MiB:.0f} MiB; held: {reason}")
    assert hwm < 400 * MiB
    assert "conversion.worker_killed" in app.log_text()
