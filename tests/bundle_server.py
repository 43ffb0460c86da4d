"""Test helper: an HTTPS server on loopback serving one file (an update bundle) with
Range support, which can cut its first response after a number of bytes (a link that dies
mid-download), or stall there (a server that stops sending and keeps the connection
open, until `close()`). Certificates from `openssl` (a CA and a server certificate for 127.0.0.1)
in a temp dir; the server runs in a thread of this process, stopped by `close()`.

    with BundleServer(tmp_path, data, cut_after=300_000) as srv:
        fetch(srv.url, ..., Where(tls=srv.client_context()))
        assert srv.ranges == [None, "bytes=300000-"]
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

PATH = "/updates/update.raucb"


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) for 127.0.0.1, made with openssl."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-subj", "/CN=test update CA", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


class BundleServer:
    def __init__(self, root: Path, data: bytes, cut_after: int | None = None,
                 ranges: bool = True, stall_after: int | None = None) -> None:
        self.data, self.cut_after, self.serve_ranges = data, cut_after, ranges
        self.stall_after = stall_after  # every answer stops after this many bytes
        self.released = threading.Event()  # set by close(): a stalled answer ends
        self.ca, cert, key = make_tls(root / "tls")
        self.ranges: list[str | None] = []  # the Range header of each GET (None: none)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{PATH}"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        self.ranges.append(rng)
        if h.path != PATH:
            h.send_error(404)
            return
        start = 0
        if rng and self.serve_ranges and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(self.data) - start))
        h.end_headers()
        body = self.data[start:]
        if self.stall_after is not None:
            h.wfile.write(body[: self.stall_after])
            h.wfile.flush()
            self.released.wait(300)
            h.close_connection = True
            return
        if self.cut_after is not None:  # once: then the link is back
            body, self.cut_after = body[: self.cut_after], None
            h.wfile.write(body)
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
