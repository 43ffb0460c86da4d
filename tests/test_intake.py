"""A large instance is sealed into the spool as it arrives (appliance/intake.py): the daemon
never holds it in memory, a full disk or a dead sender in the middle of it leaves nothing
behind, and what is stored is still exactly what was sent."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from tests.peers import Appliance, base_config, dcmtk_env, echoscu, free_port, storescu, wait_for
from tests.spoolcheck import (
    dataset_bytes,
    finish_storescu,
    keep_in_spool,
    log_events,
    log_size,
    popen_storescu,
    run_storescu,
    spool_state,
)
from tests.test_disk_reserve import MinFree, tmpfs  # noqa: F401 - the fixture

MiB = 1 << 20
STATUS_A700 = 0xA700
MF_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture


def write_multiframe_header(path: Path, frames: int, n: int, bits_stored: int,
                            transfer_syntax: str, name: str) -> None:
    """The Part-10 file `path` up to its Pixel Data (the caller appends it): a Multi-frame
    Grayscale Word SC instance of `frames` n x n 16-bit frames, fresh UIDs, made-up
    patient `name`."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MF_SC, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = f"{name}^TEST", f"{name}-1", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, n, n
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MF_SC, ds.SOPInstanceUID
    meta.TransferSyntaxUID, meta.ImplementationClassUID = transfer_syntax, PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def write_multiframe(path: Path, frames: int, n: int = 512) -> Path:
    """A Multi-frame Grayscale Word SC instance with `frames` n x n 16-bit frames (no two alike)."""
    write_multiframe_header(path, frames, n, 12, ExplicitVRLittleEndian, "INTAKE")
    base = (np.add.outer(np.arange(n), np.arange(n)) % 4096).astype("<u2")
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frames * n * n * 2))
        for i in range(frames):
            f.write(((base + i * 7) % 4096).astype("<u2").tobytes())
    return path


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def temps(app: Appliance) -> list[str]:
    return sorted(p.name for p in (app.state_dir / "spool").iterdir() if p.name.startswith(".tmp-"))


def refused(app: Appliance, since: int) -> list[str]:
    return [e["outcome"] for e in log_events(app, since) if e.get("event") == "instance.refused"]


def test_large_instance_is_sealed_as_it_arrives_without_holding_it_in_memory(
        appliance_factory: Any, tmp_path: Path) -> None:
    """A 256 MiB multi-frame instance with the default limit (32 MiB): Success, the spool
    decrypts to the data set exactly as sent, and the daemon's peak memory grows by the
    32 MiB it holds before sealing to disk plus a little, not by the instance's size (held in
    memory it would grow by at least 256 MiB)."""
    app: Appliance = appliance_factory(keep_in_spool(base_config(tmp_path / "app", free_port())),
                                       root=tmp_path / "app")
    big = write_multiframe(tmp_path / "big.dcm", frames=512)
    assert app.proc is not None
    assert echoscu(app.port).returncode == 0
    before = vm_hwm_kib(app.proc.pid)
    r = storescu(app.port, [big])
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-2000:]
    grew = (vm_hwm_kib(app.proc.pid) - before) * 1024
    size = big.stat().st_size
    print(f"\ninstance {size / MiB:.0f} MiB; daemon peak RSS grew by {grew / MiB:.1f} MiB")
    assert grew < 32 * MiB + 24 * MiB, \
        f"daemon peak RSS grew by {grew / MiB:.0f} MiB for a {size / MiB:.0f} MiB instance"
    st = spool_state(app)
    assert st.temps == [] and len(st.by_sop) == 1
    (stored,) = st.by_sop.values()
    assert dataset_bytes(stored) == dataset_bytes(big.read_bytes())
    # Sent again: a duplicate, found by hashing the sealed copy, not stored twice.
    r = storescu(app.port, [big])
    assert r.returncode == 0 and "Store Failed" not in r.stderr
    assert len(spool_state(app).by_sop) == 1
    assert app.status()["receive"]["instances_duplicate"] == 1


def test_disk_filling_during_a_large_instance_gives_a700_and_leaves_nothing(
        tmpfs: Callable[..., Path], appliance_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    """The reserve is checked as the instance is sealed, not only before: a 96 MiB instance
    into 40 MiB of room above the reserve gets Out of Resources, free space never falls
    under the reserve, the temp file is gone, and the next (small) instance is stored."""
    disk = tmpfs("disk", size="64m")
    cfg = keep_in_spool(base_config(tmp_path / "app", free_port(), in_memory_limit_mb=1))
    cfg["appliance"]["state_dir"] = str(disk / "state")
    cfg["spool"]["reserve_free_mb"] = 20
    app: Appliance = appliance_factory(cfg, root=tmp_path / "app")
    big = write_multiframe(tmp_path / "big.dcm", frames=192)
    offset = log_size(app)
    with MinFree(disk) as watch:
        run = run_storescu(app.port, [big], tmp_path / "storescu.log")
    assert run.with_response("Refused: OutOfResources") == [big], run.stderr[-2000:]
    assert refused(app, offset) == ["spool_full"]
    assert watch.min >= 20 * MiB, f"free space fell to {watch.min / MiB:.1f} MiB, under the reserve"
    wait_for(lambda: temps(app) == [], what="the temp file to be removed")
    small = write_multiframe(tmp_path / "small.dcm", frames=4)
    r = storescu(app.port, [small])
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-2000:]
    st = spool_state(app)
    assert list(st.by_sop.values()) and dataset_bytes(next(iter(st.by_sop.values()))) == \
        dataset_bytes(small.read_bytes())


def test_instance_over_max_instance_mb_is_refused_without_keeping_it(
        appliance_factory: Any, tmp_path: Path) -> None:
    """With max_instance_mb = 8, a 40 MiB instance gets 0xA702 (Refused: Out of Resources)
    with the reason in the log; its sealed temp file never grows far past 8 MiB and is gone
    at the end; the daemon's peak RSS does not grow with it; a 2 MiB instance still stores."""
    cfg = keep_in_spool(base_config(tmp_path / "app", free_port(), in_memory_limit_mb=1,
                                    max_instance_mb=8))
    app: Appliance = appliance_factory(cfg, root=tmp_path / "app")
    big = write_multiframe(tmp_path / "big.dcm", frames=80)
    assert app.proc is not None and echoscu(app.port).returncode == 0
    before, offset = vm_hwm_kib(app.proc.pid), log_size(app)
    largest = 0
    proc = popen_storescu(app.port, [big], tmp_path / "storescu.log")
    while proc.poll() is None:
        for name in temps(app):
            with contextlib.suppress(FileNotFoundError):
                largest = max(largest, (app.state_dir / "spool" / name).stat().st_size)
        time.sleep(0.005)
    run = finish_storescu(proc, [big], tmp_path / "storescu.log")
    assert run.with_response("Refused: OutOfResources") == [big], run.stderr[-2000:]
    assert refused(app, offset) == ["too_large"]
    (line,) = [e for e in log_events(app, offset) if e.get("event") == "instance.refused"]
    assert line["status"] == "0xA702" and "max_instance_mb" in line["meaning"]
    assert largest <= 9 * MiB, f"a {largest / MiB:.1f} MiB temp file for an 8 MiB cap"
    assert (vm_hwm_kib(app.proc.pid) - before) * 1024 < 16 * MiB
    wait_for(lambda: temps(app) == [], what="no temp file left")
    assert spool_state(app).by_sop == {}
    small = write_multiframe(tmp_path / "small.dcm", frames=4)
    r = storescu(app.port, [small])
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-2000:]


def _send_until_temp(app: Appliance, path: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start storescu with `path` and return once the daemon is sealing it to a temp file."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "EDGE", "-R", "127.0.0.1",
                                 str(app.port), str(path)], stdout=out, stderr=subprocess.STDOUT,
                                env=dcmtk_env(), start_new_session=True)

    def sealing() -> bool:
        names = temps(app)
        return bool(names) and (app.state_dir / "spool" / names[0]).stat().st_size > 8 * MiB

    wait_for(sealing, what="the daemon to be sealing the instance to disk")
    return proc


def test_sender_dying_mid_instance_leaves_no_temp_file(appliance_factory: Any, tmp_path: Path) -> None:
    cfg = keep_in_spool(base_config(tmp_path / "app", free_port(), in_memory_limit_mb=1))
    cfg["receive"]["max_pdu"] = 16384  # slow enough to catch the transfer in the middle
    app: Appliance = appliance_factory(cfg, root=tmp_path / "app")
    big = write_multiframe(tmp_path / "big.dcm", frames=512)
    proc = _send_until_temp(app, big, tmp_path / "storescu.log")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: temps(app) == [], what="the dead association's temp file to be removed")
    assert spool_state(app).by_sop == {}
    assert echoscu(app.port).returncode == 0
    assert app.status()["receive"]["instances_received"] == 0


def test_daemon_killed_mid_instance_restarts_clean(appliance_factory: Any, tmp_path: Path) -> None:
    """kill -9 while sealing: the half-written temp is never acknowledged, and the next
    start removes it; the instance sent again is stored whole."""
    cfg = keep_in_spool(base_config(tmp_path / "app", free_port(), in_memory_limit_mb=1))
    cfg["receive"]["max_pdu"] = 16384
    app: Appliance = appliance_factory(cfg, root=tmp_path / "app")
    big = write_multiframe(tmp_path / "big.dcm", frames=256)
    proc = _send_until_temp(app, big, tmp_path / "storescu.log")
    app.kill9()
    assert proc.wait(30) != 0 or "Store Failed" in (tmp_path / "storescu.log").read_text()
    assert temps(app) != []
    offset = log_size(app)
    app.start()
    (ev,) = [e for e in log_events(app, offset) if e.get("event") == "spool.recovered"]
    assert ev["temps_removed"] == 1 and ev["adopted"] == 0, ev
    assert temps(app) == [] and spool_state(app).by_sop == {}
    r = storescu(app.port, [big])
    assert r.returncode == 0 and "Store Failed" not in r.stderr
    (stored,) = spool_state(app).by_sop.values()
    assert dataset_bytes(stored) == dataset_bytes(big.read_bytes())
