"""Intake: where pynetdicom puts a C-STORE data set while it arrives, with bounded memory.

pynetdicom normally collects a data set in a BytesIO, so a 1 GB multi-frame instance
costs 1 GB (and more) of RAM before our handler even runs. Its opt-in
`STORE_RECV_CHUNKED_DATASET` mode writes the data set to a `NamedTemporaryFile` instead:
plaintext patient data on disk, which the appliance must never have. `install` keeps that
mode and has the three names it uses in `pynetdicom.dimse_messages` swapped for ours, so
every C-STORE data set goes into an `InstanceBuffer`:

- up to `receive.in_memory_limit_mb` it is kept in memory as the list of PDU pieces (no
  BytesIO growth copies; `Spool.store` seals it as before);
- past that, it is sealed into `STATE/spool/.tmp-<id>` as it arrives (`spool.Incoming`):
  memory stays at about one PDU and one 1 MiB chunk, whatever the instance size, and the
  leading `IDENTIFY_PREFIX` bytes are kept for `receive.identify`.

pynetdicom writes the 128-byte preamble, "DICM" and its own file meta before the data set;
the buffer drops those and starts with our file meta (`receive.part10_header`, which also
names the calling AE), so the spool holds the same bytes either way. After the handler,
pynetdicom closes the buffer and unlinks `name`: that is the temp path, which by then is
renamed (stored) or removed (refused), so the unlink finds nothing. An association that
dies mid-instance drops its buffer; its temp file is removed when the buffer is collected
(`weakref.finalize`), and at the latest by `Spool.recover` at the next start.

How it fails: a full spool or a disk error while sealing marks the buffer `failed`
(further data is dropped, the temp removed); so does a data set that grows past
`receive.max_instance_mb` ("too_large"): nothing of it is kept in memory or on disk from
then on. The handler answers with that outcome once the data set is complete, as for an
in-memory instance. The swap itself is
`core.pynetdicom_compat.route_chunked_store`, checked by tests/test_pynetdicom_compat.py.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import structlog

from appliance.core import durable
from appliance.core import pynetdicom_compat as compat
from appliance.core.errors import SpoolFullError
from appliance.receive.identify import part10_header
from appliance.spool.store import Incoming, Spool, new_id

log = structlog.get_logger("appliance.intake")

# While sealing to disk, check the free-space reserve again after this many bytes.
ROOM_CHECK_BYTES = 4 << 20  # a statvfs (~10 us) per 4 MiB: noise
# Bytes of the instance kept in memory for `identify` once it is sealed to disk.
IDENTIFY_PREFIX = 4 << 20


class _CommandFacts(tuple[str, str, str]):
    """What pynetdicom would have put in its file meta: SOP class, instance, syntax."""


def _command_facts(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                   **_: Any) -> _CommandFacts:
    return _CommandFacts((str(sop_class_uid or ""), str(sop_instance_uid or ""), str(transfer_syntax)))


def _take_facts(fp: Any, facts: _CommandFacts, *_: Any, **__: Any) -> None:
    fp.begin(facts)


def _calling_ae() -> str:
    # pynetdicom decodes P-DATA on the association's DUL thread, which knows its association.
    assoc = getattr(threading.current_thread(), "assoc", None)
    return str(getattr(getattr(assoc, "requestor", None), "ae_title", "") or "").strip()


class InstanceBuffer:
    """One C-STORE data set as it arrives: in memory while small, sealed to disk when large."""

    def __init__(self, spool: Spool, limit: int, max_size: int) -> None:
        self._part10_header = part10_header
        self._spool = spool
        self._limit = limit
        self._max_size = max_size  # of the data set; past it everything is dropped
        rid = new_id()
        # pynetdicom unlinks `name` after the handler; see the module docstring.
        self.name = str(spool.dir / f"{durable.TEMP_PREFIX}{rid}")
        self.file = self  # pynetdicom calls .file.flush() after each write
        self.facts: _CommandFacts | None = None
        self.calling_ae = ""
        self.parts: list[bytes] = []
        self.size = self.head_size = 0
        self.incoming: Incoming | None = None
        self.prefix = bytearray()
        self.failed: str | None = None  # receive.STATUS outcome, or "aborted"
        self._next_room_check = 0

    @property
    def complete_prefix(self) -> bool:
        """Whether `prefix` holds the whole instance (only meaningful once sealing to disk)."""
        return len(self.prefix) >= self.size

    # --- what pynetdicom calls ---

    def begin(self, facts: _CommandFacts) -> None:
        self.facts = facts
        self.calling_ae = _calling_ae()
        head = self._part10_header(*facts, self.calling_ae)
        self.parts.append(head)
        self.size = self.head_size = len(head)
        if self._limit == 0:
            self._spill()

    def write(self, data: bytes) -> None:
        if self.facts is None or self.failed:
            return  # pynetdicom's preamble and "DICM" (our head replaces them), or given up
        self.size += len(data)
        if self.size - self.head_size > self._max_size:
            self._fail("too_large")  # keeps nothing, seals nothing more; answered 0xA702
            return
        if self.incoming is None:
            self.parts.append(data)
            if self.size > self._limit:
                self._spill()
            return
        if len(self.prefix) < IDENTIFY_PREFIX:
            self.prefix += data[: IDENTIFY_PREFIX - len(self.prefix)]
        self._seal(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """pynetdicom is done with the buffer; the handler has stored or refused it."""
        self.parts = []
        if self.incoming is not None:
            self.incoming.discard()  # no-op once renamed into the spool

    def abandon(self) -> None:
        """The association ended before the data set was complete: drop what we have."""
        self._fail("aborted")

    # --- to disk ---

    def _spill(self) -> None:
        try:
            self._spool.check_room(self.size)
            self.incoming = self._spool.incoming()
        except SpoolFullError:
            self._fail("spool_full")
            return
        except OSError as e:
            self._fail("disk_error", e)
            return
        weakref.finalize(self, self.incoming.discard)
        for p in self.parts:
            if len(self.prefix) < IDENTIFY_PREFIX:
                self.prefix += p[: IDENTIFY_PREFIX - len(self.prefix)]
        self._next_room_check = self.size + ROOM_CHECK_BYTES
        parts, self.parts = self.parts, []
        for p in parts:
            self._seal(p)

    def _seal(self, data: bytes) -> None:
        if self.failed or self.incoming is None:
            return
        try:
            if self.size >= self._next_room_check:
                self._spool.check_room(ROOM_CHECK_BYTES)
                self._next_room_check = self.size + ROOM_CHECK_BYTES
            self.incoming.write(data)
        except SpoolFullError:
            self._fail("spool_full")
        except OSError as e:
            self._fail("disk_error", e)
        except ValueError:  # closed under us by `abandon` (another thread): already failed
            self._fail("aborted")

    def _fail(self, outcome: str, err: OSError | None = None) -> None:
        if err is not None:
            log.error("store.disk_error", error=err.strerror, errno=err.errno)
        self.failed = self.failed or outcome
        self.parts = []
        self.prefix = bytearray()
        if self.incoming is not None:
            self.incoming.discard()


def install(spool: Spool, in_memory_limit: int, max_size: int) -> None:
    """Route every C-STORE data set pynetdicom receives in this process into an InstanceBuffer;
    data sets over `max_size` bytes are refused (outcome "too_large")."""
    def factory(*_: Any, **__: Any) -> InstanceBuffer:
        return InstanceBuffer(spool, in_memory_limit, max_size)

    compat.route_chunked_store(factory, _command_facts, _take_facts)
