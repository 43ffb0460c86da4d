"""Pure decision tables: C-STORE / N-ACTION response statuses, storage commitment
failure reasons, A-ASSOCIATE-RJ reasons. See the package docstring for the decisions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

# --- pure: status classification ------------------------------------------------------


class Outcome(enum.Enum):
    SUCCESS = "success"
    WARNING = "warning"  # delivered; log it
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    meaning: str


_S, _W, _R, _P = Outcome.SUCCESS, Outcome.WARNING, Outcome.RETRY, Outcome.PERMANENT

# PS3.7 Annex C (general) and PS3.4 B.2.3 (storage) statuses with a single code.
_STATUS: dict[int, tuple[Outcome, str]] = {
    0x0000: (_S, "success"),
    0x0001: (_W, "requested optional attributes are not supported"),
    0x0107: (_W, "attribute list error"),
    0x0116: (_W, "attribute value out of range"),
    0x0111: (_W, "duplicate SOP instance: the PACS already has it"),
    0x0105: (_P, "no such attribute"),
    0x0106: (_P, "invalid attribute value"),
    0x0110: (_R, "processing failure"),
    0x0112: (_P, "no such SOP instance"),
    0x0113: (_P, "no such event type"),
    0x0114: (_P, "no such argument"),
    0x0115: (_P, "invalid argument value"),
    0x0117: (_P, "invalid SOP instance"),
    0x0118: (_P, "no such SOP class"),
    0x0119: (_P, "class-instance conflict"),
    0x0120: (_P, "missing attribute"),
    0x0121: (_P, "missing attribute value"),
    0x0122: (_P, "SOP class not supported"),
    0x0123: (_P, "no such action"),
    0x0124: (_P, "not authorized"),
    0x0210: (_R, "duplicate invocation"),
    0x0211: (_P, "unrecognized operation"),
    0x0212: (_P, "mistyped argument"),
    0x0213: (_R, "resource limitation"),
    0xB000: (_W, "coercion of data elements"),
    0xB006: (_W, "elements discarded"),
    0xB007: (_W, "data set does not match SOP class"),
    0xFE00: (_R, "cancelled"),
    0xFF00: (_R, "pending (not a valid final status)"),
    0xFF01: (_R, "pending (not a valid final status)"),
}

# Ranges: (low, high, outcome, meaning). Single codes above win.
_RANGES: tuple[tuple[int, int, Outcome, str], ...] = (
    (0xA700, 0xA7FF, _R, "out of resources"),
    (0xA900, 0xA9FF, _P, "data set does not match SOP class"),
    (0xC000, 0xCFFF, _P, "cannot understand"),
    (0xB000, 0xBFFF, _W, "warning"),
)


def classify_status(status: int | None) -> Verdict:
    """The decision for a DIMSE response status; None means no (valid) response."""
    if status is None:
        return Verdict(_R, "no response")
    if status in _STATUS:
        outcome, meaning = _STATUS[status]
        return Verdict(outcome, meaning)
    for low, high, outcome, meaning in _RANGES:
        if low <= status <= high:
            return Verdict(outcome, meaning)
    return Verdict(_R, "unknown status")


# Storage Commitment Failure Reason (0008,1197), PS3.3 C.14.1.1 / PS3.4 J.3.
COMMITMENT_FAILURES: Mapping[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


# --- pure: association rejection and TLS errors ----------------------------------------

_REJECT_REASONS: Mapping[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def classify_rejection(result: int | None, source: int | None, reason: int | None) -> tuple[bool, str]:
    """(permanent, reason text) for an A-ASSOCIATE-RJ (PS3.8 9.3.4).

    Result 2 ("rejected-transient") is retryable. So is anything from the presentation
    layer (source 3: congestion, local limit), whatever its result says: by their nature
    these pass. Everything else the peer calls permanent is permanent.
    """
    text = _REJECT_REASONS.get((source or 0, reason or 0), f"source {source}, reason {reason}")
    permanent = result == 1 and source != 3
    return permanent, text

