"""Helpers for the end-to-end tests (tests/test_end_to_end.py): the whole chain from DCMTK
storescu through the appliance daemon to a real Orthanc.

- `SamplePlan` / `send_samples`: every sample file with its computed expectation
  (`receive_support.expectation`), sent by storescu with a presentation-context profile
  per run (`-xf`), so that every file goes in exactly its own transfer syntax.
- `appliance_config`: the daemon with one `dicom` destination and short pack/queue timers.
- `queue_rows` / `queue_db` / `wait_settled`: what the queue says, read while the daemon runs.
- `compare_instance`: the element-by-element comparison of an original sample file with
  the file Orthanc stored for it. Only what the transfer syntax dictates may differ:
  the file meta group (except the Media Storage SOP Class/Instance UID), group lengths,
  Data Set Trailing Padding (DCMTK's storescu drops it), Pixel Data *encoding* (decoded
  values are compared instead), and Planar Configuration 1 -> 0 when the image was
  compressed (PS3.5 8.2.3/8.2.4). Values are compared, not encodings: string values
  without their insignificant padding (DCMTK trims trailing spaces and pads odd lengths),
  binary values as numbers, sequences item by item. Any other difference fails.
"""

from __future__ import annotations

import io
import json
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from tests.peers import SAMPLES, base_config, cli, storescu
from tests.receive_support import (
    STORED,
    STORESCU_LOG_CONFIG,
    Expectation,
    Group,
    SendResult,
    expectation,
    group_files,
    parse_storescu,
    storescu_config,
    transfer_syntax,
)

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
CODEC_SYNTAX = {"jpeg2000": J2K_LOSSLESS, "jpeg-ls": JLS_LOSSLESS, "none": None}

# --- the sample set, as storescu sends it ----------------------------------------------


@dataclass
class SamplePlan:
    files: list[Path]
    expect: dict[Path, Expectation]
    groups: list[Group]
    profile: Path  # storescu association config (-xf)
    log_config: Path  # storescu log4cplus config (per-file DIMSE status)

    @property
    def sendable(self) -> list[Path]:
        return [f for f in self.files if self.expect[f].outcome == STORED]

    def excluded(self) -> list[tuple[Path, Expectation]]:
        return [(f, e) for f, e in self.expect.items() if e.outcome != STORED]


def sample_plan(root: Path, files: list[Path] | None = None) -> SamplePlan:
    root.mkdir(parents=True, exist_ok=True)
    files = files if files is not None else sorted(p for p in SAMPLES.rglob("*") if p.is_file())
    expect = {f: expectation(f) for f in files}
    groups = group_files((f, expect[f].context) for f in files)
    profile, log_config = root / "storescu.cfg", root / "storescu-log.cfg"
    profile.write_text(storescu_config(groups))
    log_config.write_text(STORESCU_LOG_CONFIG)
    return SamplePlan(files, expect, groups, profile, log_config)


def send_samples(port: int, plan: SamplePlan) -> dict[str, SendResult]:
    """One storescu run (one association) per profile group; per-file results."""
    results: dict[str, SendResult] = {}
    for g in plan.groups:
        r = storescu(port, g.files, extra=["-xf", str(plan.profile), g.name, "-lc", str(plan.log_config)])
        assert r.returncode == 0, f"storescu run {g.name} failed:\n{r.stderr[-3000:]}"
        results.update(parse_storescu(r.stderr))
    return results


# --- the appliance ------------------------------------------------------------------------


def dicom_destination(port: int, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "pacs", "transport": "dicom", "host": "127.0.0.1", "port": port,
                         "ae_title": "ORTHANC", "timeout_s": 10}
    d.update(kw)
    if "tls" not in d:
        d["plaintext"] = True
    return d


def appliance_config(root: Path, port: int, destination: dict[str, Any], codec: str = "jpeg2000",
                     **pack: Any) -> dict[str, Any]:
    """The appliance for end-to-end runs: `codec` for every instance (`pack.adaptive` off,
    so that a run tests that codec on every sample; tests/test_pack_pace.py tests the
    adaptive choice, pixels compared too)."""
    cfg = base_config(root, port)
    cfg["pack"] = {"codec": codec, "study_quiet_s": 0.5, "segment_max_age_s": 5, "workers": 2,
                   "adaptive": False, **pack}
    cfg["queue"] = {"retry_min_s": 0.2, "retry_max_s": 1}
    cfg["destinations"] = [destination]
    return cfg


def queue_rows(config_path: Path) -> list[dict[str, Any]]:
    """`appliance queue list --json`: what an operator sees."""
    r = cli("queue", "list", "--json", "--config", str(config_path))
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


def queue_db(state_dir: Path) -> list[dict[str, Any]]:
    """Every segment row of the queue index, read-only (the daemon may be running)."""
    conn = sqlite3.connect(f"file:{state_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM segments ORDER BY created")]
    finally:
        conn.close()


def spool_count(state_dir: Path) -> int:
    conn = sqlite3.connect(f"file:{state_dir / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    finally:
        conn.close()




def settled(state_dir: Path, final: tuple[str, ...] = ("delivered",)) -> list[dict[str, Any]] | None:
    """The queue rows once nothing is left to do (every segment in a `final` state and the
    spool empty), else None."""
    rows = queue_db(state_dir)
    if rows and all(r["state"] in final for r in rows) and spool_count(state_dir) == 0:
        return rows
    return None


# --- reading files --------------------------------------------------------------------------


def read_dataset(src: bytes | Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(src) if isinstance(src, bytes) else src, force=True)


def _text(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return v.decode("ascii", "replace").strip("\x00 ")
    return str(v if v is not None else "").strip("\x00 ")


def _raw_text(ds: Dataset, tag: int) -> str:
    if tag not in ds:
        return ""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return _text(elem.value)
    return _text(elem.value)


def identity(ds: Dataset) -> tuple[str, str, str, str]:
    """What Orthanc identifies an instance by: Patient ID, Study, Series, SOP Instance UID."""
    return (_raw_text(ds, 0x00100020), _raw_text(ds, 0x0020000D), _raw_text(ds, 0x0020000E),
            _raw_text(ds, 0x00080018))


# --- the comparison ---------------------------------------------------------------------------

STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                        "UC", "UI", "UR", "UT"})
SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})  # a backslash is a character here
# PS3.5 Table 6.2-1: leading spaces are insignificant too
LEADING_INSIGNIFICANT = frozenset({"AE", "CS", "DS", "IS"})
BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
PIXEL_DATA = 0x7FE00010
PLANAR_CONFIGURATION = 0x00280006
TRAILING_PADDING = 0xFFFCFFFC


@dataclass
class Comparison:
    problems: list[str] = field(default_factory=list)
    pixels: str = ""  # "decoded" | "bytes" | "none"
    elements: int = 0  # elements compared (at every nesting level)

    def fail(self, where: str, msg: str) -> None:
        self.problems.append(f"{where}: {msg}")


def _norm_string(raw: bytes, vr: str) -> list[bytes]:
    parts = [raw] if vr in SINGLE_VALUED_TEXT else raw.split(b"\\")
    out = []
    for p in parts:
        p = p.rstrip(b" \x00")
        if vr in LEADING_INSIGNIFICANT:
            p = p.lstrip(b" ")
        out.append(p)
    return out


def _same_bytes(a: bytes, b: bytes) -> bool:
    """Equal, or equal but for the pad byte DCMTK adds to an odd-length value."""
    if a == b:
        return True
    return len(a) % 2 == 1 and len(b) == len(a) + 1 and b[:-1] == a and b[-1:] == b"\x00"


def _convert(ds: Dataset, tag: int) -> tuple[DataElement | None, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds[tag], ""
    except Exception as e:  # a value pydicom cannot convert: compared raw
        return None, type(e).__name__


def _raw(ds: Dataset, tag: int) -> bytes | None:
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"")
    if elem is not None and elem.VR != "SQ" and elem.is_empty:
        return b""  # pydicom reads an empty element as a DataElement with no value
    return None


def _items(elem: DataElement, raw: bytes | None) -> list[Dataset] | None:
    """The items of a sequence; also of a private sequence pydicom does not know (VR UN:
    its value is the sequence encoded in Implicit VR Little Endian, PS3.5 6.2.2), which
    DCMTK, knowing the private tag, writes as SQ when it re-encodes a data set."""
    if elem.VR == "SQ":
        return list(elem.value or [])
    if elem.VR != "UN" or raw is None:
        return None
    from pydicom.values import convert_SQ

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(convert_SQ(raw, True, True))
    except Exception:
        return None


def _equal_values(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    if isinstance(a, list | tuple) or isinstance(b, list | tuple) or type(a).__name__ == "MultiValue":
        la = list(a) if isinstance(a, list | tuple) or type(a).__name__ == "MultiValue" else [a]
        lb = list(b) if isinstance(b, list | tuple) or type(b).__name__ == "MultiValue" else [b]
        return len(la) == len(lb) and all(_equal_values(x, y) for x, y in zip(la, lb, strict=True))
    return bool(a == b)


def compare_datasets(a: Dataset, b: Dataset, cmp: Comparison, where: str = "",
                     skip: frozenset[int] = frozenset()) -> None:
    """Every element of `a` (the original) against `b` (what Orthanc stored), recursively."""

    def keep(t: int) -> bool:
        return (t & 0xFFFF) != 0 and t != TRAILING_PADDING and t not in skip and (t >> 16) != 0x0002

    ta = {int(t) for t in a.keys() if keep(int(t))}  # noqa: SIM118 - iterating yields elements
    tb = {int(t) for t in b.keys() if keep(int(t))}  # noqa: SIM118
    for t in sorted(ta - tb):
        cmp.fail(f"{where}({t >> 16:04X},{t & 0xFFFF:04X})", "missing in the stored instance")
    for t in sorted(tb - ta):
        cmp.fail(f"{where}({t >> 16:04X},{t & 0xFFFF:04X})", "added in the stored instance")
    for t in sorted(ta & tb):
        cmp.elements += 1
        w = f"{where}({t >> 16:04X},{t & 0xFFFF:04X})"
        raw_a, raw_b = _raw(a, t), _raw(b, t)
        ea, why_a = _convert(a, t)
        eb, why_b = _convert(b, t)
        if ea is None or eb is None:
            if raw_a is None or raw_b is None or not _same_bytes(raw_a, raw_b):
                cmp.fail(w, f"value not convertible ({why_a or why_b}) and raw bytes differ")
            continue
        if ea.VR == "SQ" or eb.VR == "SQ":
            items_a, items_b = _items(ea, raw_a), _items(eb, raw_b)
            if items_a is None or items_b is None:
                cmp.fail(w, f"VR {ea.VR} became {eb.VR}")
                continue
            if len(items_a) != len(items_b):
                cmp.fail(w, f"{len(items_a)} items became {len(items_b)}")
                continue
            for i, (x, y) in enumerate(zip(items_a, items_b, strict=True)):
                compare_datasets(x, y, cmp, f"{w}[{i}]")
            continue
        vr_a, vr_b = str(ea.VR), str(eb.VR)
        if vr_a in STRING_VRS and vr_b in STRING_VRS and raw_a is not None and raw_b is not None:
            if vr_a != vr_b:
                cmp.fail(w, f"VR {vr_a} became {vr_b}")
            elif _norm_string(raw_a, vr_a) != _norm_string(raw_b, vr_b):
                cmp.fail(w, f"{vr_a} value {raw_a[:80]!r} became {raw_b[:80]!r}")
            continue
        if vr_a in BYTES_VRS or vr_b in BYTES_VRS or vr_a != vr_b:
            # bytes, or a VR one side knows and the other does not (UN): compare the raw
            # bytes when both files have the same byte order, else the converted values
            same_order = a.original_encoding[1] == b.original_encoding[1]
            if raw_a is not None and raw_b is not None and same_order:
                if not _same_bytes(raw_a, raw_b):
                    cmp.fail(w, f"{vr_a}/{vr_b} bytes differ ({len(raw_a)} vs {len(raw_b)} bytes)")
                continue
        if not _equal_values(ea.value, eb.value):
            cmp.fail(w, f"{vr_a} value {str(ea.value)[:80]!r} became {str(eb.value)[:80]!r}")


def native_values(ds: Dataset) -> np.ndarray:
    """The stored pixel values of a native (uncompressed) image exactly as in the file:
    (frames, rows, columns, samples), no masking to Bits Stored, no colour conversion."""
    ba = int(ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    planar = int(ds.get("PlanarConfiguration", 0) or 0) if spp > 1 else 0
    order = "<" if ds.original_encoding[1] is not False else ">"
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{ba // 8}")
    count = rows * cols * spp * frames
    flat = np.frombuffer(ds.PixelData, dtype=dtype, count=count)
    if planar == 1:
        return flat.reshape(frames, spp, rows, cols).transpose(0, 2, 3, 1)
    return flat.reshape(frames, rows, cols, spp)


def decoded_values(data: bytes, ds: Dataset) -> np.ndarray:
    """All frames of an encapsulated image decoded by pydicom (no colour conversion),
    as (frames, rows, columns, samples)."""
    from pydicom.pixels import pixel_array  # type: ignore[attr-defined]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(io.BytesIO(data), raw=True)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr.reshape(frames, int(ds.Rows), int(ds.Columns), spp)


def compare_instance(original: Path, stored: bytes, target: str | None) -> tuple[Comparison, str]:
    """Compare a sample file with the file Orthanc stored. `target` is the transfer syntax
    the appliance compresses to (None: codec "none"). Returns (comparison, category) with
    category "compressed" (stored in `target`, sent in another syntax) or "passthrough"."""
    cmp = Comparison()
    a, b = read_dataset(original), read_dataset(stored)
    ts_a, ts_b = transfer_syntax(a), transfer_syntax(b)
    compressed = ts_b != ts_a
    category = "compressed" if compressed else "passthrough"
    if compressed and ts_b != target:
        cmp.fail("(0002,0010)", f"stored as {UID(ts_b).name}; expected {UID(ts_a).name} or "
                                f"{UID(target).name if target else 'nothing else'}")
        return cmp, category

    # File meta: only the Media Storage SOP Class/Instance UID belong to the instance. The
    # original's file meta never travels (DICOM sends the data set); the PACS writes its
    # meta from the data set's SOP Class/Instance UID. So the stored meta must name the
    # original data set's UIDs (some samples' meta disagrees with their own data set).
    # DCMTK (inside Orthanc, and storescp alike) generates a meta UID of its own when the
    # data set's element is not encoded with VR UI; the data set element itself is still
    # compared below.
    meta_b = getattr(b, "file_meta", None)
    for tag, dataset_tag in ((0x00020002, 0x00080016), (0x00020003, 0x00080018)):
        elem = a.get_item(dataset_tag) if dataset_tag in a else None
        if elem is not None and elem.VR not in (None, "UI"):
            continue
        want = _raw_text(a, dataset_tag)
        got = _raw_text(meta_b, tag) if meta_b is not None else ""
        if got != want:
            cmp.fail(f"({tag >> 16:04X},{tag & 0xFFFF:04X})", f"{want!r} became {got!r}")

    skip = {PIXEL_DATA}
    if compressed and int(a.get("SamplesPerPixel", 1) or 1) > 1 and PLANAR_CONFIGURATION in a:
        # PS3.5 8.2.3 / 8.2.4: "shall be 0" in JPEG-LS and JPEG 2000
        skip.add(PLANAR_CONFIGURATION)
        if PLANAR_CONFIGURATION not in b or int(b.PlanarConfiguration) != 0:
            cmp.fail("(0028,0006)", "Planar Configuration is not 0 in the compressed instance")
    compare_datasets(a, b, cmp, skip=frozenset(skip))

    has_a, has_b = PIXEL_DATA in a, PIXEL_DATA in b
    if has_a != has_b:
        cmp.fail("(7FE0,0010)", "Pixel Data missing" if has_a else "Pixel Data added")
        return cmp, category
    if not has_a:
        cmp.pixels = "none"
        return cmp, category
    if not compressed:
        raw_a, raw_b = _raw(a, PIXEL_DATA), _raw(b, PIXEL_DATA)
        va = raw_a if raw_a is not None else a.PixelData
        vb = raw_b if raw_b is not None else b.PixelData
        if not _same_bytes(va, vb):
            cmp.fail("(7FE0,0010)", f"Pixel Data bytes differ ({len(va)} vs {len(vb)} bytes)")
        cmp.pixels = "bytes"
        return cmp, category
    try:
        orig_px = native_values(a)
        stored_px = decoded_values(stored, b)
    except Exception as e:
        cmp.fail("(7FE0,0010)", f"cannot compare decoded pixels: {type(e).__name__}: {e}")
        return cmp, category
    cmp.pixels = "decoded"
    if orig_px.shape != stored_px.shape or not np.array_equal(orig_px, stored_px):
        diff = ("shape" if orig_px.shape != stored_px.shape
                else f"{int(np.count_nonzero(orig_px != stored_px))} values")
        cmp.fail("(7FE0,0010)", f"decoded pixels differ from the original stored values ({diff})")
    return cmp, category
