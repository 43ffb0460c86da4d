"""Identify: what a received instance is, read from its first bytes, before it is stored.

Owns the checks that decide whether a data set may enter the spool at all: the
identifying UIDs (Study, Series, SOP Instance) must be present, valid and agree with the
C-STORE request; the transfer syntax and SOP class come from the file meta. Parsing
stops right after Series Instance UID and reads a short prefix first (a small tag
scanner, `core.dicomscan`, then pydicom where it must decide); a deflated data set is
inflated only as far as its UIDs (`inflated_prefix`), never whole. Anything else raises
`Rejected` with an outcome of `receive.scp.STATUS`, never a peer's text.

Also `part10_header`: the file meta group the receiver writes in front of each data
set. Used by the SCP (receive/scp.py), the intake (receive/intake.py), routing rules
(receive/rules.py) and crash recovery (`identify_stored`, via the daemon). Pure: no I/O
besides reading the bytes given.
"""

from __future__ import annotations

import contextlib
import io
import re
import zlib
from typing import Any, BinaryIO

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag, Tag
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from appliance.core import dicomscan, part10
from appliance.spool.store import InstanceMeta, reader

log = structlog.get_logger("appliance.receive")

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and bool(_UID_RE.match(v))


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, "DICM" and the file meta group for a received data set.

    The same bytes pydicom's write_file_meta_info produces for these elements (a test
    checks it), written directly: on the receive path pydicom's general encoder cost
    ~0.5 ms per image, a tenth of the whole budget. Values come from the C-STORE request
    and the presentation context; they are only ever compared, never used as paths.
    """
    def enc(v: str) -> bytes:
        return v.encode("latin-1", "replace")

    return part10.file_meta([
        part10.element(0x00020001, b"OB", b"\x00\x01"),
        part10.element(0x00020002, b"UI", enc(sop_class)),
        part10.element(0x00020003, b"UI", enc(sop_instance)),
        part10.element(0x00020010, b"UI", enc(transfer_syntax)),
        part10.element(0x00020012, b"UI", enc(PYNETDICOM_IMPLEMENTATION_UID)),
        part10.element(0x00020013, b"SH", enc(PYNETDICOM_IMPLEMENTATION_VERSION)),
        part10.element(0x00020016, b"AE", enc(source_ae)),
    ])



class Rejected(Exception):
    """A data set we refuse; `outcome` is a key of STATUS."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome



_IDENTIFYING_TAGS: list[BaseTag | int] = [Tag(k) for k in (
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]


# identify() parses this much of an instance first; the UIDs are near the start.
IDENTIFY_PREFIX = 64 << 10


def _read_identifiers(src: BinaryIO) -> tuple[Any, bool]:
    """Parse up to the first element after Series Instance UID; (dataset, got that far)."""
    reached = False

    def past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal reached
        reached = bool(tag > 0x0020000E)
        return reached

    return read_partial(src, past_series_uid, specific_tags=_IDENTIFYING_TAGS), reached


def leading(parts: list[bytes | memoryview], n: int) -> bytes:
    out = bytearray()
    for p in parts:
        out += p[: n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


def identify(parts: list[bytes | memoryview], request_sop_uid: str, calling_ae: str,
             *, complete: bool = True) -> InstanceMeta:
    """Read the identifying UIDs of a Part-10 instance (given in pieces); raise Rejected if unusable.

    Parsing stops right after Series Instance UID (elements are in ascending tag order;
    the rest of the header cost ~4x as much), and first tries only the leading
    `IDENTIFY_PREFIX` bytes from a BytesIO: pydicom's many small reads through a Python
    file object cost more than the parse itself. If that prefix does not reach past the
    UIDs, all of `parts` is parsed. `complete=False` says `parts` is only the start of the
    instance (one sealed to disk as it arrived): the UIDs must then lie within it. A
    deflated data set is never inflated whole (see `_deflated_identifiers`).
    """
    return _checked(*_identifiers(parts, complete), request_sop_uid, calling_ae)


Identifiers = tuple[Any, Any, Any, str, str]  # study, series, SOP instance, syntax, SOP class


def _identifiers(parts: list[bytes | memoryview], complete: bool) -> Identifiers:
    total = sum(len(p) for p in parts)
    head = leading(parts, IDENTIFY_PREFIX)
    fast = dicomscan.scan_identifiers(head)
    if fast is not None:
        return (fast.get(dicomscan.STUDY_INSTANCE_UID), fast.get(dicomscan.SERIES_INSTANCE_UID),
                fast.get(dicomscan.SOP_INSTANCE_UID), fast[dicomscan.TRANSFER_SYNTAX],
                fast[dicomscan.MEDIA_SOP_CLASS])
    meta = dicomscan.file_meta(head)
    if meta is not None and meta[1][dicomscan.TRANSFER_SYNTAX] == dicomscan.DEFLATED:
        return _deflated_identifiers(parts, *meta)
    ds = None
    if len(head) < total or not complete:
        with contextlib.suppress(Exception):  # truncated prefix: any error means "parse it all"
            parsed, reached = _read_identifiers(io.BytesIO(head))
            ds = parsed if reached else None
    try:
        if ds is None:
            ds, reached = _read_identifiers(io.BytesIO(head) if len(head) == total else reader(parts))
            if not (complete or reached):
                raise EOFError("identifying UIDs not within the part of the instance kept")
        study, series, sop = (ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        ts = str(ds.file_meta.TransferSyntaxUID)
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
    except _PARSE_ERRORS:
        raise Rejected("unparseable") from None
    return study, series, sop, ts, sop_class


_PARSE_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError,
                 OverflowError, NotImplementedError, UnicodeError, IndexError, OSError, zlib.error)

# A deflated data set is inflated only this far to find its UIDs: first the short
# prefix, then (UIDs behind a long element or sequence) the long one, never more. pydicom
# would inflate it whole: 0.5 MiB on the wire can be 512 MiB inflated.
DEFLATED_PREFIXES = (64 << 10, 4 << 20)


def _deflated_identifiers(parts: list[bytes | memoryview], start: int, meta: dict[int, str]) -> Identifiers:
    for limit in DEFLATED_PREFIXES:
        try:
            data, whole = inflated_prefix(parts, start, limit)
            reached = False

            def past_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
                nonlocal reached
                reached = bool(tag > 0x0020000E)
                return reached

            ds = read_dataset(io.BytesIO(data), False, True, stop_when=past_series_uid,
                              specific_tags=_IDENTIFYING_TAGS)
        except _PARSE_ERRORS:
            raise Rejected("unparseable") from None
        if reached or whole:
            return (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"),
                    meta[dicomscan.TRANSFER_SYNTAX], meta[dicomscan.MEDIA_SOP_CLASS])
    log.warning("instance.unidentified", reason="identifying UIDs not within the first "
                f"{DEFLATED_PREFIXES[-1] >> 20} MiB of the inflated data set")
    raise Rejected("unparseable")


def inflated_prefix(parts: list[bytes | memoryview], start: int, limit: int) -> tuple[bytes, bool]:
    """Inflate (raw deflate, PS3.5 A.5) the bytes of `parts` from offset `start` until
    `limit` bytes came out; (those bytes, whether that is the whole data set). Memory and
    work stay proportional to `limit` whatever the input inflates to."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pos = 0
    for p in parts:
        skip, pos = max(0, start - pos), pos + len(p)
        chunk: bytes | memoryview = p[skip:] if skip < len(p) else b""
        while chunk and len(out) < limit and not d.eof:
            out += d.decompress(chunk, limit - len(out))
            chunk = d.unconsumed_tail
        if len(out) >= limit or d.eof:
            break
    return bytes(out[:limit]), d.eof


def _checked(study: Any, series: Any, sop: Any, ts: str, sop_class: str, request_sop_uid: str,
             calling_ae: str) -> InstanceMeta:
    study, series, sop = (str(v).strip("\x00 ") if v is not None else None for v in (study, series, sop))
    if not (valid_uid(study) and valid_uid(series) and valid_uid(sop)):
        raise Rejected("missing_uids")
    if sop != request_sop_uid.strip("\x00 "):
        raise Rejected("uid_mismatch")
    return InstanceMeta(study_uid=study, sop_instance_uid=sop, sop_class=sop_class,
                        transfer_syntax=ts, calling_ae=calling_ae)


def identify_stored(part10: bytes, complete: bool = True) -> InstanceMeta:
    """Identify a Part-10 file the spool already holds (crash recovery of orphans), from
    all of it or, with `complete=False`, from its start only (the UIDs must lie within)."""
    try:
        study, series, sop, ts, sop_class = _identifiers([part10], complete)
        meta = dicomscan.file_meta(part10[:IDENTIFY_PREFIX])
        calling = meta[1].get(dicomscan.SOURCE_AE, "") if meta else ""
        return _checked(study, series, sop, ts, sop_class, str(sop or ""), calling.strip())
    except Rejected as r:
        raise ValueError(r.outcome) from None
