"""Helpers for durability tests: what storescu saw acknowledged, and what the spool holds.

- `run_storescu` / `StorescuRun`: DCMTK storescu with `-v`, its stderr parsed into one
  outcome per file: the text of the C-STORE response ("Success", "Refused: ...") or None
  when no response came (the association died first). DCMTK 3.6.7 logs, per file:
      I: Sending file: PATH
      I: Sending Store Request (MsgID n, XX)
      I: Received Store Response (Success)            <- the status text of the response
  or `E: Store Failed, file: PATH:` when the association broke before a response.
- `spool_state`: every file in STATE/spool and every index record, decrypted and
  identified by SOP Instance UID, with anything that is not a clean record/file pair.
- `dataset_bytes`: the data set part of a Part-10 file (after the file meta group), which
  is what travels on the wire and what the spool keeps byte for byte.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble

from appliance.core import crypto
from tests.peers import Appliance, dcmtk_env, to_toml

SENDING = re.compile(r"^I: Sending file: (.*)$")
RESPONSE = re.compile(r"^I: Received Store Response \((.*)\)$")
FAILED = re.compile(r"^E: Store Failed, file: (.*):$")


def dataset_bytes(part10: bytes) -> bytes:
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return part10[fp.tell():]


def sop_uid(part10: bytes | Path) -> str:
    src = io.BytesIO(part10) if isinstance(part10, bytes) else part10
    ds = dcmread(src, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


@dataclass
class StorescuRun:
    files: list[Path]
    returncode: int
    stderr: str
    # path -> response text ("Success", "Refused: OutOfResources", ...) or None
    outcome: dict[str, str | None] = field(default_factory=dict)

    @property
    def acked(self) -> list[Path]:
        """Files whose C-STORE response was Success (status 0x0000)."""
        return [f for f in self.files if self.outcome.get(str(f)) == "Success"]

    def with_response(self, prefix: str) -> list[Path]:
        return [f for f in self.files if (self.outcome.get(str(f)) or "").startswith(prefix)]


def parse_storescu(stderr: str) -> dict[str, str | None]:
    outcome: dict[str, str | None] = {}
    current: str | None = None
    for line in stderr.splitlines():
        if m := SENDING.match(line):
            current = m.group(1)
            outcome[current] = None
        elif (m := RESPONSE.match(line)) and current is not None:
            outcome[current] = m.group(1)
            current = None
        elif (m := FAILED.match(line)) and current == m.group(1):
            current = None
    return outcome


def storescu_cmd(port: int, files: list[Path], aet: str = "MODALITY") -> list[str]:
    return ["storescu", "-v", "-aet", aet, "-aec", "EDGE", "--no-halt", "-R",
            "127.0.0.1", str(port), *map(str, files)]


def popen_storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(storescu_cmd(port, files), stdout=subprocess.DEVNULL, stderr=f,
                                env=dcmtk_env())


def finish_storescu(proc: subprocess.Popen[bytes], files: list[Path], log: Path,
                    timeout: float = 120) -> StorescuRun:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    text = log.read_text(errors="replace")
    return StorescuRun(files, rc, text, parse_storescu(text))


def run_storescu(port: int, files: list[Path], log: Path, timeout: float = 120) -> StorescuRun:
    return finish_storescu(popen_storescu(port, files, log), files, log, timeout)


def timed_storescu(port: int, files: list[Path]) -> tuple[StorescuRun, float, float]:
    """Run storescu once and time its stderr lines: (run, first request sent, last response),
    in seconds after launch. This is the window in which a kill can land mid-transfer."""
    t0 = time.monotonic()
    proc = subprocess.Popen(storescu_cmd(port, files), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dcmtk_env())
    first = last = 0.0
    lines = []
    assert proc.stderr is not None
    with proc.stderr:
        for line in proc.stderr:
            t = time.monotonic() - t0
            lines.append(line)
            if not first and line.startswith("I: Sending Store Request"):
                first = t
            if line.startswith("I: Received Store Response"):
                last = t
    rc = proc.wait(60)
    text = "".join(lines)
    return StorescuRun(files, rc, text, parse_storescu(text)), first, last


@dataclass
class SpoolState:
    by_sop: dict[str, bytes]          # SOP Instance UID -> decrypted Part-10 bytes
    records: set[str]                 # ids in the index
    files: set[str]                   # names in STATE/spool (including temp files)
    temps: list[str]                  # .tmp-* names left in STATE/spool
    quarantine: list[str]             # names in STATE/quarantine
    missing: list[str]                # records whose spool file does not exist


def spool_state(app: Appliance) -> SpoolState:
    """Read the spool as the CLI would (read-only index), decrypting and authenticating
    every record (an IntegrityError fails the test)."""
    from appliance.core.errors import NotFoundError
    from appliance.queue.index import open_index
    from appliance.spool.store import Spool

    spool_dir = app.state_dir / "spool"
    files = {p.name for p in spool_dir.iterdir()}
    temps = sorted(n for n in files if n.startswith(".tmp-"))
    spool = Spool.__new__(Spool)
    spool.dir, spool.key = spool_dir, spool_key(app)
    idx = open_index(app.state_dir, readonly=True)
    try:
        records = {r["id"] for r in idx.query("SELECT id FROM instances")}
    finally:
        idx.close()
    by_sop: dict[str, bytes] = {}
    missing = []
    for rid in sorted(records):
        try:
            b = spool.read(rid)
        except NotFoundError:
            missing.append(rid)
            continue
        uid = sop_uid(b)
        assert uid not in by_sop, f"SOP instance stored twice in the spool: records {rid} and another"
        by_sop[uid] = b
    qdir = app.state_dir / "quarantine"
    quarantine = sorted(p.name for p in qdir.iterdir()) if qdir.is_dir() else []
    return SpoolState(by_sop, records, files, temps, quarantine, missing)


def log_events(app: Appliance, since: int = 0) -> list[dict[str, Any]]:
    """The daemon's JSON log lines from byte offset `since` of its log file."""
    out = []
    with app.log_path.open("rb") as f:
        f.seek(since)
        for raw in f:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if isinstance(ev, dict):
                out.append(ev)
    return out


def log_size(app: Appliance) -> int:
    return app.log_path.stat().st_size if app.log_path.exists() else 0


def recovered_event(app: Appliance, since: int) -> dict[str, Any]:
    evs = [e for e in log_events(app, since) if e.get("event") == "spool.recovered"]
    assert len(evs) == 1, f"expected one spool.recovered line since offset {since}:\n{app.log_text()[since:]}"
    return evs[0]


def spool_key(app: Appliance) -> crypto.SpoolKey:
    return crypto.load_spool_key(Path(app.cfg["spool"]["key_file"]))


def index_rw(app: Appliance) -> sqlite3.Connection:
    """A direct read-write connection to the queue index (daemon stopped), to fake crashes."""
    conn = sqlite3.connect(app.state_dir / "queue.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def keep_in_spool(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config that keeps every instance in the spool for the test's lifetime: no segment is
    sealed by count, size or time, so the packer never consumes (and removes) them."""
    cfg["pack"] = {**cfg.get("pack", {}), "study_quiet_s": 3600, "segment_max_age_s": 3600,
                   "segment_max_instances": 100_000, "first_segment_instances": 100_000,
                   "segment_max_mb": 16_384}
    return cfg


def write_config(app: Appliance) -> None:
    app.config_path.write_text(to_toml(app.cfg))
