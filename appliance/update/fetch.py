"""Fetching an update bundle from an allowed source ([update] sources): HTTPS (stdlib
http.client, the configured CA) or SFTP (paramiko, the server's host key pinned in a
known_hosts file, as forward/sftp.py pins a destination's).

`allowed` is the only gate on where a command can send the box: the URL must lie under
one of the configured prefixes (same scheme, user, host, port; a path below the prefix's
folder, no '..'). `fetch` downloads into `<dir>/<sha256>.raucb.part`, appending: a cut
connection is resumed from the bytes on disk (HTTP `Range`, SFTP seek), a server that
cannot resume is read again from the start. Nothing is read beyond `max_bytes` (a
declared size above it is refused before the body is read); every read has a timeout
within the overall deadline. The file is renamed to `<sha256>.raucb` only once its
SHA-256 is the command's; otherwise it is removed.

How it fails: `FetchError` with `reason`, a class for the ops event ("too big",
"timeout", "unreachable", "connection lost", "refused", "not found", "sha256 mismatch",
"host key"): never the server's text.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import posixpath
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from appliance.core import durable
from appliance.core.errors import ApplianceError

CHUNK = 256 << 10
READ_TIMEOUT_S = 60.0  # one read or connect: a silent link is cut after this
ATTEMPTS = 8  # connections per fetch (the first and the resumptions)
PAUSE_S = 2.0  # before a resumption (doubling, within the deadline)
SHA256_HEX = frozenset("0123456789abcdef")

Progress = Callable[[int, int | None], None]  # bytes on disk, total (when known)


class FetchError(ApplianceError):
    """The bundle could not be fetched; `reason` is a class, `retry` whether another
    connection may help."""

    exit_code = 75

    def __init__(self, reason: str, detail: str = "", retry: bool = False) -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason, self.retry = reason, retry


@dataclass(frozen=True)
class Where:
    """How to reach the sources: the HTTPS trust, the SFTP key and host key pin."""
    tls: ssl.SSLContext | None = None
    ssh_key: Path | None = None
    known_hosts: Path | None = None


def allowed(url: str, sources: Iterable[str]) -> bool:
    """Does `url` name a file under one of the source prefixes?"""
    if len(url) > 2048 or any(not (0x21 <= ord(c) < 0x7F) for c in url):
        return False
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        return False
    path = urllib.parse.unquote(u.path)
    if u.query or u.fragment or u.password is not None or not path or path.endswith("/") \
            or posixpath.normpath(path) != path or "\\" in path:
        return False
    for prefix in sources:
        s = urllib.parse.urlsplit(prefix)
        if (u.scheme, u.username, (u.hostname or "").lower(), port) == \
                (s.scheme, s.username, (s.hostname or "").lower(), s.port) \
                and path.startswith(urllib.parse.unquote(s.path)):
            return True
    return False


def valid_sha256(h: object) -> bool:
    return isinstance(h, str) and len(h) == 64 and set(h) <= SHA256_HEX


def fetch(url: str, sha256: str, into: Path, where: Where, *, max_bytes: int, deadline_s: float,
          progress: Progress | None = None, attempts: int = ATTEMPTS) -> Path:
    """The verified bundle at `into/<sha256>.raucb` (already there: returned at once)."""
    if not valid_sha256(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    durable.make_dirs(into)
    final, part = into / f"{sha256}.raucb", into / f"{sha256}.raucb.part"
    if final.exists() and _sha256_of(final) == sha256:
        return final
    deadline = time.monotonic() + deadline_s
    one = _https_pass if url.startswith("https:") else _sftp_pass
    pause = PAUSE_S
    for attempt in range(attempts):
        try:
            one(urllib.parse.urlsplit(url), part, where, max_bytes, deadline, progress)
            break
        except FetchError as e:
            if not e.retry or attempt == attempts - 1 or time.monotonic() + pause >= deadline:
                raise
        time.sleep(pause)
        pause *= 2
    if _sha256_of(part) != sha256:
        part.unlink()
        raise FetchError("sha256 mismatch", "the file is not the one the command names")
    os.replace(part, final)
    durable.fsync_dir(into)
    return final


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timeout", "the deadline passed")
    return min(left, READ_TIMEOUT_S)


def _copy(src: BinaryIO | paramiko.SFTPFile, dst: BinaryIO, have: int, total: int | None,
          max_bytes: int, deadline: float, settimeout: Callable[[float], None],
          progress: Progress | None) -> int:
    """Append src to dst until EOF; the bytes now on disk."""
    while True:
        settimeout(_left(deadline))
        chunk = src.read(min(CHUNK, max_bytes + 1 - have))
        if not chunk:
            return have
        have += len(chunk)
        if have > max_bytes:
            raise FetchError("too big", f"more than {max_bytes} bytes")
        dst.write(chunk)
        if progress:
            progress(have, total)


def _size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _https_pass(u: urllib.parse.SplitResult, part: Path, where: Where, max_bytes: int,
                deadline: float, progress: Progress | None) -> None:
    have = _size(part)
    conn = http.client.HTTPSConnection(u.hostname or "", u.port or 443, timeout=_left(deadline),
                                       context=where.tls or ssl.create_default_context())
    r: http.client.HTTPResponse | None = None
    try:
        try:
            conn.request("GET", u.path, headers={"Range": f"bytes={have}-"} if have else {})
            r = conn.getresponse()
        except ssl.SSLCertVerificationError:
            raise FetchError("refused", "the server's certificate is not trusted") from None
        except TimeoutError:
            raise FetchError("timeout", retry=True) from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise FetchError("connection lost", type(e).__name__, retry=True) from None
        except OSError as e:
            raise FetchError("unreachable", type(e).__name__, retry=True) from None
        resumed = r.status == 206 and (r.getheader("Content-Range") or "").startswith(f"bytes {have}-")
        if r.status == 416 and have:  # beyond the end: what we hold is not a prefix of it
            part.unlink()
            raise FetchError("connection lost", "restart", retry=True)
        if r.status not in (200, 206) or (r.status == 206 and not resumed):
            raise FetchError("not found" if r.status == 404 else "refused", f"HTTP {r.status}",
                             retry=r.status >= 500)
        start = have if resumed else 0
        length = r.getheader("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise FetchError("too big", f"{total} bytes declared, more than {max_bytes}")
        sock = conn.sock
        with part.open("ab" if resumed else "wb") as f:
            try:
                got = _copy(r, f, start, total, max_bytes, deadline,
                            lambda t: sock.settimeout(t) if sock else None, progress)
            except TimeoutError:
                raise FetchError("timeout", retry=True) from None
            except (OSError, http.client.HTTPException) as e:
                raise FetchError("connection lost", type(e).__name__, retry=True) from None
            finally:
                durable.fsync_file(f)
        if total is not None and got != total:
            raise FetchError("connection lost", f"{got} of {total} bytes", retry=True)
    finally:
        if r is not None:
            r.close()
        conn.close()


def _sftp_pass(u: urllib.parse.SplitResult, part: Path, where: Where, max_bytes: int,
               deadline: float, progress: Progress | None) -> None:
    from appliance.forward import Permanent  # noqa: PLC0415 - SFTP only
    from appliance.forward.sftp import pinned_keys  # noqa: PLC0415

    host, port = u.hostname or "", u.port or 22
    if where.ssh_key is None or where.known_hosts is None:
        raise FetchError("refused", "[update] ssh_key and known_hosts are needed for sftp://")
    try:
        pins = pinned_keys(where.known_hosts, host, port)
        key = paramiko.PKey.from_path(str(where.ssh_key))
    except (Permanent, OSError, paramiko.SSHException) as e:
        raise FetchError("refused", type(e).__name__) from None
    have = _size(part)
    try:
        sock = socket.create_connection((host, port), timeout=_left(deadline))
    except OSError as e:
        raise FetchError("unreachable", type(e).__name__, retry=True) from None
    t = paramiko.Transport(sock)
    try:
        try:
            t.start_client(timeout=_left(deadline))
            shown = t.get_remote_server_key()
            pinned = pins.get(shown.get_name())
            if pinned is None or pinned.asbytes() != shown.asbytes():
                raise FetchError("host key", "the server's host key is not the pinned one")
            t.auth_publickey(u.username or "", key)
            sftp = paramiko.SFTPClient.from_transport(t)
            assert sftp is not None
            sftp.get_channel().settimeout(_left(deadline))
            total = sftp.stat(u.path).st_size
            if total is not None and total > max_bytes:
                raise FetchError("too big", f"{total} bytes, more than {max_bytes}")
            start = have if total is not None and have <= total else 0
            with sftp.open(u.path, "rb") as src, part.open("ab" if start else "wb") as f:
                src.seek(start)
                try:
                    got = _copy(src, f, start, total, max_bytes, deadline,
                                sftp.get_channel().settimeout, progress)
                finally:
                    durable.fsync_file(f)
        except FileNotFoundError:
            raise FetchError("not found") from None
        except paramiko.AuthenticationException:
            raise FetchError("refused", "authentication") from None
        except TimeoutError:
            raise FetchError("timeout", retry=True) from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise FetchError("connection lost", type(e).__name__, retry=True) from None
        if total is not None and got != total:
            raise FetchError("connection lost", f"{got} of {total} bytes", retry=True)
    finally:
        with contextlib.suppress(Exception):
            t.close()
