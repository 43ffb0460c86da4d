"""Pure STOW-RS pieces: the multipart/related framing, how requests are cut, the HTTP
status table and the reading of the DICOM JSON response. No I/O; see the package
docstring for the decisions.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.bundle.format import ManifestEntry
from appliance.forward.dicom.status import Outcome, classify_status

# --- multipart/related (RFC 2387, PS3.18 8.6.1.2) ----------------------------------------

PART_TYPE = "application/dicom"
RESPONSE_TYPE = "application/dicom+json"


def content_type(boundary: str) -> str:
    return f'multipart/related; type="{PART_TYPE}"; boundary={boundary}'


def part_head(boundary: str, first: bool) -> bytes:
    """What goes before each instance: the delimiter (after the previous part's CRLF)
    and the part's headers."""
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\nContent-Type: {PART_TYPE}\r\n\r\n".encode("ascii")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def body_length(sizes: Sequence[int], boundary: str) -> int:
    """The Content-Length of a request carrying parts of these sizes."""
    heads = sum(len(part_head(boundary, i == 0)) for i in range(len(sizes)))
    return heads + sum(sizes) + len(closing(boundary))


def cut_requests(entries: Sequence[ManifestEntry], limit: int,
                 most: int | None = None) -> list[list[ManifestEntry]]:
    """Consecutive runs of `entries`, each of at most `limit` bytes of instances (one
    larger instance goes alone) and at most `most` instances."""
    out: list[list[ManifestEntry]] = []
    run: list[ManifestEntry] = []
    size = 0
    for e in entries:
        if run and (size + e.size > limit or (most is not None and len(run) >= most)):
            out.append(run)
            run, size = [], 0
        run.append(e)
        size += e.size
    if run:
        out.append(run)
    return out


# --- HTTP status (PS3.18 10.5.3, RFC 9110) ------------------------------------------------


class Reply(enum.Enum):
    STORED = "stored"  # every instance stored unless the body lists a failure
    PER_INSTANCE = "per-instance"  # the body says which (202, 409, 400, 415)
    SPLIT = "split"  # the request is too large: send fewer instances per request
    RETRY = "retry"  # the destination's trouble: try again later
    CREDENTIALS = "credentials"  # 401/403: a human must fix the token or certificate
    REFUSED = "refused"  # the destination will not take anything like this


HTTP: Mapping[int, tuple[Reply, str]] = {
    200: (Reply.STORED, "stored"),
    202: (Reply.PER_INSTANCE, "stored some, with warnings or failures"),
    400: (Reply.PER_INSTANCE, "bad request"),
    409: (Reply.PER_INSTANCE, "conflict: stored none"),
    415: (Reply.PER_INSTANCE, "unsupported media type"),
    413: (Reply.SPLIT, "request too large"),
    401: (Reply.CREDENTIALS, "unauthorized"),
    403: (Reply.CREDENTIALS, "forbidden"),
    407: (Reply.CREDENTIALS, "proxy authentication required"),
    404: (Reply.REFUSED, "not found (is url the DICOMweb root, such as https://host/dicom-web?)"),
    405: (Reply.REFUSED, "method not allowed (is url the DICOMweb root, and does it offer STOW-RS?)"),
    408: (Reply.RETRY, "request timeout"),
    429: (Reply.RETRY, "too many requests"),
    500: (Reply.RETRY, "internal server error"),
    502: (Reply.RETRY, "bad gateway"),
    503: (Reply.RETRY, "service unavailable"),
    504: (Reply.RETRY, "gateway timeout"),
}


def classify_http(status: int) -> tuple[Reply, str]:
    """What an HTTP status means for a STOW-RS request. Other 2xx are read like 202;
    redirects are not followed (they would carry the credentials elsewhere); other 4xx
    are refusals, other 5xx and anything else retryable."""
    if status in HTTP:
        return HTTP[status]
    if 200 <= status < 300:
        return Reply.PER_INSTANCE, f"HTTP {status}"
    if 300 <= status < 400:
        return Reply.REFUSED, "a redirect (set url to the address it points to)"
    if 400 <= status < 500:
        return Reply.REFUSED, f"client error {status}"
    return Reply.RETRY, f"HTTP {status}"


def retry_after(value: str | None) -> str:
    """The server's Retry-After header, as a clause for a reason ("" when absent)."""
    if not value:
        return ""
    value = value.strip()
    if re.fullmatch(r"\d{1,9}", value):
        return f"; the server asks to retry after {int(value)} s"
    if re.fullmatch(r"[A-Za-z0-9 ,:]{1,40}", value):
        return f"; the server asks to retry after {value}"
    return ""


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """The server's Retry-After header as seconds from `now` (RFC 9110 10.2.3: a number
    of seconds or an HTTP date); None when absent or neither. The scheduler bounds it by
    queue.retry_max_s."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d{1,9}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


# --- the response: DICOM JSON (PS3.18 F.2, 10.5.3.2) -------------------------------------

REFERENCED = "00081199"  # ReferencedSOPSequence
FAILED = "00081198"  # FailedSOPSequence
SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
FAILURE_REASON = "00081197"
UNSUPPORTED_SYNTAX = 0xC122  # PS3.18 10.5.3.2: the server refuses the transfer syntax
WARNING_REASON = "00081196"

# What a failure reason means on STOW-RS where the DIMSE wording would mislead (PS3.18
# 10.5.3.2 / the Storage Commitment failure reasons it borrows); the outcome is still
# the one `classify_status` gives.
STOW_MEANINGS: Mapping[int, str] = {
    0xC122: "the server does not accept this transfer syntax",
    0x0122: "the server does not accept this SOP class",
    0x0110: "processing failure",
    0x0111: "the server already has another instance with this UID",
}


@dataclass(frozen=True)
class StowResponse:
    """The parts of a STOW-RS response that matter: per SOP Instance UID, a warning
    reason (referenced) or a failure reason (failed; None when the server gave none)."""

    referenced: Mapping[str, int | None] = field(default_factory=dict)
    failed: Mapping[str, int | None] = field(default_factory=dict)


def parse_response(body: bytes) -> StowResponse | None:
    """The response body read as DICOM JSON; None when it is not that."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(doc, list) and len(doc) == 1:  # some servers wrap the data set
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    return StowResponse(referenced=_items(doc, REFERENCED, WARNING_REASON),
                        failed=_items(doc, FAILED, FAILURE_REASON))


def _items(doc: Mapping[str, Any], seq: str, reason_tag: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    element = doc.get(seq)
    values = element.get("Value") if isinstance(element, dict) else None
    for item in values if isinstance(values, list) else ():
        if not isinstance(item, dict):
            continue
        uid = _first(item, SOP_INSTANCE)
        if isinstance(uid, str):
            reason = _first(item, reason_tag)
            out[uid] = reason if isinstance(reason, int) and not isinstance(reason, bool) else None
    return out


def _first(item: Mapping[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


# --- judging one request --------------------------------------------------------------


@dataclass
class Judgement:
    """What became of the instances of one request (manifest indexes)."""

    stored: list[int] = field(default_factory=list)
    warnings: list[tuple[int, int]] = field(default_factory=list)  # (index, warning reason)
    permanent: list[tuple[int, str]] = field(default_factory=list)  # (index, reason text)
    retryable: list[tuple[int, str]] = field(default_factory=list)
    unaccounted: list[int] = field(default_factory=list)  # neither stored nor failed
    unsupported_syntax: list[tuple[int, str]] = field(default_factory=list)  # 0xC122: convert?


def judge(entries: Sequence[ManifestEntry], reply: Reply, response: StowResponse | None) -> Judgement:
    """Each instance's fate from the response. With `Reply.STORED` (HTTP 200) an
    instance the body does not list as failed is stored (a 200 means all were, PS3.18);
    otherwise only what the body references is, and what it does not mention at all is
    `unaccounted`."""
    response = response or StowResponse()
    j = Judgement()
    for e in entries:
        uid = e.sop_instance_uid
        if uid in response.failed:
            _failed(j, e, response.failed[uid])
        elif uid in response.referenced or reply is Reply.STORED:
            j.stored.append(e.index)
            warning = response.referenced.get(uid)
            if warning:
                j.warnings.append((e.index, warning))
        else:
            j.unaccounted.append(e.index)
    return j


def _failed(j: Judgement, e: ManifestEntry, reason: int | None) -> None:
    verdict = classify_status(reason)
    code = "no failure reason" if reason is None else f"failure reason 0x{reason:04X}"
    meaning = STOW_MEANINGS.get(reason or 0, verdict.meaning)
    text = f"the server did not store instance {e.index} ({code}: {meaning})"
    if reason == UNSUPPORTED_SYNTAX:
        j.unsupported_syntax.append((e.index, text))  # the transport decides: convert or not
    elif verdict.outcome is Outcome.PERMANENT:
        j.permanent.append((e.index, text))
    else:
        # A "success" or warning code in the Failed SOP Sequence still says "not stored".
        j.retryable.append((e.index, text))
