"""Helpers for the receive tests: what a sample file should do, DCMTK storescu profiles
and output, Part-10 splitting, and waiting for a condition instead of sleeping.

Nothing here starts a process; the tests do, through `tests.peers`.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from tests.peers import base_config

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# A DICOM association carries at most 128 presentation contexts (odd ids 1..255).
MAX_CONTEXTS = 128

STATUS_C211 = 0xC211  # Study/Series/SOP Instance UID missing or invalid
STATUS_C212 = 0xC212  # SOP Instance UID differs from the request




def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def held_config(root: Path, port: int, **receive: Any) -> dict[str, Any]:
    """`base_config`, with packing held off so that received instances stay in the spool.

    The packer bundles a segment once it is sealed (by count, size, age or a quiet
    study) and then removes its spool files; these tests read the spool afterwards.
    """
    cfg = base_config(root, port, **receive)
    cfg["pack"] = {"study_quiet_s": 3600, "segment_max_age_s": 3600,
                   "segment_max_instances": 100_000, "first_segment_instances": 100_000,
                   "segment_max_mb": 16_384, "workers": 1}
    return cfg


def daemon_log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon log (other lines are ignored)."""
    import json

    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict):
                out.append(ev)
    return out


# --- what should happen to a sample file ----------------------------------------------

STORED = "acknowledged and stored"
REFUSED = "refused by the appliance"
UNSENDABLE = "not sendable by storescu"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Expectation:
    outcome: str  # STORED | REFUSED | UNSENDABLE
    why: str = ""
    status: int | None = None  # the DIMSE status for REFUSED
    context: tuple[str, str] | None = None  # (SOP class, transfer syntax) to propose


def _overrun(ds: Dataset) -> str | None:
    """A value whose declared length runs past the end of the file, if any.

    pydicom reads such a value short without complaint; DCMTK refuses the whole file
    ("larger than remaining bytes in file"), so storescu never sends it.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            value = elem.value or b""
            if elem.length != 0xFFFFFFFF and len(value) < elem.length:
                return f"{tag} declares {elem.length} bytes, the file has {len(value)}"
            if elem.length == 0xFFFFFFFF and tag == 0x7FE00010:
                why = _fragment_overrun(bytes(value), ds.original_encoding[1] is not False)
                if why:
                    return why
        elif elem is not None and elem.VR == "SQ":
            for item in elem.value:
                why = _overrun(item)
                if why:
                    return why
    return None


def _fragment_overrun(value: bytes, little: bool) -> str | None:
    """Encapsulated pixel data: an item whose length runs past the end of the value."""
    fmt = "<HHI" if little else ">HHI"
    off = 0
    while off + 8 <= len(value):
        group, elem, length = struct.unpack_from(fmt, value, off)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return None
        if length > len(value) - off - 8:
            return f"pixel data fragment at +{off} declares {length} bytes, {len(value) - off - 8} remain"
        off += 8 + length
    return None


def expectation(path: Path) -> Expectation:
    """What a DICOM peer should see for this file, computed from the file itself.

    - UNSENDABLE: storescu reads the data set with DCMTK and will not send a file it
      cannot parse to the end or that has no SOP Class/Instance UID in its data set.
      DCMTK does not reinterpret elements encoded with VR UN in an explicit-VR data set
      (pydicom does), so a SOP Class UID stored as UN counts as missing for storescu.
    - REFUSED with 0xC211: storescu sends it, but its Study, Series or SOP Instance UID
      is missing or not a UID (digits and dots, 1..64 characters, after the trailing
      space/NUL padding that both storescu and the appliance strip).
    - STORED: everything else, including non-standard SOP classes and odd encodings:
      the appliance stores what it is given and never "repairs" it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        return Expectation(UNSENDABLE, f"not parseable ({type(e).__name__})")
    for kw, tag in (("SOP Class UID", 0x00080016), ("SOP Instance UID", 0x00080018)):
        elem = ds.get_item(tag) if tag in ds else None
        if elem is None or not elem.value:
            return Expectation(UNSENDABLE, f"no {kw} in the data set")
        if elem.VR == "UN":
            return Expectation(UNSENDABLE, f"{kw} encoded with VR UN")
    why = _overrun(ds)
    if why:
        return Expectation(UNSENDABLE, f"truncated: {why}")
    context = (uid_text(ds.get_item(0x00080016).value), transfer_syntax(ds))
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        elem = ds.get_item(Tag(kw)) if kw in ds else None
        v = uid_text(elem.value) if elem is not None else ""
        if not (0 < len(v) <= 64 and _UID_RE.match(v)):
            return Expectation(REFUSED, f"{kw} missing or not a UID", STATUS_C211, context)
    return Expectation(STORED, "", None, context)


def uid_text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    s = raw.decode("ascii", "replace") if isinstance(raw, bytes | bytearray) else str(raw)
    return s.strip("\x00 ")


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    # No file meta: DCMTK detects the encoding, as pydicom did.
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_LE
    return EXPLICIT_LE if little else EXPLICIT_BE


# --- storescu / storescp configuration ------------------------------------------------


@dataclass
class Group:
    name: str
    files: list[Path] = field(default_factory=list)
    contexts: list[tuple[str, str]] = field(default_factory=list)


def group_files(files: Iterable[tuple[Path, tuple[str, str] | None]]) -> list[Group]:
    """Split files into storescu runs of at most MAX_CONTEXTS presentation contexts.

    Each file gets a context for exactly its own SOP class and transfer syntax, so that
    storescu never has to (and never may) convert it to another transfer syntax. Files
    without a context (unsendable) ride along in the open group: storescu reports them.
    """
    groups = [Group("G1")]
    for path, ctx in files:
        g = groups[-1]
        if ctx is not None and ctx not in g.contexts:
            if len(g.contexts) == MAX_CONTEXTS:
                g = Group(f"G{len(groups) + 1}")
                groups.append(g)
            g.contexts.append(ctx)
        g.files.append(path)
    return groups


def storescu_config(groups: list[Group]) -> str:
    """A DCMTK association config: one SCU profile per group, and profile SCP for storescp.

    SCU profiles propose one context per (SOP class, transfer syntax). The SCP profile
    (an SCP profile must name each SOP class once) accepts every transfer syntax in use
    for every SOP class in use, so the reference receiver accepts exactly what storescu
    proposes, including syntaxes `storescp +xa` does not know (JPEG Process 14, .4.57).
    """
    tss = sorted({ts for g in groups for _, ts in g.contexts})
    classes = sorted({sc for g in groups for sc, _ in g.contexts})
    out = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(tss):
        out += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    out.append("[ALL]")
    out += [f"TransferSyntax{i + 1} = {ts}" for i, ts in enumerate(tss)]
    out.append("[[PresentationContexts]]")
    for g in groups:
        out.append(f"[{g.name}]")
        out += [f"PresentationContext{i + 1} = {sc}\\TS{tss.index(ts)}"
                for i, (sc, ts) in enumerate(g.contexts)]
    out.append("[SCP]")
    out += [f"PresentationContext{i + 1} = {sc}\\ALL" for i, sc in enumerate(classes)]
    out.append("[[Profiles]]")
    for g in groups:
        out += [f"[{g.name}]", f"PresentationContexts = {g.name}"]
    out += ["[SCP]", "PresentationContexts = SCP"]
    return "\n".join(out) + "\n"


# storescu logs the DIMSE response (with its status) at DEBUG under its own logger; this
# log4cplus config turns that on without the PDU dumps of the network layer.
STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.logger.dcmtk.apps.storescu = DEBUG
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStdErr = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %P: %m%n
"""


@dataclass
class SendResult:
    """What storescu did with one file."""

    sent: bool = False  # a C-STORE request went out
    status: int | None = None  # the peer's DIMSE status, if it answered
    note: str = ""  # storescu's reason when it did not send, or a failure


def parse_storescu(stderr: str) -> dict[str, SendResult]:
    """Per-file results from storescu's log (with STORESCU_LOG_CONFIG)."""
    results: dict[str, SendResult] = {}
    cur: SendResult | None = None
    for line in stderr.splitlines():
        m = re.match(r"I: Sending file: (.*)$", line)
        if m:
            cur = results.setdefault(m.group(1), SendResult())
            continue
        if cur is None:
            continue
        if line.startswith("I: Sending Store Request"):
            cur.sent = True
        elif m := re.match(r"D: DIMSE Status\s*: 0x([0-9a-fA-F]{4})", line):
            cur.status = int(m.group(1), 16)
        elif line.startswith("E: ") and not cur.note:
            cur.note = line[3:]
    return results


# --- Part-10 files ---------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def split_part10(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(preamble + 'DICM', file meta group, data set) of a Part-10 file.

    Walks the (0002,eeee) elements themselves rather than trusting the group length.
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a Part-10 file (no DICM prefix at offset 128)")
    off = 132
    while off + 8 <= len(data) and data[off:off + 2] == b"\x02\x00":
        vr = data[off + 4:off + 6]
        if vr in _LONG_VRS:
            off += 12 + struct.unpack_from("<I", data, off + 8)[0]
        else:
            off += 8 + struct.unpack_from("<H", data, off + 6)[0]
    return data[:132], data[132:off], data[off:]


def meta_uids(meta: bytes) -> dict[str, str]:
    """The UIDs of a file meta group (as split by `split_part10`), as raw text.

    Read raw so that pydicom's value validation (a warning, an error under pytest) does
    not trip over the non-conformant UIDs some samples carry.
    """
    from pydicom.filereader import read_dataset

    ds = read_dataset(io.BytesIO(meta), is_implicit_VR=False, is_little_endian=True)
    out = {}
    for kw, tag in (("MediaStorageSOPClassUID", 0x00020002), ("MediaStorageSOPInstanceUID", 0x00020003),
                    ("TransferSyntaxUID", 0x00020010)):
        elem = ds.get_item(tag) if tag in ds else None
        out[kw] = uid_text(elem.value) if elem is not None else ""
    return out
