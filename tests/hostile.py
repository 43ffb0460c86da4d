"""Hostile peers for the receive port, shared by tests/test_receive_hostile.py and
bench/hostile_peers.py: sockets that connect and stall, an A-ASSOCIATE-RQ that declares
more than any limit, and a deflate bomb (a small Deflated Explicit VR Little Endian data
set that inflates to hundreds of MiB).

Everything here runs in the test (or bench) process on loopback; nothing starts a server.
Process figures come from /proc/PID/status.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, DeflatedExplicitVRLittleEndian, generate_uid

MiB = 1 << 20
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def proc_status(pid: int, key: str) -> int:
    """A numeric field of /proc/PID/status (kB for the Vm* fields, a count for Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def source_address(i: int) -> str:
    """The i-th of many loopback source addresses (127.0.1.1, 127.0.1.2, ...): all of
    127/8 is local on Linux, so a test can be many hosts at once."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def connect_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


@dataclass
class Stallers:
    """Connections that each sent one byte and then said nothing."""

    socks: list[socket.socket]
    opened: list[float]
    closed_at: dict[int, float] = field(default_factory=dict)

    @classmethod
    def open(cls, port: int, n: int, sources: int | None = None) -> Stallers:
        """`n` connections spread over `sources` source addresses (default: one each)."""
        sources = sources or n
        socks, opened = [], []
        try:
            for i in range(n):
                s = connect_from(source_address(i % sources), port)
                s.sendall(b"\x01")  # the first byte of an A-ASSOCIATE-RQ, and no more
                socks.append(s)
                opened.append(time.monotonic())
        except BaseException:
            for s in socks:
                s.close()
            raise
        return cls(socks, opened)

    def poll(self, timeout: float = 0.0) -> None:
        """Note the sockets the daemon has closed (EOF or reset)."""
        live = [s for i, s in enumerate(self.socks) if i not in self.closed_at]
        if not live:
            return
        readable, _, _ = select.select(live, [], [], timeout)
        now = time.monotonic()
        for s in readable:
            try:
                s.setblocking(False)
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed_at[self.socks.index(s)] = now

    def open_count(self) -> int:
        self.poll()
        return len(self.socks) - len(self.closed_at)

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds from opening until the daemon had closed every one, or None if it had
        not within `timeout` s."""
        deadline = time.monotonic() + timeout
        while len(self.closed_at) < len(self.socks) and time.monotonic() < deadline:
            self.poll(0.1)
        if len(self.closed_at) < len(self.socks):
            return None
        return max(self.closed_at[i] - self.opened[i] for i in range(len(self.socks)))

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class Flood:
    """What happened when an A-ASSOCIATE-RQ declaring `declared` bytes was sent."""

    sent: int  # body bytes the daemon took before it closed the connection
    seconds: float  # until the daemon closed it (or we stopped)
    closed: bool


def oversized_associate_rq(port: int, declared: int = 1 << 30, stream: int = 256 * MiB,
                           timeout: float = 60.0) -> Flood:
    """Send an A-ASSOCIATE-RQ header declaring `declared` bytes, then up to `stream` bytes
    of junk as fast as the daemon takes them."""
    chunk = b"\xa5" * MiB
    sent = 0
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0x00, declared))
        s.settimeout(5)
        deadline = t0 + timeout
        try:
            while sent < stream and time.monotonic() < deadline:
                try:
                    n = s.send(chunk)
                except TimeoutError:
                    continue  # the daemon is not reading; see whether it closes
                sent += n
        except OSError:  # reset or broken pipe: the daemon closed the connection
            return Flood(sent, time.monotonic() - t0, True)
        closed = _closed_by_peer(s, max(0.0, deadline - time.monotonic()))
        return Flood(sent, time.monotonic() - t0, closed)


def _closed_by_peer(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait or 0.01)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def write_deflate_bomb(path: Path, inflated: int = 512 * MiB, rows: int = 16384) -> Path:
    """A Secondary Capture instance in Deflated Explicit VR Little Endian whose Pixel Data
    is `inflated` bytes of zeros: the file is about 1/1000 of that. Written as a stream
    (header, then zeros through one compressobj), so building it needs no big buffer."""
    cols = inflated // (rows * 2)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BOMB^TEST", "BOMB-1", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SECONDARY_CAPTURE, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False  # what is deflated
    write_dataset(head, ds)
    pixels = rows * cols * 2
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        meta_buf = DicomBytesIO()
        write_file_meta_info(meta_buf, meta)
        f.write(meta_buf.getvalue())
        f.write(z.compress(head.getvalue()))
        f.write(z.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels)))
        zeros = bytes(4 * MiB)
        left = pixels
        while left:
            n = min(left, len(zeros))
            f.write(z.compress(zeros[:n]))
            left -= n
        f.write(z.flush())
    return path
