"""Pure presentation-context logic: which contexts a bundle needs, how they are split
over associations, which accepted context carries an instance, and where the data set
starts in a Part-10 file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from appliance.core import part10
from appliance.forward import Permanent

STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
VERIFICATION = UID("1.2.840.10008.1.1")  # C-ECHO, to probe a PACS
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")  # the well-known SOP instance
MAX_CONTEXTS = 128  # pynetdicom (and PS3.8: odd context ids 1..255)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


ContextSpec = tuple[str, tuple[str, ...]]  # (abstract syntax, transfer syntaxes)


@dataclass(frozen=True)
class Group:
    """Instances [start, stop) of a bundle and the contexts one association needs for them."""

    start: int
    stop: int
    contexts: tuple[ContextSpec, ...]


def contexts_for(sop_class: str, transfer_syntax: str) -> list[ContextSpec]:
    """The contexts an instance needs: its own syntax alone, so that a peer that takes it
    gets the bytes as they are (even Explicit VR LE: offered only in the pair, a peer that
    prefers Implicit VR would pick that), and the uncompressed pair as the fallback."""
    return [(sop_class, (transfer_syntax,)), (sop_class, UNCOMPRESSED)]


def plan_groups(instances: Sequence[tuple[str, str]], commitment: bool = False,
                limit: int = MAX_CONTEXTS) -> list[Group]:
    """Split a bundle's (sop_class, transfer_syntax) list, in order, into runs whose
    contexts fit one association (`limit`, minus one reserved for Storage Commitment).
    Each group's context list starts with its contexts in first-use order."""
    room = limit - (1 if commitment else 0)
    if room < 2:
        raise ValueError("context limit too small")
    groups: list[Group] = []
    start = 0
    current: dict[ContextSpec, None] = {}
    for i, (sop, ts) in enumerate(instances):
        new = [c for c in contexts_for(sop, ts) if c not in current]
        if len(current) + len(new) > room:
            groups.append(Group(start, i, tuple(current)))
            start, current = i, {}
            new = contexts_for(sop, ts)
        for c in new:
            current[c] = None
    if instances:
        groups.append(Group(start, len(instances), tuple(current)))
    return groups


@dataclass(frozen=True)
class Choice:
    context_id: int
    how: str  # "as-is" | "explicit" | "implicit"
    transfer_syntax: str  # what goes on the wire


def uid_name(uid: str) -> str:
    """A SOP class / transfer syntax as people know it: "CT Image Storage (1.2...)"."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def choose_context(accepted: Mapping[str, Sequence[tuple[int, str]]], sop_class: str,
                   transfer_syntax: str) -> Choice:
    """Which accepted context carries an instance, and how; Permanent if none can.

    `accepted` maps SOP class -> [(context id, accepted transfer syntax)].
    """
    options = accepted.get(sop_class, ())
    if not options:
        raise Permanent(f"the PACS does not accept SOP class {uid_name(sop_class)}")
    for cx, ts in options:
        if ts == transfer_syntax:
            return Choice(cx, "as-is", ts)
    for wanted, how in ((ExplicitVRLittleEndian, "explicit"), (ImplicitVRLittleEndian, "implicit")):
        for cx, ts in options:
            if ts == wanted:
                return Choice(cx, how, ts)
    names = ", ".join(sorted({UID(ts).name for _, ts in options}))
    raise Permanent(f"the PACS accepts SOP class {uid_name(sop_class)} only as {names}, "
                    f"and this appliance cannot convert {UID(transfer_syntax).name} to that")


def dataset_offset(part10_file: bytes | bytearray | memoryview) -> int:
    """Where the data set starts in a Part-10 file (after preamble, DICM and group 2).
    ValueError when it cannot say; "truncated" in its message when more of the file
    could tell."""
    try:
        return part10.dataset_offset(part10_file)
    except part10.NotPart10:
        raise ValueError("not a DICOM Part-10 file") from None
    except part10.Truncated:
        raise ValueError("the file meta information is truncated") from None
    except part10.Malformed as e:
        raise ValueError(f"the file meta information is malformed ({e})") from None
