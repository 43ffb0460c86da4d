"""Test helper: a tiny stdlib HTTP server in front of Orthanc's DICOMweb, for what Orthanc
cannot do itself: check a bearer token (Orthanc has only basic auth), refuse requests
over a size with 413, answer 503 with Retry-After, stall without reading, or speak
HTTPS with client certificates (`tls=`: Orthanc 1.10.1 on Debian 12 crashes serving
HTTPS, see tests/orthanc.py).

    with Front(pacs.url, token="t0k") as front:
        transport(url=front.url + "/dicom-web", ...)
        assert front.seen[0].authorization == "Bearer t0k"

It listens on a free loopback port in a thread of this process and is stopped by
`close()` (the context manager). Requests it passes on are forwarded to Orthanc's
HTTP port with their method, path, Content-Type, Accept and body, and Orthanc's status,
Content-Type and body are returned as they are.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

MAX_BODY = 256 << 20  # what the front reads of one request at most


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    content_type: str | None
    length: int
    parts: int  # application/dicom parts counted in the body


@dataclass
class Front:
    backend: str  # Orthanc's base URL (http://127.0.0.1:port)
    token: str | None = None  # when set, anything but "Bearer <token>" gets 401
    max_body: int | None = None  # a larger body is read, then answered 413
    fail: tuple[int, dict[str, str]] | None = None  # answer every POST with this
    fail_body: bytes = b""  # ... and this body
    fail_count: int | None = None  # only the first this many POSTs (None: all)
    stall: threading.Event | None = None  # do not read the request until this is set
    early: int | None = None  # answer a POST with this status before reading its body
    tls: tuple[Path, Path, Path] | None = None  # (cert, key, CA of the client certificates)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                front._handle(self, b"")

            def do_POST(self) -> None:  # noqa: N802
                if front.stall is not None:
                    front.stall.wait(60)
                if front.early is not None:
                    front.seen.append(Seen("POST", self.path, None, self.headers.get("Content-Type"), 0, 0))
                    return _answer(self, front.early, {}, b"")
                length = int(self.headers.get("Content-Length") or 0)
                assert length <= MAX_BODY
                body = self.rfile.read(length)
                if len(body) < length:  # the client gave up: a real server drops it
                    self.close_connection = True
                    return
                front._handle(self, body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            cert, key, ca = self.tls
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(cafile=str(ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="front", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def _handle(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        ctype = h.headers.get("Content-Type")
        boundary = (ctype or "").partition("boundary=")[2].encode()
        parts = body.count(b"--" + boundary + b"\r\n") if boundary else 0
        self.seen.append(Seen(h.command, h.path, h.headers.get("Authorization"), ctype, len(body), parts))
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            return _answer(h, 401, {"WWW-Authenticate": "Bearer"}, b"")
        if self.max_body is not None and len(body) > self.max_body:
            return _answer(h, 413, {}, b"")
        posts = sum(s.method == "POST" for s in self.seen)
        failing = self.fail_count is None or posts <= self.fail_count
        if self.fail is not None and h.command == "POST" and failing:
            return _answer(h, self.fail[0], self.fail[1], self.fail_body)
        u = urllib.parse.urlsplit(self.backend)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
        try:
            headers = {k: v for k in ("Content-Type", "Accept") if (v := h.headers.get(k))}
            conn.request(h.command, h.path, body if h.command == "POST" else None, headers)
            r = conn.getresponse()
            data = r.read()
            out = {"Content-Type": r.getheader("Content-Type") or "application/octet-stream"}
            _answer(h, r.status, out, data)
        finally:
            conn.close()

    def close(self) -> None:
        if self.stall is not None:
            self.stall.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Front:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _answer(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    h.close_connection = True
    with contextlib.suppress(OSError):  # the client may be gone (a cancelled attempt)
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)
