"""The `sftp` transport: uploads encrypted bundles to the reading center's SFTP drop.

On the wire: one SSH connection per attempt (paramiko), authenticated by this box's key
only (no password, no agent, no ~/.ssh), to a server whose host key is pinned in the
config (a known_hosts file or a `SHA256:` fingerprint). A host key that is unknown or
differs from the pin is refused, never learnt: that is `Permanent` and the reason names
the fingerprint seen and the fix; so is a server that refuses our key. Everything else
that goes wrong on the way (refused, timed out, reset, a full remote disk) is the
destination's and `Retryable`; no failure names an instance.

On the server: `<remote_dir>/<bundle id>.bundle.part`, renamed to `<bundle id>.bundle`
once whole, so the center's importer never sees a partial bundle. The steps, each there
for a crash or a cut link between any two of them:
  1. a file under the final name with our size is ours from an attempt that died
     between the rename and the queue's record: delivered, nothing is sent;
  2. a `.part` no longer than ours is resumed from its size, after its first and last
     64 KiB are read back and found equal to ours (a cut link leaves a true prefix; a
     stranger's file or a damaged tail does not pass); otherwise it is written afresh;
  3. the rest is written with up to 64 requests in flight, every answer checked before
     step 4;
  4. `fsync@openssh.com` where the server offers it (OpenSSH does), so that the data
     is on the server's disk before the name says it is whole;
  5. the `.part`'s size is checked against ours. A hash would be better, but OpenSSH
     does not offer the `check-file` extension (nor any other way to hash a file
     remotely), and the SSH channel's MAC already protects the bytes of this attempt;
  6. `posix-rename@openssh.com` onto the final name (atomic, replaces a stale file);
     a server without it gets a plain SFTP rename after the stale file is removed.
The bundle stays encrypted: the center needs a recipient key to open it. `put` takes
a plain file (the ops center's diagnostics, ops/diagdrop.py) by the same steps, unverified.

The bundle is verified with the appliance's key in the same pass that uploads it (as
the directory transport does): one that fails authentication never gets its final name;
its `.part` is removed and `Unreadable` sends it to quarantine.

Receipts: `read_receipts` reads the center's receipts (`<remote_dir>/receipts/<id>.receipt.json`,
written by `appliance ingest`) back for `forward.receipts`, by name and at most a given
size each, over one connection; judging them is that module's business.

Waits: each socket operation gives up after `timeout_s` (the TCP connect after
`link_timeout_s`: the SYN is answered by the server's kernel); the attempt's budget
(`plan.cancelled`) is watched by a thread that closes the connection at once, so a
cancelled attempt stops within a second even when blocked in a write.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import posixpath
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import paramiko
import structlog
from paramiko.sftp import CMD_EXTENDED

from appliance.bundle import format as bundle_format
from appliance.bundle.format import Manifest, PrivateKey
from appliance.core.errors import IntegrityError
from appliance.forward import Answer, Permanent, Plan, Retryable, TransportError, Unreadable, bandwidth
from appliance.forward.netlink import link_silent, watch_link
from appliance.forward.sftpwire import PACKET as _PACKET
from appliance.forward.sftpwire import Pipeline as _Pipeline
from appliance.forward.sftpwire import Sftp as _Sftp
from appliance.forward.sftpwire import write_size as _write_size
from appliance.ingest.receipt import SUFFIX as RECEIPT_SUFFIX

if TYPE_CHECKING:
    from appliance.core.config import Destination
    from appliance.forward.registry import Context

log = structlog.get_logger("appliance.sftp")

_CHUNK = 256 * 1024  # read from the bundle (and verified) per step
_CHECK = 64 * 1024  # read back from each end of a .part before resuming it
# Our receive window per channel: room for many read-back answers in flight on a long
# link. Our writes are limited by the server's window (OpenSSH: 2 MiB), which pipelining
# keeps full.
_WINDOW = 16 * 1024 * 1024
_RELEASE = "then `appliance queue release --all`"
# paramiko's words for a peer that said nothing in time (banner, negotiation, auth)
_TIMED_OUT = re.compile(r"banner|timed? ?out", re.IGNORECASE)
# paramiko's words for a channel that is gone: an OSError without errno, like a status
_CONNECTION_GONE = re.compile(r"socket is closed|connection (dropped|lost|reset)", re.IGNORECASE)
# What an attempt may meet on the way; anything else is a bug and is not dressed up.
_NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)
_WRITING = ("uploading", "syncing the upload", "renaming the upload")


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:<base64>` as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_key_name(host: str, port: int) -> str:
    """How known_hosts names a server: `host`, or `[host]:port` for another port than 22."""
    return host if port == 22 else f"[{host}]:{port}"


def pinned_keys(known_hosts: Path, host: str, port: int) -> dict[str, paramiko.PKey]:
    """The host keys a known_hosts file holds for the server, by key type (hashed names
    too); Permanent if the file cannot be read. Also `config check`'s test of the file."""
    try:
        entry = paramiko.HostKeys(str(known_hosts)).lookup(host_key_name(host, port))
    except OSError as e:
        raise Permanent(f"cannot read known_hosts {known_hosts}: {e.strerror}") from None
    except Exception:  # noqa: BLE001 - paramiko's InvalidHostKey is no SSHException
        raise Permanent(f"known_hosts {known_hosts} has a line that is not `host key-type key`"
                        " (markers such as @cert-authority or @revoked are not supported): keep"
                        f" only plain lines for the server, {_RELEASE}") from None
    return dict(entry or {})


class _HostKeyPin:
    """Which host key the server must show: from a known_hosts file, or a fingerprint."""

    def __init__(self, dest: Destination) -> None:
        assert dest.host and dest.port
        self.dest = dest
        self.lookup = host_key_name(dest.host, dest.port)
        self.keys: dict[str, paramiko.PKey] = {}
        if dest.known_hosts is not None:
            self.keys = pinned_keys(dest.known_hosts, dest.host, dest.port)

    def prefer(self, transport: paramiko.Transport) -> None:
        """Ask for the key type(s) pinned in known_hosts (else the server may show
        another of its keys, which we could not check)."""
        if not self.keys:
            return
        rsa = {"rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"}
        pinned = {k for t in self.keys for k in (rsa if t == "ssh-rsa" else {t})}
        opts = transport.get_security_options()
        wanted = [k for k in opts.key_types if k in pinned]
        if wanted:
            opts.key_types = wanted

    def check(self, key: paramiko.PKey) -> None:
        seen = f"{key.get_name()} {fingerprint(key)}"
        d = self.dest
        if d.host_key_sha256 is not None:
            if fingerprint(key) != d.host_key_sha256:
                raise Permanent(f"the server's host key {seen} is not the pinned host_key_sha256:"
                                " the server was reinstalled or a machine is in the middle; ask the"
                                " reading center for its fingerprint before changing the pin,"
                                f" {_RELEASE}")
            return
        if not self.keys:
            raise Permanent(f"no host key for {self.lookup} in {d.known_hosts}; the server showed"
                            f" {seen}: if the reading center confirms that fingerprint, add its"
                            f" key to that file, {_RELEASE}")
        pinned = self.keys.get(key.get_name())
        if pinned is None or pinned.asbytes() != key.asbytes():
            raise Permanent(f"the server's host key {seen} is not the one in {d.known_hosts}:"
                            " the server was reinstalled or a machine is in the middle; ask the"
                            " reading center for its fingerprint before changing that file,"
                            f" {_RELEASE}")


class _Step:
    """What the attempt is doing, for a failure's reason."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.silent = False  # the link went silent (forward/netlink.py) and was closed


class SftpTransport:
    """`private_key` None: not a forwarding destination but a drop for plain files
    (`put`: ops/diagdrop.py); `send` then refuses, as it cannot verify a bundle."""

    def __init__(self, dest: Destination, private_key: PrivateKey | None) -> None:
        assert dest.host and dest.port and dest.user and dest.key
        self.name = dest.name
        self.dest = dest
        self.private_key = private_key
        self.cap = bandwidth.for_destination(dest)  # max_kbit_s: all lanes' sends together
        self._client_key: paramiko.PKey | None = None

    # --- the contract ---------------------------------------------------------------

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        """Upload the whole bundle file: the drop takes a bundle whole or not at all, so
        `plan.skip`/`only` do not apply (this transport never blames an instance)."""
        plan = plan or Plan()
        if self.private_key is None:
            raise Permanent("this SFTP place takes plain files only (no appliance key)", bundle=True)
        try:
            src = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue", bundle=True) from None
        step = _Step("connecting")
        with src, self._judged(step, plan.cancelled):
            try:
                with self._session(step, plan.cancelled) as sftp:
                    manifest = _Upload(sftp, src, bundle.name, self.dest.remote_dir or ".",
                                       self.private_key, step).run(progress, plan.cancelled,
                                                                   self.cap)
            except IntegrityError as e:
                raise Unreadable(f"bundle does not verify: {e}") from None
        assert manifest is not None  # a bundle is always verified (private_key is set)
        for entry in manifest.instances:  # the drop now holds every instance of it
            plan.delivered(entry.index)

    def put(self, name: str, src: BinaryIO, cancelled: threading.Event) -> None:
        """Upload a plain file (not a bundle: nothing is verified) as `<remote_dir>/<name>`
        by the same steps as a bundle (`.part`, fsync, size check, rename); Retryable or
        Permanent as `send`. `cancelled` stops it within a second."""
        step = _Step("connecting")
        with self._judged(step, cancelled), self._session(step, cancelled) as sftp:
            _Upload(sftp, src, name, self.dest.remote_dir or ".", None, step).run(
                lambda n: None, cancelled, self.cap)

    def probe(self) -> bool:
        return self.check().ok

    def check(self) -> Answer:
        """TCP connect, SSH handshake, host-key check and login within timeout_s."""
        try:
            with self._connected(_Step("probing"), threading.Event()):
                return Answer(True, "SSH handshake done, host key as pinned, logged in")
        except Exception as e:  # noqa: BLE001 - a probe answers, it never raises
            return Answer(False, str(e) or type(e).__name__)

    def close(self) -> None:
        pass  # one connection per attempt, closed by it

    # --- receipts (forward.receipts) -------------------------------------------------

    def read_receipts(self, wanted: Sequence[tuple[str, int]], cancelled: threading.Event,
                      beat: Callable[[], None] = lambda: None) -> dict[str, bytes | None]:
        """The receipt files `<remote_dir>/receipts/<id>.receipt.json` of the bundle ids
        `wanted` ((id, cap) pairs), over one connection: for each, its bytes, at most
        cap + 1 of them (the caller refuses more than cap: nothing longer is read), or
        None if there is none yet. Opened by name, not by listing the folder, which
        grows with every bundle the center ever took. Raises Retryable (or Permanent for
        a host key or login refused) as `send` does; `cancelled` stops it within a second."""
        step = _Step("connecting to read receipts")
        folder = posixpath.join(self.dest.remote_dir or ".", "receipts")
        out: dict[str, bytes | None] = {}
        with self._judged(step, cancelled), self._session(step, cancelled) as sftp:
            step.what = f"reading receipts in {folder}"
            for bundle_id, cap in wanted:
                out[bundle_id] = _read_capped(sftp, posixpath.join(
                    folder, f"{bundle_id}{RECEIPT_SUFFIX}"), cap)
                beat()
        return out

    # --- connection -------------------------------------------------------------------

    @contextlib.contextmanager
    def _judged(self, step: _Step, cancelled: threading.Event) -> Iterator[None]:
        """What a failure inside the block is for the contract: our own TransportError as
        it is, a network error as Retryable (or Permanent) by `_failure`, anything else
        after `cancelled` as a time-out (the connection was closed under paramiko), and
        otherwise as it is (a bug: the scheduler defers the bundle and logs it)."""
        try:
            yield
        except TransportError:
            raise
        except _NETWORK_ERRORS as e:
            raise self._failure(e, step, cancelled) from None
        except Exception:
            if cancelled.is_set():
                raise self._failure(TimeoutError(), step, cancelled) from None
            raise

    @contextlib.contextmanager
    def _connected(self, step: _Step, cancelled: threading.Event) -> Iterator[paramiko.Transport]:
        """An SSH transport to a server that showed the pinned host key."""
        d = self.dest
        pin = _HostKeyPin(d)
        link_timeout = min(float(d.link_timeout_s), d.timeout_s)
        try:
            # The SYN is answered by the server's kernel, not by sshd: no answer for
            # link_timeout is a silent link (or a host that is gone), not a slow server.
            sock = socket.create_connection((d.host, d.port), timeout=link_timeout)
        except TimeoutError:
            raise Retryable(f"{d.host}:{d.port} did not answer within {link_timeout:g} s while"
                            f" {step.what} (link_timeout_s)") from None
        sock.settimeout(d.timeout_s)
        try:
            t = paramiko.Transport(sock, default_window_size=_WINDOW, default_max_packet_size=_PACKET)
        except BaseException:
            sock.close()
            raise
        done = threading.Event()
        watch_link(sock, link_timeout)
        threading.Thread(target=_close_when, args=(cancelled, done, t, sock, step, link_timeout),
                         daemon=True, name=f"sftp-budget-{d.name}").start()
        try:
            t.banner_timeout = t.handshake_timeout = t.auth_timeout = d.timeout_s
            pin.prefer(t)
            step.what = "doing the SSH handshake"
            t.start_client(timeout=d.timeout_s)
            if not (t.is_active() and t.initial_kex_done):
                raise TimeoutError  # start_client returns, not raises, once its timeout passes
            pin.check(t.get_remote_server_key())
            yield t
        finally:
            done.set()
            t.close()
            sock.close()

    @contextlib.contextmanager
    def _session(self, step: _Step, cancelled: threading.Event) -> Iterator[_Sftp]:
        with self._connected(step, cancelled) as t:
            step.what = "logging in"
            key = self._key()
            try:
                t.auth_publickey(self.dest.user, key)
            except paramiko.AuthenticationException:
                raise Permanent(
                    f"the server refused this box's key ({key.get_name()} {fingerprint(key)}) for"
                    f" user {self.dest.user!r}: the reading center must add {self.dest.key}.pub"
                    f" to that account's authorized keys, {_RELEASE}") from None
            step.what = "opening SFTP"
            sftp = _Sftp.from_transport(t, window_size=_WINDOW, max_packet_size=_PACKET)
            sftp.get_channel().settimeout(self.dest.timeout_s)
            try:
                yield sftp
            finally:
                sftp.close()

    def _key(self) -> paramiko.PKey:
        if self._client_key is None:
            try:
                self._client_key = paramiko.PKey.from_path(self.dest.key, self.dest.key_passphrase)
            except paramiko.PasswordRequiredException:
                raise Permanent(f"the SSH key {self.dest.key} is encrypted and key_passphrase is"
                                f" not set: set it, {_RELEASE}") from None
            except OSError as e:
                raise Permanent(f"cannot read the SSH key {self.dest.key}: {e.strerror}; {_RELEASE}"
                                " once it is there") from None
            except Exception:  # noqa: BLE001 - paramiko raises several kinds for a bad key file
                # (SSHException for a wrong passphrase, UnknownKeyType, ValueError)
                raise Permanent(f"cannot load the SSH key {self.dest.key}: a wrong key_passphrase,"
                                f" or not an OpenSSH private key; fix it, {_RELEASE}") from None
        return self._client_key

    def _failure(self, e: Exception, step: _Step, cancelled: threading.Event) -> Retryable:
        """A failure that is not ours to judge: the destination may work later."""
        d = self.dest
        where = f"{d.host}:{d.port}"
        if cancelled.is_set():
            return Retryable(f"the upload to {where} ran out of its time budget while"
                             f" {step.what} (is the link very slow?)")
        if step.silent:
            return Retryable(f"the link to {where} went silent while {step.what}: nothing was"
                             f" acknowledged within {min(d.link_timeout_s, d.timeout_s):g} s"
                             " (link_timeout_s)")
        if isinstance(e, TimeoutError | socket.timeout):
            return Retryable(f"{where} did not answer within {d.timeout_s:g} s while {step.what}")
        if isinstance(e, ConnectionRefusedError):
            return Retryable(f"{where} refused the connection (is the SFTP server running?)")
        if isinstance(e, socket.gaierror):
            return Retryable(f"cannot resolve {d.host}: {e.strerror}")
        folder = d.remote_dir or "."
        # paramiko turns an SFTP status into ENOENT, EACCES or an OSError without errno
        if isinstance(e, FileNotFoundError):
            return Retryable(f"the server has no folder {folder!r} (remote_dir) while {step.what}:"
                             " the reading center must create it")
        if isinstance(e, PermissionError):
            return Retryable(f"the server denied access while {step.what}: the account may not"
                             f" write the folder {folder!r} (remote_dir)")
        if (isinstance(e, OSError) and e.errno is None and step.what in _WRITING
                and not _CONNECTION_GONE.search(str(e))):
            # OpenSSH answers a failed write (ENOSPC, EDQUOT, EIO) with SSH_FX_FAILURE and
            # the text "Failure": on a drop the likeliest cause is a full disk or quota.
            return Retryable(f"the server refused {step.what} ({e}): its disk may be full or"
                             " over quota")
        if isinstance(e, paramiko.SSHException) and _TIMED_OUT.search(str(e)):
            return Retryable(f"{where} did not answer within {d.timeout_s:g} s while {step.what}"
                             f" ({e})")
        if isinstance(e, EOFError | paramiko.SSHException | OSError):
            detail = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
            return Retryable(f"the connection to {where} failed while {step.what}: {detail}")
        return Retryable(f"the upload to {where} failed while {step.what}: {type(e).__name__}")


def _read_capped(sftp: _Sftp, path: str, cap: int) -> bytes | None:
    """A remote file's first cap + 1 bytes; None if it does not exist, or if we may not
    read it (one such file must not stop the others being read: it is logged)."""
    try:
        f = sftp.open(path, "r")
    except FileNotFoundError:
        return None
    except PermissionError:
        log.warning("receipt.unreadable", file=posixpath.basename(path),
                    detail="the SFTP account may not read it; the center must make it 0644")
        return None
    with f:
        data: bytes = f.read(cap + 1)
    return data


def _close_when(cancelled: threading.Event, done: threading.Event, t: paramiko.Transport,
                sock: socket.socket, step: _Step, link_timeout: float) -> None:
    """Close the connection once the budget runs out, or once the link has gone silent
    (nothing owed acknowledged for `link_timeout`: forward/netlink.py), until the attempt
    is done: a handshake or a write blocked on the server's window returns at once with
    an error, and a cut link is known in seconds, not after `timeout_s`."""
    while not done.is_set():
        if cancelled.wait(0.5) or link_silent(sock, link_timeout):
            step.silent = not cancelled.is_set()
            t.close()
            sock.close()
            return


class _Upload:
    """One bundle into one drop (the steps in the module docstring); with `private_key`
    None, a plain file, not verified."""

    def __init__(self, sftp: _Sftp, src: BinaryIO, name: str, remote_dir: str,
                 private_key: PrivateKey | None, step: _Step) -> None:
        self.sftp, self.src, self.key, self.step = sftp, src, private_key, step
        self.final = posixpath.join(remote_dir, name)
        self.part = self.final + ".part"
        self.size = src.seek(0, 2)
        src.seek(0)

    def run(self, progress: Callable[[int], None], cancelled: threading.Event,
            cap: bandwidth.Cap) -> Manifest | None:
        self.step.what = f"checking the folder {posixpath.dirname(self.final)}"
        if self._remote_size(self.final) == self.size:
            self.step.what = "verifying the bundle"
            manifest = None if self.key is None else bundle_format.read_manifest(self.src, self.key)
            progress(self.size)
            return manifest
        offset = self._resume_offset()
        self.step.what = "uploading"
        try:
            manifest = self._write(offset, progress, cancelled, cap)
        except IntegrityError:
            self._remove(self.part)  # never leave a bundle that fails to verify
            raise
        self.step.what = "checking the upload"
        if self._remote_size(self.part) != self.size:
            raise Retryable("the uploaded file has the wrong size on the server; it is sent"
                            " again from its start or its last good byte")
        self.step.what = "renaming the upload"
        self._rename()
        return manifest

    def _write(self, offset: int, progress: Callable[[int], None],
               cancelled: threading.Event, cap: bandwidth.Cap) -> Manifest | None:
        with self.sftp.open(self.part, "r+" if offset else "w") as f:
            writer = _Pipeline(self.sftp, f.handle, offset, _write_size(self.sftp), cap, cancelled)
            self.src.seek(0)
            up = _Uploading(self.src, writer, offset, progress, cancelled)
            # read_manifest only calls read(); _Uploading is not a whole BinaryIO
            manifest = None if self.key is None else \
                bundle_format.read_manifest(up, self.key)  # type: ignore[arg-type]
            while up.read(_CHUNK):
                pass
            writer.finish()
            if "fsync@openssh.com" in self.sftp.extensions:
                self.step.what = "syncing the upload"
                self.sftp._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)
        return manifest

    def _resume_offset(self) -> int:
        """Where to go on from: the size of a `.part` whose ends match ours, else 0."""
        self.step.what = "checking an earlier partial upload"
        have = self._remote_size(self.part)
        if not have or have > self.size:
            return 0
        spans = [(0, min(have, _CHECK)), (max(0, have - _CHECK), min(have, _CHECK))]
        with self.sftp.open(self.part, "r") as f:
            remote = list(f.readv(spans))
        for (off, n), theirs in zip(spans, remote, strict=True):
            self.src.seek(off)
            if self.src.read(n) != theirs:
                return 0
        return have

    def _remote_size(self, path: str) -> int | None:
        try:
            size: int | None = self.sftp.stat(path).st_size
        except FileNotFoundError:
            return None
        return size

    def _rename(self) -> None:
        if "posix-rename@openssh.com" in self.sftp.extensions:
            self.sftp.posix_rename(self.part, self.final)
            return
        if self._remote_size(self.final) is not None:  # a stale file: plain rename will not replace
            self.sftp.remove(self.final)
        self.sftp.rename(self.part, self.final)

    def _remove(self, path: str) -> None:
        # best effort: the bundle never got its final name, which is what counts
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.sftp.remove(path)


class _Uploading:
    """A reader of the bundle that writes what lies past `offset` (the resumed prefix
    is already there) to the remote file and reports progress; stops with Retryable once
    `cancelled` is set."""

    def __init__(self, src: BinaryIO, dst: Any, offset: int, progress: Callable[[int], None],
                 cancelled: threading.Event) -> None:
        self._src, self._dst, self._offset = src, dst, offset
        self._progress, self._cancelled = progress, cancelled
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if self._cancelled.is_set():
            raise Retryable("the upload ran out of its time budget (is the link very slow?)")
        data = self._src.read(n)
        if data:
            end = self.pos + len(data)
            if end > self._offset:
                self._dst.write(memoryview(data)[max(0, self._offset - self.pos):])
            self.pos = end
            self._progress(end)
        return data


def build(dest: Destination, context: Context) -> SftpTransport:
    """The registry's factory (`forward.registry`)."""
    return SftpTransport(dest, context.key)
