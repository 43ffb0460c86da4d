"""The transport itself: `DicomWebTransport.send` and what one STOW-RS request does.
See the package docstring for every decision.
"""

from __future__ import annotations

import re
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom.uid import ExplicitVRLittleEndian

from appliance.bundle.format import InstanceStream, ManifestEntry, PrivateKey, VerifiedBundle
from appliance.core import crypto, part10
from appliance.core.config import Destination
from appliance.core.errors import ConfigError, IntegrityError, KeyFileError
from appliance.forward import (
    Answer,
    Permanent,
    Plan,
    Retryable,
    TransportError,
    Unreadable,
    bandwidth,
    conversion,
)
from appliance.forward.dicom.tls import client_context, err_text, is_ip
from appliance.forward.dicomweb import stow
from appliance.forward.dicomweb.stow import Reply
from appliance.forward.dicomweb.wire import Cancelled, Exchange, Response

log = structlog.get_logger("appliance.forward.dicomweb")

PIECE = 64 << 10  # bytes written at a time (the cancel event is looked at in between)
MAX_TOKEN = 4096
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
MIN_LIMIT = 1 << 20  # a 413 never makes requests smaller than this (or one instance)
HEAD_MAX = 1 << 20  # the most bytes read to find an instance's file meta before converting


def response_cap(n: int) -> int:
    """The most response bytes read for a request of `n` instances (a few KiB each)."""
    return min(16 << 20, (64 << 10) + n * (8 << 10))


@dataclass
class _Outcome:
    """What one `send` found out, besides the instances delivered (reported at once)."""

    stored: int = 0
    bytes: int = 0
    requests: int = 0
    permanent: dict[int, str] = field(default_factory=dict)
    retryable: dict[int, str] = field(default_factory=dict)

    def failure(self) -> TransportError | None:
        """One error naming every instance that failed: Permanent when any did for good
        (those are parked and the rest sent again at once), else Retryable."""
        failed = self.permanent or self.retryable
        if not failed:
            return None
        first = failed[min(failed)]
        more = f" (and {len(failed) - 1} more instances)" if len(failed) > 1 else ""
        cls = Permanent if self.permanent else Retryable
        return cls(first + more, instances=tuple(sorted(failed)))


class DicomWebTransport:
    """STOW-RS to one DICOMweb server (the [[destinations]] entry, transport "dicomweb");
    `private_key` opens the bundles (the appliance's own key); `max_instance_bytes` caps
    what converting one instance may produce (receive.max_instance_mb)."""

    def __init__(self, dest: Destination, private_key: PrivateKey,
                 max_instance_bytes: int = 4096 << 20) -> None:
        if dest.url is None:
            raise ConfigError([f"destination {dest.name}: url is required"])
        u = urllib.parse.urlsplit(dest.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError([f"destination {dest.name}: url must be http:// or https://"])
        self.name = dest.name
        self.dest = dest
        self.private_key = private_key
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.path = (u.path.rstrip("/") or "") + "/studies"
        self.timeout = float(dest.timeout_s)
        self.link_timeout = min(float(dest.link_timeout_s), self.timeout)
        self.limit = dest.max_request_mb << 20  # lowered when the server answers 413
        self._limit_lock = threading.Lock()
        self.cap = bandwidth.for_destination(dest)  # shared by every lane sending here
        self.max_output = max_instance_bytes
        self._converter: conversion.Converter | None = None
        self._converter_lock = threading.Lock()
        if not self.https:
            if not dest.plaintext:
                raise ConfigError([f"destination {dest.name}: https is required unless plaintext = true"])
            log.warning("dicomweb.plaintext", destination=dest.name,
                        detail="DICOMweb to this destination is not encrypted (plaintext = true)")
        try:
            self.ssl_context()
            self.token()
        except Retryable as e:
            raise ConfigError([f"destination {dest.name}: {e}"]) from None

    # --- credentials (read again for each attempt: renewed files need no restart) ---

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.https:
            return None
        tls = self.dest.tls
        if tls is None:
            ctx = ssl.create_default_context()  # the system's CAs, host name checked
        else:
            # As the dicom transport: an IP address is rarely in a certificate; `tls.ca`
            # (the reading center's own CA) is then the trust anchor.
            ctx = client_context(tls, not is_ip(self.host), ssl.SSLContext)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def token(self) -> str | None:
        """The bearer token from `token_file`; Retryable (a human fixes the file and the
        queue goes on by itself) when it cannot be read or is not a token. Never echoed."""
        path = self.dest.token_file
        if path is None:
            return None
        try:
            crypto.check_private_key_file(path)  # a secret: 0600 and ours, like a key
        except KeyFileError as e:
            raise Retryable(f"bearer token file: {e}") from None
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_TOKEN + 1)
        except OSError as e:
            raise Retryable(f"cannot read the bearer token file {path}: {err_text(e)}") from None
        token = raw.strip().decode("ascii", "replace")
        if len(raw) > MAX_TOKEN or not _TOKEN.fullmatch(token):
            raise Retryable(f"the bearer token file {path} does not hold one token (at most "
                            f"{MAX_TOKEN} characters: letters, digits, -._~+/ and trailing =)")
        return token

    def headers(self, token: str | None) -> dict[str, str]:
        h = {"Accept": stow.RESPONSE_TYPE, "Connection": "close", "User-Agent": "appliance"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        return h

    # --- Transport interface ---

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        plan = plan or Plan()
        try:
            f = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue", bundle=True) from None
        except OSError as e:
            raise Retryable(f"cannot read the bundle: {err_text(e)}", bundle=True) from None
        t0 = time.monotonic()
        with f:
            try:
                verified = VerifiedBundle(f, self.private_key)
            except IntegrityError as e:
                raise Unreadable(f"bundle does not verify: {e}") from None
            except OSError as e:  # a failing disk: the file may read later
                raise Retryable(f"cannot read the bundle: {err_text(e)}", bundle=True) from None
            wanted = [e for e in verified.manifest.instances if plan.wants(e.index)]
            attempt = _Attempt(self, item_id, verified, progress, plan)
            try:
                # Suspects of an earlier failure go last, one per request: the healthy
                # instances are delivered first, and a failure of a suspect is its own.
                attempt.deliver([e for e in wanted if e.index not in plan.last], None)
                attempt.deliver([e for e in wanted if e.index in plan.last], 1)
                attempt.deliver_converted()
            except IntegrityError as e:
                raise Unreadable(f"bundle does not verify: {e}") from None
        out = attempt.outcome
        if wanted:
            log.info("dicomweb.sent", destination=self.name, bundle=item_id, instances=out.stored,
                     bytes=out.bytes, requests=out.requests, failed=len(out.permanent) + len(out.retryable),
                     seconds=round(time.monotonic() - t0, 3))
        failure = out.failure()
        if failure is not None:
            raise failure

    def probe(self) -> bool:
        return self.check().ok

    def check(self) -> Answer:
        """A QIDO-RS `GET {url}/studies?limit=1` within `timeout_s`: does the server answer
        (any HTTP answer but 5xx, 401, 403, 407)? Never raises."""
        try:
            with Exchange(self.host, self.port, self.timeout, self.ssl_context(),
                          threading.Event(), link_timeout=self.link_timeout) as x:
                x.open()
                x.conn.putrequest("GET", f"{self.path}?limit=1", skip_accept_encoding=True)
                for k, v in self.headers(self.token()).items():
                    x.conn.putheader(k, v)
                x.conn.endheaders()
                r = x.response(response_cap(1))
        except (Retryable, Permanent, OSError) as e:
            return Answer(False, str(e) or type(e).__name__)
        if r.status >= 500:
            return Answer(False, f"the server answered HTTP {r.status}")
        if stow.classify_http(r.status)[0] is Reply.CREDENTIALS:
            return Answer(False, f"the server answered HTTP {r.status}: our credentials are refused")
        return Answer(True, f"the server answered HTTP {r.status}")

    def close(self) -> None:
        """One connection per request is closed with it; the conversion workers, if any
        were started, stop here."""
        with self._converter_lock:
            if self._converter is not None:
                self._converter.close()
                self._converter = None

    def converter(self) -> conversion.Converter:
        """The conversion workers, started at the first instance the server refuses in
        its transfer syntax."""
        with self._converter_lock:
            if self._converter is None:
                self._converter = conversion.Converter()
            return self._converter

    def lower_limit(self, tried: int) -> int:
        """After a 413 for a request of `tried` bytes: the new request size limit."""
        with self._limit_lock:
            self.limit = max(MIN_LIMIT, min(self.limit, tried // 2))
            return self.limit


class _Attempt:
    """One `send`: the requests, what became of each instance, the running progress."""

    def __init__(self, transport: DicomWebTransport, item_id: str, verified: VerifiedBundle,
                 progress: Callable[[int], None], plan: Plan) -> None:
        self.t = transport
        self.item_id = item_id
        self.verified = verified
        self.progress = progress
        self.plan = plan
        self.outcome = _Outcome()
        self.to_convert: dict[int, ManifestEntry] = {}  # refused in their syntax (0xC122)
        self.converting = False
        self.ssl_context = transport.ssl_context()
        self.token = transport.token()

    def deliver(self, entries: list[ManifestEntry], most: int | None) -> None:
        """Send `entries` (manifest order) in requests of at most `most` instances and
        the transport's size limit; what the server wants smaller is sent again in
        another pass over the bundle, in smaller requests."""
        pending = entries
        while pending:
            requests = stow.cut_requests(pending, self.t.limit, most)
            pending = []
            # A pass left unfinished (the rest went into `pending`) is dropped: the
            # next pass reads the bundle again from its start.
            streams = self.verified.streams()
            for req in requests:
                again, smaller = self._request(req, streams)
                if again:
                    pending += again
                    most = smaller if most is None else min(most, smaller)

    def _request(self, req: list[ManifestEntry],
                 streams: Iterator[tuple[ManifestEntry, InstanceStream]]) -> tuple[list[ManifestEntry], int]:
        """One STOW-RS request; returns the instances to send again, and at most how many
        per request."""
        boundary = secrets.token_hex(24)  # 192 random bits: never inside an instance
        sizes = [e.size for e in req]
        cap = response_cap(len(req))
        self.outcome.requests += 1
        with Exchange(self.t.host, self.t.port, self.t.timeout, self.ssl_context,
                      self.plan.cancelled, self.t.cap, self.t.link_timeout) as x:
            x.check_cancelled()
            x.open()
            x.conn.putrequest("POST", self.t.path, skip_accept_encoding=True)
            x.conn.putheader("Content-Type", stow.content_type(boundary))
            x.conn.putheader("Content-Length", str(stow.body_length(sizes, boundary)))
            for k, v in self.t.headers(self.token).items():
                x.conn.putheader(k, v)
            try:
                x.conn.endheaders()
                for i, e in enumerate(req):
                    x.send(stow.part_head(boundary, i == 0), f"before instance {e.index}")
                    self._send_instance(x, e, _stream_of(streams, e, x))
                x.send(stow.closing(boundary), "at the end of the request")
            except Cancelled:
                raise
            except (Retryable, OSError) as failed:
                r = x.early_response(cap)
                if r is None or r.status < 300:
                    x.check_cancelled()  # the watcher cut it: say why (silent link, budget)
                    if isinstance(failed, OSError):
                        raise Retryable(f"connection to the server failed: {err_text(failed)}") from None
                    raise
            else:
                r = x.response(cap)
        return self._judge(req, r)

    def _send_instance(self, x: Exchange, e: ManifestEntry, stream: InstanceStream) -> None:
        """The instance's bytes as they come out of the bundle; its last piece goes out only
        once the stream has verified the whole instance (an IntegrityError raises before,
        and the server gets a request cut short, which it must drop)."""
        where = f"while sending instance {e.index}"
        held = stream.read(PIECE)
        while 0 < len(held) < 132:
            more = stream.read(PIECE)
            if not more:
                break
            held += more
        if held[128:132] != b"DICM":
            raise Permanent(f"instance {e.index} is not a DICOM Part-10 file in the bundle",
                            instances=(e.index,))
        while True:
            piece = stream.read(PIECE)
            if not piece:
                break
            x.send(held, where)
            self._progress(len(held))
            held = piece
        x.send(held, where)
        self._progress(len(held))

    def _progress(self, n: int) -> None:
        self.outcome.bytes += n
        self.progress(self.outcome.bytes)

    def _judge(self, req: list[ManifestEntry], r: Response) -> tuple[list[ManifestEntry], int]:
        reply, meaning = stow.classify_http(r.status)
        text = f"the server answered HTTP {r.status} ({meaning})"
        if reply is Reply.RETRY:
            raise Retryable(text + stow.retry_after(r.retry_after),
                            retry_after_s=stow.retry_after_seconds(r.retry_after, time.time()))
        if reply is Reply.CREDENTIALS:
            raise Permanent(f"{text}: {self._credentials_fix()}")
        if reply is Reply.REFUSED:
            raise Permanent(f"{text} to a STOW-RS request to {self.t.dest.url}/studies")
        if reply is Reply.SPLIT:
            return self._too_large(req, text)
        body = r.body if r.content_type in (stow.RESPONSE_TYPE, "application/json") else b""
        j = stow.judge(req, reply, stow.parse_response(body) if body else None)
        for index in j.stored:
            self.outcome.stored += 1
            self.plan.delivered(index)
        for index, code in j.warnings:
            log.warning("dicomweb.store_warning", destination=self.t.name, bundle=self.item_id,
                        instance=index, warning=f"0x{code:04X}")
        self.outcome.permanent.update(j.permanent)
        self.outcome.retryable.update(j.retryable)
        for index, why in j.unsupported_syntax:
            self._unsupported_syntax(next(e for e in req if e.index == index), why)
        if not j.unaccounted:
            return [], 0
        if len(req) > 1:  # the server did not say which: ask it about each alone
            return [e for e in req if e.index in set(j.unaccounted)], 1
        why = f"{text} to instance {j.unaccounted[0]} and did not say why"
        if reply is Reply.PER_INSTANCE and r.status in (400, 409, 415):
            self.outcome.permanent[j.unaccounted[0]] = why
        else:
            self.outcome.retryable[j.unaccounted[0]] = why
        return [], 0

    def _unsupported_syntax(self, e: ManifestEntry, why: str) -> None:
        """0xC122: send it again converted to Explicit VR LE (which every STOW-RS server
        takes, PS3.18 8.7.3.5.2), unless it is that already or this was the conversion."""
        if self.converting:
            self.outcome.permanent[e.index] = f"{why}, not even converted to Explicit VR Little Endian"
        elif e.transfer_syntax == ExplicitVRLittleEndian:
            self.outcome.permanent[e.index] = f"{why}, and it is in Explicit VR Little Endian already"
        else:
            self.to_convert[e.index] = e

    def deliver_converted(self) -> None:
        """The instances the server refused in their transfer syntax, one per request,
        converted to Explicit VR Little Endian in a worker process (`forward.conversion`:
        capped in output, time and memory; nothing of it in the daemon but bytes relayed).
        Whole conversions only: the part's length must be known before it is sent."""
        entries = sorted(self.to_convert.values(), key=lambda e: e.index)
        self.to_convert = {}
        self.converting = True
        streams = self.verified.streams()
        for e in entries:
            self._request_converted(e, streams)

    def _request_converted(self, e: ManifestEntry,
                           streams: Iterator[tuple[ManifestEntry, InstanceStream]]) -> None:
        with Exchange(self.t.host, self.t.port, self.t.timeout, self.ssl_context,
                      self.plan.cancelled, self.t.cap, self.t.link_timeout) as x:
            x.check_cancelled()
            stream = _stream_of(streams, e, x)
            try:
                head, source = _explicit_head(stream, e)
                job = conversion.Job(how="explicit", transfer_syntax=e.transfer_syntax, size=e.size,
                                     streamed=False, max_output=self.t.max_output)
                conv = self.t.converter().open(job, source.read)
            except (_NotConvertible, conversion.ConversionFailed) as why:
                self.outcome.permanent[e.index] = (f"instance {e.index}: the server does not accept its"
                                                   f" transfer syntax, and it cannot be converted ({why})")
                return
            except conversion.Unavailable as why:
                self.outcome.retryable[e.index] = (f"instance {e.index} needs converting for this"
                                                   f" server: {why}")
                return
            with conv:
                r = self._send_converted(x, e, head, conv)
        if r is not None:
            log.info("dicomweb.converted", destination=self.t.name, bundle=self.item_id, instance=e.index,
                     to="explicit-vr-le", status=r.status)
            self._judge([e], r)

    def _send_converted(self, x: Exchange, e: ManifestEntry, head: bytes,
                        conv: conversion.Conversion) -> Response | None:
        if conv.length is None:  # a whole conversion always says how long it is
            self.outcome.permanent[e.index] = f"instance {e.index}: the conversion did not say its length"
            return None
        length = len(head) + conv.length
        boundary = secrets.token_hex(24)
        self.outcome.requests += 1
        x.open()
        x.conn.putrequest("POST", self.t.path, skip_accept_encoding=True)
        x.conn.putheader("Content-Type", stow.content_type(boundary))
        x.conn.putheader("Content-Length", str(stow.body_length([length], boundary)))
        for k, v in self.t.headers(self.token).items():
            x.conn.putheader(k, v)
        where = f"while sending instance {e.index} converted"
        try:
            x.conn.endheaders()
            x.send(stow.part_head(boundary, True), where)
            x.send(head, where)
            sent = len(head)
            while piece := conv.read(PIECE):
                sent += len(piece)
                if sent > length:
                    raise conversion.ConversionFailed("worker", "the conversion gave more than it said")
                x.send(piece, where)
                self._progress(len(piece))
            if sent != length:
                raise conversion.ConversionFailed("worker", "the conversion gave less than it said")
            x.send(stow.closing(boundary), "at the end of the request")
        except conversion.ConversionFailed as why:  # the request is cut short: the server drops it
            self.outcome.permanent[e.index] = (f"instance {e.index}: converting it for this server"
                                               f" failed midway ({why})")
            return None
        except (Retryable, OSError) as failed:
            early = x.early_response(response_cap(1))
            if early is None or early.status < 300:
                x.check_cancelled()  # the watcher cut it: say why (silent link, budget)
                if isinstance(failed, OSError):
                    raise Retryable(f"connection to the server failed: {err_text(failed)}") from None
                raise
            return early
        return x.response(response_cap(1))

    def _too_large(self, req: list[ManifestEntry], text: str) -> tuple[list[ManifestEntry], int]:
        if len(req) == 1:
            e = req[0]
            self.outcome.permanent[e.index] = (
                f"{text}: instance {e.index} ({e.size / (1 << 20):.1f} MB) alone is more than the "
                "server takes in one request; raise its limit")
            return [], 0
        limit = self.t.lower_limit(sum(e.size for e in req))
        log.warning("dicomweb.request_too_large", destination=self.t.name, bundle=self.item_id,
                    instances=len(req), limit_mb=round(limit / (1 << 20), 1))
        return req, max(1, len(req) // 2)

    def _credentials_fix(self) -> str:
        d = self.t.dest
        if d.token_file is not None and d.tls is not None:
            return (f"the server does not accept this appliance's bearer token ({d.token_file}) "
                    f"or client certificate ({d.tls.cert}); renew them, then "
                    "`appliance queue release --all`")
        if d.token_file is not None:
            return (f"the server does not accept the bearer token in {d.token_file}; put a valid "
                    "token there, then `appliance queue release --all`")
        if d.tls is not None:
            return (f"the server does not accept this appliance's client certificate {d.tls.cert}; "
                    "have the reading center authorize it, then `appliance queue release --all`")
        return ("the server wants credentials: set token_file (or use https:// with a tls "
                "client certificate), then `appliance queue release --all`")


class _NotConvertible(Exception):
    pass


class _Replay:
    """A stream whose first bytes were read already (to find the file meta): those again,
    then the rest."""

    def __init__(self, first: bytes, stream: InstanceStream) -> None:
        self.first = memoryview(first)
        self.stream = stream

    def read(self, n: int) -> bytes:
        if self.first:
            out, self.first = bytes(self.first[:n]), self.first[n:]
            return out
        return self.stream.read(n)


def _explicit_head(stream: InstanceStream, e: ManifestEntry) -> tuple[bytes, _Replay]:
    """The instance's preamble, "DICM" and file meta with only its Transfer Syntax UID
    made Explicit VR Little Endian (the conversion gives the data set only), and the
    instance to read again from its start."""
    buf = b""
    while True:
        try:
            m = part10.meta(buf)
            break
        except part10.Truncated:
            more = stream.read(PIECE) if len(buf) < HEAD_MAX else b""
            if not more:
                raise _NotConvertible("its file meta does not end") from None
            buf += more
        except part10.Malformed as why:
            raise _NotConvertible(f"its file meta: {why}") from None
    head = buf[:part10.PREAMBLE] + part10.MAGIC + part10.with_transfer_syntax(buf, m, ExplicitVRLittleEndian)
    return head, _Replay(buf, stream)


def _stream_of(streams: Iterator[tuple[ManifestEntry, InstanceStream]],
               entry: ManifestEntry, x: Exchange) -> InstanceStream:
    """The stream of `entry`, passing over (and verifying) the instances before it; a
    cancel is looked at between them (passing over one takes ~1 s per GB)."""
    for got, stream in streams:
        x.check_cancelled()
        if got.index == entry.index:
            return stream
    raise IntegrityError("bundle changed while it was being read")
