"""The whole sample set, sent by DCMTK storescu, as a modality would send it.

What "the bytes that were sent" are (measured with DCMTK 3.6.7 and this sample set):
storescu does not send a file's data set bytes. It parses the file into a DcmDataset and
writes it out again for the network, even when the transfer syntax stays the same
("Converting transfer syntax: X -> X"). Of the 354 data sets storescu sends, 115
differ from the data set part of their file:
- undefined-length sequences and items are written with explicit lengths (the WG04
  set, Philips and GE MR series, SEG, RT, enhanced MR);
- group length elements (gggg,0000) are recalculated (wrong ones in the charset files);
- Data Set Trailing Padding (FFFC,FFFC) is dropped (WG04 *_UNC and *_RLE, MR_small*,
  the padded and bad-meta files);
- string values lose extra trailing spaces (`HP_EXAMPLE  `, `MEMORIAL HOSP...  `),
  all-space values become empty and space-padded UIDs are cut back (and NUL-padded);
- an odd-length value is padded to even length (dx_image pixel data, +1 byte);
- a deflated data set is deflated again (different zlib stream).
storescu has no bit-preserving option, so the reference for "what was sent" is a second
real receiver in the same test: DCMTK storescp in bit-preserving mode (`+B`), which writes
the data set exactly as it came off the wire. Both receivers get the same storescu runs
with the same association profile, so DCMTK writes the same bytes to both.

The appliance's spooled Part-10 file must be the 128-byte zero preamble, "DICM", its own
file meta group, and then the received data set bytes exactly.

Every file is sent with a presentation context for exactly its own SOP class and
transfer syntax (a storescu config profile), so storescu never converts a compressed
file or drops one it could send; `storescp +xa` does not know every syntax used here
(JPEG Process 14, 1.2.840.10008.1.2.4.57), so storescp gets the matching SCP profile.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import generate_uid

from tests.peers import SAMPLES, Appliance, dcmtk_env, echoscu, free_port, storescu, wait_for
from tests.receive_support import (
    REFUSED,
    STORED,
    STORESCU_LOG_CONFIG,
    UNSENDABLE,
    Expectation,
    Group,
    SendResult,
    expectation,
    group_files,
    held_config,
    meta_uids,
    parse_storescu,
    port_open,
    split_part10,
    storescu_config,
)

GOOD_FILE = "series/CT_Philips_Ingenuity_phantom_28sl"  # a directory: its first slice


@dataclass
class SampleRun:
    files: list[Path]
    expect: dict[Path, Expectation]
    reference: dict[str, SendResult]  # storescu -> storescp +B
    wire: dict[str, bytes]  # file -> the Part-10 file storescp wrote (data set as received)
    ours: dict[str, SendResult]  # storescu -> the appliance
    spooled: dict[str, bytes]  # record id -> decrypted Part-10
    app: Appliance
    echo_after: subprocess.CompletedProcess[str]
    new_store_after: subprocess.CompletedProcess[str]
    new_sop_uid: str
    status: dict[str, Any]


def _send_all(port: int, groups: list[Group], cfg: Path, log_cfg: Path) -> dict[str, SendResult]:
    results: dict[str, SendResult] = {}
    for g in groups:
        r = storescu(port, g.files, extra=["-xf", str(cfg), g.name, "-lc", str(log_cfg)])
        assert r.returncode == 0, f"storescu run {g.name} failed:\n{r.stderr[-3000:]}"
        results.update(parse_storescu(r.stderr))
    return results


def _reference_run(root: Path, groups: list[Group], cfg: Path, log_cfg: Path
                   ) -> tuple[dict[str, SendResult], dict[str, bytes]]:
    """Send everything to DCMTK storescp +B; return storescu's results and the files written."""
    out = root / "storescp"
    out.mkdir()
    order = root / "storescp-order.txt"
    port = free_port()
    # +uf: unique names (fuzz files share SOP Instance UIDs); -xcr/-xs: append each file
    # name in reception order, synchronously, so files map back to what storescu sent.
    with (root / "storescp.log").open("wb") as log:
        proc = subprocess.Popen(
            ["storescp", "-xf", str(cfg), "SCP", "+B", "+uf", "-od", str(out), "-aet", "EDGE",
             "-xcr", f"echo #f >> {shlex.quote(str(order))}", "-xs", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or port_open(port), what="storescp to listen")
        assert proc.poll() is None, (root / "storescp.log").read_text()
        results = _send_all(port, groups, cfg, log_cfg)
        acked = [f for f, r in results.items() if r.status == 0]
        wait_for(lambda: order.exists() and len(order.read_text().split()) >= len(acked),
                 what="storescp to write every acknowledged file")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    names = order.read_text().split()
    assert len(names) == len(acked), f"storescp wrote {len(names)} files for {len(acked)} successes"
    return results, {f: (out / n).read_bytes() for f, n in zip(acked, names, strict=True)}


def _new_instance(root: Path) -> tuple[Path, str]:
    """A valid CT instance that is in no sample: a phantom slice with fresh UIDs."""
    src = sorted((SAMPLES / GOOD_FILE).iterdir())[0]
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = root / "new-instance.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


@dataclass
class Reference:
    root: Path
    files: list[Path]
    expect: dict[Path, Expectation]
    groups: list[Group]
    cfg: Path
    log_cfg: Path
    results: dict[str, SendResult]
    wire: dict[str, bytes]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    if not SAMPLES.is_dir():
        pytest.fail(f"DICOM samples not found at {SAMPLES} (set APPLIANCE_SAMPLES)")
    root = tmp_path_factory.mktemp("samples")
    files = sorted(p for p in SAMPLES.rglob("*") if p.is_file())
    expect = {f: expectation(f) for f in files}
    groups = group_files((f, expect[f].context) for f in files)
    cfg, log_cfg = root / "storescu.cfg", root / "storescu-log.cfg"
    cfg.write_text(storescu_config(groups))
    log_cfg.write_text(STORESCU_LOG_CONFIG)
    results, wire = _reference_run(root, groups, cfg, log_cfg)
    return Reference(root, files, expect, groups, cfg, log_cfg, results, wire)


# The two ways an instance reaches the spool (see appliance/intake.py): held in memory
# until complete (the default for anything under 32 MiB), and sealed to disk piece by
# piece as it arrives (in_memory_limit_mb = 0 sends every sample that way).
@pytest.fixture(scope="module", params=[32, 0], ids=["in-memory", "sealed-as-received"])
def sample_run(request: pytest.FixtureRequest, reference: Reference,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SampleRun]:
    ref = reference
    # a folder of its own each time: a pytest-xdist worker that takes this module's tests
    # in turns sets the same parameter up again
    root = tmp_path_factory.mktemp(f"limit-{request.param}")
    files, expect, groups, cfg, log_cfg = ref.files, ref.expect, ref.groups, ref.cfg, ref.log_cfg
    reference_results, wire = ref.results, ref.wire
    app = Appliance(root / "appliance", held_config(root / "appliance", free_port(),
                                                    in_memory_limit_mb=request.param)).start()
    try:
        ours = _send_all(app.port, groups, cfg, log_cfg)
        echo = echoscu(app.port)
        new_path, new_uid = _new_instance(root)
        new_store = storescu(app.port, [new_path], extra=["-lc", str(log_cfg)])
        yield SampleRun(files, expect, reference_results, wire, ours, app.spooled(), app, echo, new_store,
                        new_uid, app.status())
    finally:
        app.stop()
        app.kill9()


def test_every_sample_is_stored_byte_exact_or_refused_for_its_reason(sample_run: SampleRun) -> None:
    """Per file, the outcome its content calls for (see `expectation`):

    - acknowledged with Success, and the spool decrypts to 128 zero bytes + "DICM" + a
      file meta group naming the transfer syntax and SOP instance that were sent + the
      data set bytes exactly as storescu put them on the wire (storescp +B's copy);
    - refused with the status its defect maps to (0xC211), and nothing spooled for it;
    - not sent at all, because storescu cannot read it (DCMTK refuses it before any
      C-STORE: unparseable, truncated, or no SOP Class/Instance UID in its data set).
    """
    run = sample_run
    spooled: dict[bytes, list[bytes]] = {}
    problems: list[str] = []
    for rid, part10 in run.spooled.items():
        head, meta, data = split_part10(part10)
        if head != bytes(128) + b"DICM":
            problems.append(f"spool record {rid}: preamble is not 128 zero bytes + DICM")
        spooled.setdefault(data, []).append(meta)
    counts: Counter[str] = Counter()

    for f in run.files:
        name, exp = str(f.relative_to(SAMPLES)), run.expect[f]
        ours, ref = run.ours.get(str(f)), run.reference.get(str(f))
        counts[exp.outcome] += 1
        if ours is None or ref is None:
            problems.append(f"{name}: storescu did not report on it")
            continue
        if exp.outcome == UNSENDABLE:
            if ours.sent or ref.sent:
                problems.append(f"{name}: expected storescu to refuse it ({exp.why}), but it sent it")
            continue
        if not (ours.sent and ref.sent):
            problems.append(f"{name}: storescu did not send it: {ours.note or ref.note}")
            continue
        if ref.status != 0:
            problems.append(f"{name}: the reference storescp answered 0x{ref.status or 0:04X}")
            continue
        _, ref_meta_bytes, sent = split_part10(run.wire[str(f)])
        if exp.outcome == REFUSED:
            if ours.status != exp.status:
                problems.append(f"{name}: expected 0x{exp.status:04X} ({exp.why}), got {_st(ours)}")
            if sent in spooled:
                problems.append(f"{name}: refused but spooled")
            continue
        if ours.status != 0x0000:
            problems.append(f"{name}: expected Success, got {_st(ours)}")
            continue
        if sent not in spooled:
            problems.append(f"{name}: no spooled instance holds the data set as sent "
                            f"({len(sent)} bytes)")
            continue
        if meta_uids(ref_meta_bytes) not in [meta_uids(m) for m in spooled[sent]]:
            problems.append(f"{name}: spooled file meta does not name the sent transfer syntax "
                            f"and SOP instance")

    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)
    # Every acknowledged data set is spooled once; the one extra is the instance stored
    # after the sample set (test_daemon_serves_after_the_sample_set).
    acked = {split_part10(run.wire[str(f)])[2] for f in run.files if run.expect[f].outcome == STORED}
    assert len(run.spooled) == len(acked) + 1
    # Guard: a classification that calls (nearly) everything unsendable would pass vacuously.
    assert counts[STORED] > len(run.files) // 2, counts


def _st(r: SendResult) -> str:
    return f"0x{r.status:04X}" if r.status is not None else f"no status ({r.note})"


def test_daemon_serves_after_the_sample_set(sample_run: SampleRun) -> None:
    """After malformed, truncated and refused files, a C-ECHO and a new store succeed."""
    run = sample_run
    assert run.echo_after.returncode == 0, run.echo_after.stderr
    res = parse_storescu(run.new_store_after.stderr)
    assert [r.status for r in res.values()] == [0x0000], run.new_store_after.stderr
    uids = [meta_uids(split_part10(p)[1])["MediaStorageSOPInstanceUID"] for p in run.spooled.values()]
    assert uids.count(run.new_sop_uid) == 1
    refused = run.status["receive"]["instances_refused"]
    assert refused == {"missing_uids": sum(1 for e in run.expect.values() if e.outcome == REFUSED)}


# --- PHI ----------------------------------------------------------------------------

PHI_KEYWORDS = ("PatientName", "PatientID", "StudyInstanceUID")

# Needles shorter than 4 bytes (and the empty, "^^^^"-like values with no letter or
# digit) are skipped: they say nothing about a patient and occur by chance in any file.
MIN_NEEDLE = 4
# Numeric-looking values (digits, dots, dashes: "9214", "123456", "1.2.3") also occur
# by chance in timestamps, byte counts, hex ids and standard UIDs in the index and log,
# so they must be at least this long.
MIN_NUMERIC_NEEDLE = 8
# In random-looking files (sealed spool files, bundles) any given n-byte string occurs
# by chance about size * needles / 256**n times: ~40 MB * ~170 needles is ~1.6 chance
# hits at n=4, but ~4e-11 at n=8. A file stored in clear would show its long values
# (Study UIDs, most names) anyway.
MIN_NEEDLE_IN_RANDOM = 8
_NUMERIC = set(b"0123456789.-+ ^=")


def _readable_samples() -> Iterator[tuple[Path, pydicom.Dataset]]:
    for f in sorted(p for p in SAMPLES.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=True)
        except Exception:  # noqa: S112 - no values to look for (storescu cannot send it either)
            continue
        yield f, ds


def _phi_values() -> dict[bytes, str]:
    """{needle: where it came from} for the PHI of every sample pydicom can read."""
    needles: dict[bytes, str] = {}
    for f, ds in _readable_samples():
        for kw in PHI_KEYWORDS:
            if kw not in ds:
                continue
            elem = ds.get_item(kw)
            raw = elem.value if isinstance(elem, RawDataElement) else None
            forms: set[bytes] = set()
            if isinstance(raw, bytes):
                forms.add(raw.rstrip(b" \x00"))  # the value as stored in the file
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    text = str(ds[kw].value).rstrip(" \x00")
            except Exception:
                text = ""
            if text:
                forms.add(text.encode("utf-8"))  # as a UTF-8 consumer would write it
                forms.add(json.dumps(text)[1:-1].encode())  # as a JSON log line would
            for n in forms:
                if len(n) >= MIN_NEEDLE and any(chr(c).isalnum() for c in n):
                    needles.setdefault(n, f"{kw} of {f.relative_to(SAMPLES)}")
    return needles


def _instance_uids() -> dict[bytes, str]:
    """{UID: where it came from} for the Study, Series and SOP Instance UIDs of the samples.

    Each backslash-separated value counts on its own (a UI element is multi-valued, and
    a decoder reports the values one by one), with the padding stripped.
    """
    out: dict[bytes, str] = {}
    for f, ds in _readable_samples():
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            elem = ds.get_item(kw) if kw in ds else None
            raw = elem.value if isinstance(elem, RawDataElement) else None
            if not isinstance(raw, bytes):
                continue
            for v in raw.split(b"\\"):
                v = v.strip(b" \x00")
                numeric = all(c in _NUMERIC for c in v)
                if len(v) >= (MIN_NUMERIC_NEEDLE if numeric else MIN_NEEDLE):
                    out.setdefault(v, f"{kw} of {f.relative_to(SAMPLES)}")
    return out


def test_log_names_no_uid_of_a_received_instance(sample_run: SampleRun) -> None:
    """Log lines carry opaque ids and keyed hashes: no Study, Series or SOP Instance UID
    of any sample appears in the daemon's log, whatever the instance's defects."""
    log = sample_run.app.log_path.read_bytes()
    hits = [f"{origin}: {uid.decode(errors='replace')!r}"
            for uid, origin in _instance_uids().items() if uid in log]
    assert not hits, "UIDs in the daemon log:\n" + "\n".join(hits)


def _random_looking(data: bytes) -> bool:
    sample = data[:1 << 16]
    return len(sample) >= 4096 and len(zlib.compress(sample, 6)) > 0.95 * len(sample)


def test_no_patient_data_in_clear_in_state_dir_or_log(sample_run: SampleRun) -> None:
    """No PatientName, PatientID or Study Instance UID of any sample appears in clear in
    any file under the state directory (spool, queue.db and its WAL, ...) or the log."""
    needles = _phi_values()
    assert len(needles) > len(sample_run.files) // 4  # the collection itself works
    app = sample_run.app
    paths = [p for p in sorted(app.state_dir.rglob("*")) if p.is_file()] + [app.log_path]
    assert any(p.name == "queue.db" for p in paths)
    hits = []
    for p in paths:
        data = p.read_bytes()
        random_looking = _random_looking(data)
        for n, origin in needles.items():
            numeric = all(c in _NUMERIC for c in n)
            if numeric and len(n) < MIN_NUMERIC_NEEDLE:
                continue
            if random_looking and len(n) < MIN_NEEDLE_IN_RANDOM:
                continue
            if n in data:
                hits.append(f"{p.relative_to(app.root)}: {origin} ({len(n)} bytes)")
    assert not hits, "patient data in clear:\n" + "\n".join(hits)
