"""One instance on its way to the PACS: its C-STORE request, its data set read past the
File Meta Information, the context it goes in, and the operator's reasons when it cannot go.

Helpers of `DicomTransport` (transport.py), module functions with no state: `_choices`
(how each instance of a group goes on the association accepted), `_store_request`,
`_read_past_meta` and `_DataSet` (a streamed instance's data set: the bytes read with
the meta, then the rest of the bundle stream), `_unconvertible` (why a conversion
failed, as the operator reads it) and `_Sent` (what one `send` counted).

How it fails: `Permanent` naming the instance by its index in the bundle (an invalid UID,
a meta longer than MAX_META, no data set, no acceptable context), never by UID.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE

from appliance.bundle.format import InstanceStream, ManifestEntry
from appliance.forward import Permanent
from appliance.forward.dicom.contexts import Choice, choose_context, dataset_offset
from appliance.forward.dicom.link import Link
from appliance.pack import codec

# The File Meta Information of a streamed instance is read in pieces of this size and
# must end within MAX_META bytes.
META_READ = 64 << 10
MAX_META = 1 << 20


@dataclass
class _Sent:
    count: int = 0
    bytes: int = 0
    converted: dict[str, int] = field(default_factory=dict)  # "from -> to" -> count

def _progress_from(progress: Callable[[int], None], base: int, n: int) -> None:
    progress(base + n)


def _choices(link: Link, entries: Sequence[ManifestEntry]) -> list[Choice]:
    """How each instance goes on this association; Permanent naming every instance that
    cannot go at all (checked before anything is sent), so all of them are set aside."""
    choices, refused, first = [], [], None
    for e in entries:
        try:
            choices.append(choose_context(link.accepted, e.sop_class, e.transfer_syntax))
        except Permanent as p:
            refused.append(e.index)
            first = first or p
    if first is not None:
        raise Permanent(str(first) + (f" (instances {', '.join(map(str, refused))})"
                                      if len(refused) > 1 else ""), instances=tuple(refused))
    return choices


def _undecodable(entry: ManifestEntry, e: codec.CodecError) -> Permanent:
    return Permanent(f"instance {entry.index}: the PACS does not accept {UID(entry.transfer_syntax).name} "
                     f"for {UID(entry.sop_class).name}, and it cannot be decompressed ({e})")


def _unconvertible(entry: ManifestEntry, e: codec.CodecError) -> Permanent:
    """Why an instance cannot be sent converted, as the operator reads it."""
    kind = getattr(e, "kind", "undecodable")
    if kind == "undecodable":
        return _undecodable(entry, e)
    if kind == "layout":
        return Permanent(f"instance {entry.index}: {e}")
    if kind == "implicit":
        return Permanent(f"instance {entry.index}: cannot be re-encoded as Implicit VR Little Endian ({e})")
    return Permanent(f"instance {entry.index}: cannot be converted for this PACS: {e}")


def _count_conversion(sent: _Sent, entry: ManifestEntry, choice: Choice) -> None:
    key = f"{UID(entry.transfer_syntax).name} -> {UID(choice.transfer_syntax).name}"
    sent.converted[key] = sent.converted.get(key, 0) + 1


def _store_request(link: Link, entry: ManifestEntry) -> C_STORE:
    req = C_STORE()
    req.MessageID = link.next_id()
    req.Priority = 2
    try:
        req.AffectedSOPClassUID = entry.sop_class
        req.AffectedSOPInstanceUID = entry.sop_instance_uid
    except ValueError:
        raise Permanent(f"instance {entry.index} has an invalid SOP class or instance UID") from None
    return req


def _read_past_meta(stream: InstanceStream, index: int) -> bytes:
    """Read `stream` past the preamble and File Meta Information; returns the data set
    bytes read with them (at least one)."""
    buf = bytearray()
    while True:
        piece = stream.read(META_READ)
        buf += piece
        more = bool(piece) and len(buf) < MAX_META
        try:
            start = dataset_offset(buf)
        except ValueError as e:
            if more and (len(buf) < 132 or "truncated" in str(e)):
                continue
            raise Permanent(f"instance {index}: {e}") from None
        if start < len(buf):
            return bytes(buf[start:])
        if not piece:
            raise Permanent(f"instance {index} has no data set")
        if not more:
            raise Permanent(f"instance {index}: the file meta information is longer than {MAX_META} bytes")


class _DataSet:
    """The data set of a streamed instance: the bytes read with the meta, then the rest of
    the stream. b"" (from the stream) means the instance verified."""

    def __init__(self, head: bytes, rest: InstanceStream) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def read(self, n: int, /) -> bytes:
        if self._head:
            out = bytes(self._head[:n])
            self._head = self._head[n:]
            return out
        return self._rest.read(n)
