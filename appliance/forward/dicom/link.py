"""One established association and the DIMSE exchanges on it: requests sent and their
responses awaited while watching the connection (see "Dead peers and slow links" in the
package docstring), and teardown that cannot hang.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from appliance.forward.dicom.tls import Probe, classify_tls_error

log = structlog.get_logger("appliance.forward.dicom")

POLL_S = 0.05


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

    def __init__(self, assoc: Any, probe: Probe, timeout_s: float) -> None:
        self.assoc = assoc
        self.probe = probe
        self.timeout = timeout_s
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
        a = self.assoc
        tls = self.probe.tls_error
        if tls is not None:
            return classify_tls_error(tls)[1]
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
        a = self.assoc
        a._reactor_checkpoint.clear()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if a._is_paused:
                time.sleep(0.002)  # still paused: it is really waiting, not passing by
                if a._is_paused:
                    return
            time.sleep(0.0005)

    def request(self, primitive: Any, context_id: int) -> Any:
        """Send a request and wait for its response; raise Lost on a dead link or after
        `timeout` s without any traffic."""
        if (why := self.lost_reason()) is not None:
            raise Lost(why)
        self.probe.activity = time.monotonic()
        self.assoc.dimse.send_msg(primitive, context_id)
        msg_id = primitive.MessageID
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
        if not a._reactor_checkpoint.is_set():
            # The reactor is still waiting at our pause, but pynetdicom's handling of an
            # N-EVENT-REPORT (in a thread of its own) ends with `_is_paused = False`, and
            # release() would then wait for a pause that never comes.
            a._is_paused = True
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


def nodelay(event: Any) -> None:
    with contextlib.suppress(Exception):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

