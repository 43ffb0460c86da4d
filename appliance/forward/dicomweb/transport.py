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

from appliance.bundle.format import InstanceStream, ManifestEntry, PrivateKey, VerifiedBundle
from appliance.core import crypto
from appliance.core.config import Destination
from appliance.core.errors import ConfigError, IntegrityError, KeyFileError
from appliance.forward import Permanent, Plan, Retryable, TransportError, Unreadable, bandwidth
from appliance.forward.dicom.tls import client_context, err_text, is_ip
from appliance.forward.dicomweb import stow
from appliance.forward.dicomweb.stow import Reply
from appliance.forward.dicomweb.wire import Cancelled, Exchange, Response

log = structlog.get_logger("appliance.forward.dicomweb")

PIECE = 64 << 10  # bytes written at a time (the cancel event is looked at in between)
MAX_TOKEN = 4096
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
MIN_LIMIT = 1 << 20  # a 413 never makes requests smaller than this (or one instance)


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
    `private_key` opens the bundles (the appliance's own key)."""

    def __init__(self, dest: Destination, private_key: PrivateKey) -> None:
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
        self.limit = dest.max_request_mb << 20  # lowered when the server answers 413
        self._limit_lock = threading.Lock()
        self.cap = bandwidth.for_destination(dest)  # shared by every lane sending here
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
        """A QIDO-RS `GET {url}/studies?limit=1` within `timeout_s`: does the server answer
        (any HTTP answer but 5xx, 401, 403, 407)? Never raises."""
        try:
            with Exchange(self.host, self.port, self.timeout, self.ssl_context(),
                          threading.Event()) as x:
                x.open()
                x.conn.putrequest("GET", f"{self.path}?limit=1", skip_accept_encoding=True)
                for k, v in self.headers(self.token()).items():
                    x.conn.putheader(k, v)
                x.conn.endheaders()
                r = x.response(response_cap(1))
        except (Retryable, Permanent, OSError):
            return False
        return r.status < 500 and stow.classify_http(r.status)[0] is not Reply.CREDENTIALS

    def close(self) -> None:
        pass  # one connection per request, closed with it

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
                      self.plan.cancelled, self.t.cap) as x:
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


def _stream_of(streams: Iterator[tuple[ManifestEntry, InstanceStream]],
               entry: ManifestEntry, x: Exchange) -> InstanceStream:
    """The stream of `entry`, passing over (and verifying) the instances before it; a
    cancel is looked at between them (passing over one takes ~1 s per GB)."""
    for got, stream in streams:
        x.check_cancelled()
        if got.index == entry.index:
            return stream
    raise IntegrityError("bundle changed while it was being read")
