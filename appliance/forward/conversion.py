"""Conversion for a peer that refuses an instance's transfer syntax, in worker processes,
capped in output, time and memory.

A PACS that does not accept JPEG 2000 gets the instance decompressed to Explicit VR
Little Endian (or re-encoded Implicit VR LE): `pack.codec.decompress` for a whole
instance, `forward.convert` frame by frame for a large one. Both decode data that came
from a scanner; a hostile or broken codestream can crash the decoder, hang it, or make
it allocate gigabytes (a 250 KiB JPEG 2000 slice whose SIZ marker says 20000 x 20000
makes OpenJPEG touch 2.3 GiB before it fails). So none of it runs in the daemon: a
`Converter` owns a few worker processes (forkserver children, as the codec pool's), each
doing one conversion at a time, and the daemon only relays bytes:

* input: the worker asks for it (`R`), the daemon answers from the bundle's
  `InstanceStream` in pieces of at most `DATA_PIECE` (small enough to fit the socket's
  buffer, so that answering never blocks); the end of the instance (b"") is only ever
  sent once the stream verified it, and the worker reports success only after it has
  read that end, so a converted instance never completes unless its source was whole;
* output: `B` (what follows: streamed, or whole and how long; why the streaming
  conversion could not take it), then `O` pieces, then `F`; or `E` with the reason it
  cannot be converted, after which the worker is ready for the next job.

Limits, each ending in `ConversionFailed` (the instance cannot be converted: the
transport makes it Permanent for that instance) and, where the worker may be in any
state, in SIGKILL and a fresh worker for the next job:

* output: the worker refuses to produce more than `Job.max_output` (the configured
  `receive.max_instance_mb`), checked before decoding from the image attributes
  (`codec.decompress`, `convert`); the daemon kills a worker that sends more anyway;
* time: the worker may spend `TIME_BASE_S` + `TIME_PER_MIB_S` per MiB of the instance
  (as it is in the bundle) working; time the daemon spends sending its output to the
  PACS does not count;
* memory: `MEMORY_BASE` + `MEMORY_PER_INPUT` x the instance's bundle size above the
  worker's resident size at the start of the job, checked every `WATCH_S` while the
  daemon waits; and the workers volunteer to the kernel's OOM killer
  (`oom_score_adj` 1000) so that memory pressure takes a worker, not the daemon. (No
  `setrlimit`: the shipped unit's `SystemCallFilter=~@resources` kills a process that
  calls it.)
* a worker that dies (a decoder crash) or breaks the protocol is the same failure.

`Unavailable` (no worker could be started, or all were busy for `CHECKOUT_S`) is the
daemon's state, not the instance's: the transport makes it Retryable.

Nothing is written to disk; nothing from the data appears in a message (reasons are this
code's own texts and exception class names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from io import BytesIO
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from appliance.core import part10
from appliance.forward import convert
from appliance.pack import codec

log = structlog.get_logger("appliance.forward.conversion")

MiB = 1 << 20
DATA_PIECE = 64 << 10  # input per answer: fits an AF_UNIX socket buffer (~208 KiB) whole
OUTPUT_PIECE = 1 << 20
MAX_MESSAGE = OUTPUT_PIECE + 4096
TIME_BASE_S = 60.0
TIME_PER_MIB_S = 2.0
MEMORY_BASE = 512 * MiB
MEMORY_PER_INPUT = 16
WATCH_S = 0.05
CHECKOUT_S = 60.0
SEND_S = 10.0  # a message to an idle worker (it is waiting to read it)

_HEADER = struct.Struct("<Lc")


@dataclass(frozen=True)
class Job:
    """One conversion: `how` ("explicit" or "implicit") the PACS takes the instance,
    which is in `transfer_syntax` and `size` bytes long in the bundle; `streamed`:
    decode frame by frame as it goes out (else whole); `max_output`: most bytes out."""

    how: str
    transfer_syntax: str
    size: int
    streamed: bool
    max_output: int


class ConversionFailed(codec.CodecError):
    """This instance cannot be converted. `kind`: "undecodable" (the codec says so
    before any output), "layout" (no file meta to find the data set by), "implicit"
    (the Implicit VR re-encoding failed), "midway" (a streamed conversion found out
    after output began), "worker" (the worker died, broke a limit or the protocol)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Unavailable(Exception):
    """No conversion worker to be had right now (not the instance's fault)."""


# --- framing (both sides) ------------------------------------------------------------------


def _send(sock: socket.socket, kind: bytes, payload: bytes | memoryview = b"") -> None:
    sock.sendall(_HEADER.pack(len(payload), kind))
    if payload:
        sock.sendall(payload)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a blocking socket (the worker's side); EOFError if it closes."""
    parts, got = [], 0
    while got < n:
        piece = sock.recv(min(n - got, MAX_MESSAGE))
        if not piece:
            raise EOFError
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def _recv(sock: socket.socket) -> tuple[bytes, bytes]:
    length, kind = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if length > MAX_MESSAGE:
        raise EOFError
    return kind, _recv_exactly(sock, length) if length else b""


# --- the worker ----------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class _Remote:
    """The instance, read from the daemon: `read(n)` as a file's, b"" at its verified end."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.eof = False

    def read(self, n: int) -> bytes:
        if self.eof or n <= 0:
            return b""
        _send(self._sock, b"R", struct.pack("<L", min(n, OUTPUT_PIECE)))
        kind, data = _recv(self._sock)
        if kind != b"D":
            raise EOFError
        self.eof = not data
        return data

    def read_all(self) -> bytes:
        parts = []
        while piece := self.read(OUTPUT_PIECE):
            parts.append(piece)
        return b"".join(parts)


class _Output:
    def __init__(self, sock: socket.socket, cap: int) -> None:
        self._sock = sock
        self._cap = cap
        self.size = 0
        self.begun = False

    def begin(self, streaming: bool, whole_reason: str | None, length: int | None) -> None:
        self.begun = True
        _send(self._sock, b"B", json.dumps({"streaming": streaming, "whole_reason": whole_reason,
                                           "length": length}).encode())

    def write(self, piece: bytes | memoryview) -> None:
        self.size += len(piece)
        if self.size > self._cap:
            raise _Refused("midway" if self.begun else "undecodable", "decoded-too-large")
        _send(self._sock, b"O", piece)


def _serve(sock: socket.socket) -> None:
    """A conversion worker's life: jobs one after another until the daemon hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # under memory pressure, take a worker rather than the daemon
    lg = logging.getLogger("pydicom")
    lg.handlers[:] = [logging.NullHandler()]
    lg.propagate = False
    while True:
        try:
            kind, payload = _recv(sock)
        except (EOFError, OSError):
            return
        if kind != b"J":
            return
        _run(sock, Job(**json.loads(payload)))


def _run(sock: socket.socket, job: Job) -> None:
    inp, out = _Remote(sock), _Output(sock, job.max_output)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if job.streamed and job.how == "explicit":
                _streamed(inp, out, job)
            else:
                _whole(inp.read_all(), out, job, None)
    except _Refused as e:
        _send(sock, b"E", json.dumps({"kind": e.kind, "text": str(e)}).encode())
    except codec.CodecError as e:
        _send(sock, b"E", json.dumps({"kind": "midway" if out.begun else "undecodable",
                                      "text": str(e)}).encode())
    except (EOFError, OSError):
        raise SystemExit(0) from None  # the daemon is gone or gave up on this job
    except Exception as e:  # the boundary: a bad instance never kills the worker
        _send(sock, b"E", json.dumps({"kind": "midway" if out.begun else "undecodable",
                                      "text": f"decode-error: {type(e).__name__}"}).encode())
    else:
        _send(sock, b"F")


def _streamed(inp: _Remote, out: _Output, job: Job) -> None:
    try:
        conv = convert.open_conversion(inp.read, job.max_output)
    except codec.CodecError as e:
        raise _Refused("undecodable", str(e)) from None
    if isinstance(conv, convert.Fallback):
        _whole(conv.consumed + inp.read_all(), out, job, conv.reason)
        return
    out.begin(True, None, None)
    while piece := conv.read(OUTPUT_PIECE):
        out.write(piece)


def _whole(data: bytes, out: _Output, job: Job, whole_reason: str | None) -> None:
    if job.transfer_syntax != ExplicitVRLittleEndian:
        try:
            data = codec.decompress(data, job.max_output)
        except codec.CodecError as e:
            raise _Refused("undecodable", str(e)) from None
    try:
        start = part10.dataset_offset(data)
    except part10.Malformed as e:
        raise _Refused("layout", f"the file meta information: {e}") from None
    payload = memoryview(_to_implicit(data)) if job.how == "implicit" else memoryview(data)[start:]
    out.begin(False, whole_reason, len(payload))
    for i in range(0, len(payload), OUTPUT_PIECE):
        out.write(payload[i : i + OUTPUT_PIECE])


def _to_implicit(part10_explicit: bytes) -> bytes:
    """The data set of an Explicit VR LE instance re-encoded as Implicit VR LE (for a
    peer that takes nothing else). pydicom re-encodes the elements; values do not change."""
    try:
        ds = dcmread(BytesIO(part10_explicit), force=True)
        out = encode(ds, True, True)
    except Exception as e:
        raise _Refused("implicit", type(e).__name__) from None
    if out is None:
        raise _Refused("implicit", "nothing encoded")
    return out


# --- the daemon's side -------------------------------------------------------------------


class _Worker:
    def __init__(self, ctx: Any, serve: Callable[[socket.socket], None]) -> None:
        mine, theirs = socket.socketpair()
        try:
            self.process = ctx.Process(target=serve, args=(theirs,), name="appliance-convert",
                                       daemon=True)
            self.process.start()
        finally:
            theirs.close()
        self.sock = mine
        self.pid: int = self.process.pid

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self.process.join(5)
        self.sock.close()

    def stop(self) -> None:
        self.sock.close()  # the worker sees EOF between jobs and returns
        self.process.join(2)
        if self.process.is_alive():
            self.kill()

    def death(self) -> str:
        self.process.join(2)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"the conversion worker died ({signal.Signals(-code).name})"
        return f"the conversion worker exited ({code})"


class Converter:
    """Conversion workers, started when first needed and kept while idle (one per
    concurrent conversion, at most `workers`). `serve` is the worker's main function
    (a module-level callable; tests give one that misbehaves)."""

    def __init__(self, workers: int = 2, *, start_method: str = "forkserver",
                 serve: Callable[[socket.socket], None] = _serve) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn'")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["appliance.pack.codec"])  # as pack.pool does
        self._serve = serve
        self._max = max(1, workers)
        self._idle: list[_Worker] = []
        self._running = 0
        self._cond = threading.Condition()
        self._closed = False

    def open(self, job: Job, read: Callable[[int], bytes]) -> Conversion:
        """Start converting the instance `read` returns (the bundle's InstanceStream.read);
        returns once the output begins. ConversionFailed if it cannot be converted,
        Unavailable if no worker can take it; exceptions of `read` propagate."""
        worker = self._checkout()
        conv = Conversion(self, worker, job, read)
        try:
            conv.start()
        except BaseException:
            conv.close()
            raise
        return conv

    def _checkout(self) -> _Worker:
        deadline = time.monotonic() + CHECKOUT_S
        with self._cond:
            while not self._idle and self._running >= self._max:
                if self._closed or not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise Unavailable("every conversion worker is busy")
            if self._closed:
                raise Unavailable("the converter is closed")
            if self._idle:
                return self._idle.pop()
            self._running += 1
        try:
            return _Worker(self._ctx, self._serve)
        except Exception as e:
            self._release(None)
            raise Unavailable(f"cannot start a conversion worker ({type(e).__name__})") from None

    def _release(self, worker: _Worker | None) -> None:
        """A worker back after a job: idle again, or (None) gone."""
        with self._cond:
            if worker is not None and not self._closed:
                self._idle.append(worker)
            else:
                self._running -= 1
                if worker is not None:
                    worker.stop()
            self._cond.notify()

    def pids(self) -> list[int]:
        """The idle workers' process ids (for tests and benchmarks)."""
        with self._cond:
            return [w.pid for w in self._idle]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._running -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.stop()

    def __enter__(self) -> Converter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Conversion:
    """One conversion in progress: the converted data set, `read(n)` piece by piece (a
    `link.DataSource`: b"" only once the worker finished and the source was read to its
    verified end). `close()` when done; a conversion not finished cleanly takes its
    worker with it."""

    def __init__(self, owner: Converter, worker: _Worker, job: Job, read: Callable[[int], bytes]) -> None:
        self._owner = owner
        self._worker: _Worker | None = worker
        self._job = job
        self._source = read
        self._budget = TIME_BASE_S + TIME_PER_MIB_S * job.size / MiB
        self._rss_limit = worker.rss() + MEMORY_BASE + MEMORY_PER_INPUT * job.size
        self._buf = memoryview(b"")
        self._eof_served = False
        self._finished = False
        self._clean = False  # the worker is between jobs and may be used again
        self.bytes_read = 0  # of the instance, from the source
        self.output = 0
        self.streaming = False
        self.whole_reason: str | None = None
        self.length: int | None = None

    def start(self) -> None:
        """Send the job; serve the worker's reads until its output begins."""
        worker = self._live()
        worker.sock.settimeout(SEND_S)
        try:
            _send(worker.sock, b"J", json.dumps(asdict(self._job)).encode())
        except OSError:
            self._fail("the conversion worker does not take jobs")
        while True:
            kind, payload = self._next()
            if kind == b"B":
                info = json.loads(payload)
                self.streaming, self.whole_reason = bool(info["streaming"]), info["whole_reason"]
                self.length = info["length"]
                return
            if kind == b"O" or kind == b"F":
                self._fail("the conversion worker broke the protocol")

    def read(self, n: int, /) -> bytes:
        while not self._buf and not self._finished:
            kind, payload = self._next()
            if kind == b"O":
                self.output += len(payload)
                if self.output > self._job.max_output:
                    self._fail(f"the conversion gave more than {self._job.max_output} bytes")
                self._buf = memoryview(payload)
            elif kind == b"F":
                if not self._eof_served:
                    self._fail("the conversion worker finished before reading the whole instance")
                self._finished = self._clean = True
            else:
                self._fail("the conversion worker broke the protocol")
        out, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return out

    def read_all(self) -> bytes:
        parts = []
        while piece := self.read(OUTPUT_PIECE):
            parts.append(piece)
        return b"".join(parts)

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._clean:
            self._owner._release(worker)
        else:
            worker.kill()
            self._owner._release(None)

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the exchange ---

    def _live(self) -> _Worker:
        if self._worker is None:
            raise ConversionFailed("worker", "the conversion is closed")
        return self._worker

    def _fail(self, text: str) -> None:
        """The worker is in an unknown state: kill it, fail the instance."""
        worker, self._worker = self._worker, None
        if worker is not None:
            log.warning("conversion.worker_killed", pid=worker.pid, reason=text)
            worker.kill()
            self._owner._release(None)
        raise ConversionFailed("worker", text)

    def _next(self) -> tuple[bytes, bytes]:
        """The worker's next message other than a read (those are answered here); E
        raises ConversionFailed with the worker's reason."""
        while True:
            kind, payload = self._receive()
            if kind == b"R":
                self._answer(struct.unpack("<L", payload)[0] if len(payload) == 4 else 0)
                continue
            if kind == b"E":
                info = json.loads(payload)
                self._clean = True  # the worker caught it and waits for the next job
                self.close()
                raise ConversionFailed(str(info.get("kind", "undecodable")), str(info.get("text", "")))
            return kind, payload

    def _answer(self, n: int) -> None:
        worker = self._live()
        data = b"" if self._eof_served else self._source(min(max(n, 1), DATA_PIECE))
        if not data:
            self._eof_served = True  # the source ended: verified (it raises otherwise)
        self.bytes_read += len(data)
        worker.sock.settimeout(SEND_S)
        try:
            _send(worker.sock, b"D", data)
        except OSError:
            self._fail(self._live().death())

    def _receive(self) -> tuple[bytes, bytes]:
        """One whole message, waiting at most what is left of the time budget and
        watching the worker's memory meanwhile."""
        header = self._exactly(_HEADER.size)
        length, kind = _HEADER.unpack(header)
        if length > MAX_MESSAGE:
            self._fail("the conversion worker broke the protocol")
        return kind, self._exactly(length) if length else b""

    def _exactly(self, n: int) -> bytes:
        worker = self._live()
        parts, got = [], 0
        while got < n:
            t0 = time.monotonic()
            worker.sock.settimeout(WATCH_S)
            try:
                piece = worker.sock.recv(min(n - got, MAX_MESSAGE))
            except TimeoutError:
                piece = None
            except OSError:
                piece = b""
            self._budget -= time.monotonic() - t0
            if piece == b"":
                self._fail(worker.death())
            if self._budget < 0:
                self._fail(f"the conversion took longer than its time limit "
                           f"({TIME_BASE_S + TIME_PER_MIB_S * self._job.size / MiB:.0f} s)")
            if worker.rss() > self._rss_limit:
                self._fail(f"the conversion worker used more than its memory limit "
                           f"({self._rss_limit // MiB} MiB)")
            if piece:
                parts.append(piece)
                got += len(piece)
        return b"".join(parts)


__all__ = ["Converter", "Conversion", "ConversionFailed", "Job", "Unavailable"]
