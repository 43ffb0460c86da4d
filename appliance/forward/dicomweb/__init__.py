"""The `dicomweb` transport: STOW-RS (PS3.18 10.5) to a DICOMweb server over HTTPS.

Modules: `stow` (pure: multipart framing, request cutting, the HTTP status table, the
DICOM JSON response and each instance's fate), `wire` (one HTTP exchange: connection,
TLS, cancel watcher, capped response), `transport` (`DicomWebTransport`). This
docstring holds the decisions for all of them; docs/forward-dicomweb.md is the
operator's page.

On the wire: `POST {url}/studies`, `Content-Type: multipart/related;
type="application/dicom"; boundary=<48 random hex digits>`, `Accept:
application/dicom+json`, one `application/dicom` part per instance: the Part-10 file
exactly as it is in the bundle (its transfer syntax unchanged; nothing is re-encoded).
Several instances go per request, consecutive in the manifest, up to `max_request_mb`
(one larger instance goes alone). The body has a known `Content-Length` (the part sizes
come from the verified manifest), so nothing is chunked and nothing is held whole: the
bundle is verified in a first pass (`bundle.VerifiedBundle`), then decrypted again
instance by instance and written to the socket in 64 KiB pieces, the last piece of each
instance only once the stream has proven it whole (size and SHA-256). A bundle that
changed between the passes cuts the request short (the server must drop a request whose
body is shorter than its Content-Length) and the send is `Unreadable`. No plaintext
touches the disk. One connection per request (`Connection: close`): requests are large,
and a kept-alive connection the server closed while the next was being prepared would
be a spurious failure.

Why the stdlib (`http.client`, `ssl`, `socket`) and not requests/urllib3/httpx: we need
a streamed body with a computed length, a hold-back of each instance's last piece, a
connect and every read/write bounded by `timeout_s`, and a cancel that interrupts a
blocked write within a second; the stdlib gives all of that in ~200 lines, without a new
dependency on the appliance image.

Per instance (PS3.18 10.5.3): the response's ReferencedSOPSequence (0008,1199) lists
what was stored (a WarningReason (0008,1196) is logged; the instance counts as stored),
FailedSOPSequence (0008,1198) what was not, with FailureReason (0008,1197), classified
by the dicom transport's status table (`forward.dicom.status.classify_status`): e.g.
0xA7xx out of resources and 0x0110 processing failure Retryable, 0xA9xx, 0xCxxx
Permanent. 0xC122 (transfer syntax not supported): at the end of the attempt the
instance is sent again alone, converted to Explicit VR Little Endian (which PS3.18
requires every STOW-RS origin server to take) in a `forward.conversion` worker (capped
in output, time and memory, as for the dicom transport); whole conversions only, since
the part's length goes in Content-Length. Refused again, already Explicit VR LE, or
not convertible (the codec refuses it, the worker dies or breaks a limit): Permanent for
that instance (parked), the rest goes. The file meta sent with it is the original's with
only (0002,0010) changed; the data set is the converter's.
`plan.delivered(i)` is called for each stored instance as soon as its response is read.
Failures tied to instances do not stop the attempt: the other requests are sent, and at
the end one error names them all in `instances` (Permanent when any failed for good,
so that they are parked and the rest sent again at once; else Retryable).

HTTP status (`stow.classify_http`): 200 every instance stored (unless the body lists a
failure); 202, 400, 409, 415 and other 2xx are read instance by instance; an instance
the body does not mention is, when the request held several, sent again alone in a
later request (so the server's answer is about it only); alone, it is Permanent after
400/409/415 and Retryable otherwise. Orthanc 1.10 with its DICOMweb plugin 1.7 answers
400 and lists only the stored ones when a part cannot be parsed. 413 -> the transport's
request limit is halved (not below 1 MB; kept for later bundles) and the request's
instances are sent again in requests of half as many; an instance alone that gets 413
is Permanent ("raise the server's limit"). 401/403/407 -> Permanent, no instance
blamed, the reason says which credential to fix. 404/405, redirects (never followed:
they would carry the credentials elsewhere) and other 4xx -> Permanent. 5xx, 408, 429,
a connection refused, reset or timed out -> Retryable, blaming no instance (the
destination's trouble); a Retry-After header is quoted in the reason and passed on as the
Retryable's `retry_after_s` (the scheduler waits at least that long, at most
queue.retry_max_s). A server that answers before
reading the whole body (a 413 or 401 from a proxy) and closes: that early answer is read
and used.

Security: https unless `plaintext = true` (then a warning when the transport is built).
With a `tls` block: TLS 1.2+, this box's certificate and key, the server verified
against `tls.ca` only; the host name checked unless `url` names an IP address (as the
dicom transport). Without one: the system's CAs, host name always checked. A bearer
token (`token_file`, RFC 6750 characters, at most 4 KiB) is sent as `Authorization:
Bearer`; it is never logged or put in a reason. Certificates, key and token are read
again at each attempt; files that cannot be read are Retryable. TLS verification
failures and the server refusing our certificate -> Permanent (`dicom.tls`'s table).

Timeouts and cancel: each write and each read are bounded by `timeout_s` (the response
must begin within `timeout_s` of the last byte sent: raise it for a server that stores a
large request slowly). A watcher thread looks at `plan.cancelled` every 0.25 s and shuts
the socket down, so a blocked connect, write or read ends at once: `Retryable`. A silent
link (a cut line: no RST, no ICMP) is noticed after `link_timeout_s` (at most
`timeout_s`), as by the dicom and sftp transports: the connection has keep-alives, and
the same watcher reads the socket's TCP_INFO (`forward.netlink.link_silent`): nothing
owed acknowledged for that long shuts it down, and the attempt fails "the link to the
server at HOST:PORT went silent while sending instance N", which blames the destination
(no instance), so the bundle moves to the next one. A server slow to store still
acknowledges the bytes and the keep-alives, so it is judged by `timeout_s` only. The
connect is bounded by `link_timeout_s` too: the SYN is answered by the server's kernel,
whatever the PACS is doing. Each piece written waits first for the destination's bandwidth cap
(`max_kbit_s`, `cap_hours`: `forward.bandwidth`, one per transport, shared by its
lanes). The response body is read only up to 64 KiB + 8 KiB per instance (16 MiB
at most), checked against Content-Length first; a longer one is ignored.

`probe()`: QIDO-RS `GET {url}/studies?limit=1` within `timeout_s`; the server answers
(any status below 500 except 401/403/407).

Reasons and log lines name instances by manifest index, never by UID; the URL and
host are the operator's own configuration, not patient data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.forward.dicomweb.transport import DicomWebTransport

if TYPE_CHECKING:
    from appliance.core.config import Destination
    from appliance.forward.registry import Context


def build(dest: Destination, context: Context) -> DicomWebTransport:
    """The registry's factory (`forward.registry`)."""
    return DicomWebTransport(dest, context.key, context.max_instance_bytes)


__all__ = ["DicomWebTransport", "build"]
