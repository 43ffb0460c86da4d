"""One established association and the DIMSE exchanges on it: requests sent and their
responses awaited while watching the connection (see "Dead peers and slow links" in the
package docstring), a C-STORE whose data set is streamed from a reader (see "Large
instances"), and teardown that cannot hang.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.pdu_primitives import P_DATA

from appliance.core import pynetdicom_compat as compat
from appliance.forward.dicom.tls import Probe, classify_tls_error
from appliance.forward.netlink import link_silent

log = structlog.get_logger("appliance.forward.dicom")

POLL_S = 0.05
# A streamed data set: at most this much queued for the DUL thread at a time.
IN_FLIGHT_BYTES = 4 << 20
# Largest data set fragment of a streamed C-STORE, also when the peer's maximum PDU
# length is larger or unlimited (0): a fragment is read whole before it is queued.
MAX_FRAGMENT = 256 << 10
# A streamed data set reports progress after about this many bytes.
PROGRESS_BYTES = 4 << 20


class DataSource(Protocol):
    """A data set to stream: `read(n)` returns up to n bytes; b"" means the data set is
    complete *and verified*; an exception means it must not be completed."""

    def read(self, n: int, /) -> bytes: ...


def command_pdus(primitive: Any, context_id: int, max_pdu: int) -> list[P_DATA]:
    """The P-DATA primitives of a C-STORE-RQ's command set, encoded by pynetdicom itself,
    announcing a data set (Command Data Set Type 0x0001) that the caller sends separately.
    `primitive.DataSet` must be None (pynetdicom then encodes the command set only)."""
    msg = C_STORE_RQ()
    msg.primitive_to_message(primitive)
    msg.command_set.CommandDataSetType = 0x0001  # same length: the group length holds
    return list(msg.encode_msg(context_id, max_pdu))


def data_pdu(context_id: int, fragment: bytes, last: bool) -> P_DATA:
    """One data set fragment as a P-DATA primitive (message control header 0x00, or 0x02
    on the last fragment: PS3.8 E.2), as pynetdicom's `encode_msg` makes them."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, (b"\x02" if last else b"\x00") + fragment))
    return pdata


def fragment_size(max_pdu: int) -> int:
    """Data bytes per PDV for the peer's maximum PDU length (as pynetdicom: minus the
    6 bytes of PDV item header), at most MAX_FRAGMENT."""
    return min(max_pdu - 6, MAX_FRAGMENT) if max_pdu else MAX_FRAGMENT


def _fill(source: DataSource, n: int) -> bytes:
    """n bytes from `source`, fewer only at its (verified) end, b"" after it."""
    first = source.read(n)
    if len(first) >= n or not first:
        return first
    parts, got = [first], len(first)
    while got < n:
        piece = source.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def bounded(fn: Callable[[], object], limit: float) -> bool:
    """Run fn in a helper thread and wait at most `limit` s (pynetdicom's teardown can
    loop forever on a wedged reactor). True if it finished."""
    def run() -> None:
        with contextlib.suppress(Exception):
            fn()
    t = threading.Thread(target=run, name="dicom-teardown", daemon=True)
    t.start()
    t.join(limit)
    return not t.is_alive()


class Lost(Exception):
    """The association is gone or the peer stopped answering."""


class Link:
    """One established association and the DIMSE exchanges on it."""

    def __init__(self, assoc: Any, probe: Probe, timeout_s: float,
                 cancelled: threading.Event | None = None,
                 link_timeout_s: float | None = None) -> None:
        self.assoc = assoc
        self.probe = probe
        self.timeout = timeout_s
        self.link_timeout = link_timeout_s or timeout_s
        self.cancelled = cancelled or threading.Event()
        self._msg_id = 0
        self.accepted: dict[str, list[tuple[int, str]]] = {}
        for cx in assoc.accepted_contexts:
            self.accepted.setdefault(str(cx.abstract_syntax), []).append(
                (int(cx.context_id), str(cx.transfer_syntax[0])))
        self.done = False
        self._pause_reactor()

    def next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def lost_reason(self) -> str | None:
        if self.cancelled.is_set():
            return "the attempt ran out of its time budget"
        a = self.assoc
        tls = self.probe.tls_error
        if tls is not None:
            return classify_tls_error(tls)[1]
        sock = getattr(a.dul.socket, "socket", None)
        if not self.probe.link_silent and sock is not None and link_silent(sock, self.link_timeout):
            self.probe.link_silent = True
        if self.probe.link_silent:
            return (f"the link to the PACS went silent: nothing acknowledged within"
                    f" {self.link_timeout:g} s")
        if self.probe.write_timed_out:
            return f"no answer from the PACS within {self.timeout:g} s (it stopped reading)"
        if a.acse.is_aborted("a-abort"):
            return "the PACS aborted the association"
        dul = a.dul
        if (dul.state_machine.current_state == "Sta1" or not dul.is_alive()
                or a.acse.is_aborted() or not a.is_established):
            return "the connection to the PACS was lost"
        if a.acse.is_release_requested():
            return "the PACS released the association"
        return None

    def _pause_reactor(self) -> None:
        """Stop the association's own reactor for the life of the link, so that it never
        takes a response of ours off the DIMSE queue. (pynetdicom pauses it per request,
        which leaves a window right after each un-pause in which a fast response is taken
        and dropped as an "unexpected" message.) Nothing is lost: N-EVENT-REPORTs are
        dispatched by the DIMSE provider itself, aborts and releases are watched by
        `lost_reason`, and `release()` / `kill()` restart the reactor."""
        compat.pause_reactor(self.assoc)

    def request(self, primitive: Any, context_id: int) -> Any:
        """Send a request and wait for its response; raise Lost on a dead link or after
        `timeout` s without any traffic."""
        if (why := self.lost_reason()) is not None:
            raise Lost(why)
        self.probe.activity = time.monotonic()
        self.assoc.dimse.send_msg(primitive, context_id)
        return self._response(primitive.MessageID)

    def store_streamed(self, primitive: Any, context_id: int, source: DataSource,
                       progress: Callable[[int], None] | None = None) -> Any:
        """Send a C-STORE whose data set is read from `source` as it goes out, and wait
        for the response. At most IN_FLIGHT_BYTES are queued for the DUL thread at a
        time. The last fragment is queued only after `source.read` returned b"" (the data
        set is complete and verified); if `source` raises, the exception propagates with
        the message unfinished, and the caller must abort the association so that the
        peer drops what it got. `progress(n)` gets the data set bytes queued so far."""
        if (why := self.lost_reason()) is not None:
            raise Lost(why)
        self.probe.activity = time.monotonic()
        max_pdu = int(self.assoc.dimse.maximum_pdu_size or 0)
        frag = fragment_size(max_pdu)
        limit = max(2, IN_FLIGHT_BYTES // frag)
        for pdata in command_pdus(primitive, context_id, max_pdu):
            self._enqueue(pdata, limit)
        pending = _fill(source, frag)
        if not pending:
            raise ValueError("a streamed data set cannot be empty")
        done = reported = 0
        while next_piece := _fill(source, frag):
            self._enqueue(data_pdu(context_id, pending, False), limit)
            done += len(pending)
            pending = next_piece
            if progress is not None and done - reported >= PROGRESS_BYTES:
                progress(done)
                reported = done
        # `source` ended normally: the data set is complete and verified.
        self._enqueue(data_pdu(context_id, pending, True), limit)
        return self._response(primitive.MessageID)

    def _enqueue(self, pdata: P_DATA, limit: int) -> None:
        """Queue a PDU for the DUL thread once fewer than `limit` are waiting (its
        `queue.get` notifies `not_full`); raise Lost if the link dies or stalls meanwhile."""
        q = self.assoc.dul.to_provider_queue
        while True:
            with q.not_full:
                if len(q.queue) >= limit:
                    q.not_full.wait(POLL_S)
                if len(q.queue) < limit:
                    break
            if (why := self.lost_reason()) is not None:
                raise Lost(why)
            if time.monotonic() - self.probe.activity > self.timeout:
                raise Lost(f"no answer from the PACS within {self.timeout:g} s")
        self.assoc.dul.send_pdu(pdata)

    def _response(self, msg_id: int) -> Any:
        while True:
            msg = self._next()
            if msg is None:
                if (why := self.lost_reason()) is not None:
                    raise Lost(why)
                if time.monotonic() - self.probe.activity > self.timeout:
                    raise Lost(f"no answer from the PACS within {self.timeout:g} s")
                continue
            if getattr(msg, "MessageIDBeingRespondedTo", None) == msg_id:
                return msg

    def wait(self, until: float, done: threading.Event) -> bool:
        """Wait for `done` (set by a report handler) until `until`, watching the link;
        False if the link was lost meanwhile."""
        while not done.wait(POLL_S):
            if time.monotonic() >= until:
                return True
            if self.lost_reason() is not None:
                return False
        return True

    def _next(self) -> Any:
        """The next response on the queue; None if nothing came within one poll interval.
        (Requests from the peer do not come here: pynetdicom dispatches N-EVENT-REPORT
        itself, and a storage SCU is offered nothing else.)"""
        try:
            _, msg = self.assoc.dimse.msg_queue.get(timeout=POLL_S)
        except queue.Empty:
            return None
        if msg is None or getattr(msg, "MessageIDBeingRespondedTo", None) is None:
            return None
        return msg

    # teardown

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lost_reason() is not None:
            self._kill()
            return
        a = self.assoc
        compat.release_while_paused(a)  # the reactor is still waiting at our pause
        if not bounded(a.release, self.timeout + 5):
            log.warning("dicom.release_stuck")

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.lost_reason() is not None:
            self._kill()
            return
        self._drop_pending()
        if not bounded(self.assoc.abort, 10):
            log.warning("dicom.abort_stuck")

    def kill(self) -> None:
        if self.done:
            return
        self.done = True
        self._kill()

    def _kill(self) -> None:
        a = self.assoc
        sock = getattr(a.dul.socket, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2
        while a.dul.is_alive() and a.dul.state_machine.current_state != "Sta1" \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        self._drop_pending()
        if not bounded(a.kill, 5):
            log.warning("dicom.kill_stuck")
        close_socket(a)

    def _drop_pending(self) -> None:
        # PDUs of an instance still queued for a dead socket would make the DUL replay
        # them into a closed state machine.
        q = self.assoc.dul.to_provider_queue
        with q.mutex:
            q.queue.clear()



def close_socket(assoc: Any) -> None:
    """Close what pynetdicom leaves open after a failed negotiation or a lost peer."""
    holder = getattr(assoc.dul, "socket", None)
    sock = getattr(holder, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
