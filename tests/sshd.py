"""Test helper: a real OpenSSH `sshd` (Debian openssh-server) serving SFTP on loopback.

    with Sshd(tmp_path / "sshd") as server:
        transport = SftpTransport(server.destination("center"), KEY)
        ...
        assert (server.drop / "b1.bundle").read_bytes() == ...

Everything lives in the given directory: the server's host key, the client's key and the
`authorized_keys` naming it, a `known_hosts` pinning the host key, the config, the log
(`sshd.log`) and `drop/`, the folder uploads land in. The daemon listens on a free
loopback port and is stopped by its PID (SIGTERM, then SIGKILL).

Containment. sshd runs in a private mount namespace (`unshare --mount`, root needed as
in CI) with a tmpfs over /run: there it finds the privilege-separation directory it
insists on (/run/sshd) without one being made on the host, and a root-owned
`/run/sftp-root` to chroot the SFTP user into (`ChrootDirectory`; a chroot under /tmp is
refused by sshd because /tmp is world-writable), with `drop/` bound at `/drop` inside it.
`ForceCommand internal-sftp` allows SFTP only. The user is root (the tests run as
root); only the key in our `authorized_keys` is accepted, no password.

`Sshd(root, drop_mb=N)` puts a tmpfs of N MiB at /drop instead of `drop/` (a server
whose disk fills up; its files are then not visible from the test).

`Sshd(root, netns=NAME, listen=ADDR)` runs it inside a network namespace of the emulated
WAN (tests/wan.py), listening on that namespace's address ADDR.

`Relay` is a TCP relay to put between client and server: it counts what the client sent
and can cut every connection once the client has sent `cut_after` bytes (a link that
dies mid-upload, at a known point), or stop passing on what the client sends once it has
sent `hold_after` bytes (a link that goes silent, leaving the client blocked in a write).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType

from appliance.core.config import Destination
from tests.peers import free_port, wait_for
from tests.wan import entered, exec_prefix

SSHD_BIN = "/usr/sbin/sshd"
REMOTE_DIR = "/drop"  # where drop/ appears to the SFTP user (inside the chroot)


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A new key pair without passphrase at `path` (and `path`.pub)."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "test", "-f", str(path)],
                   check=True, capture_output=True, timeout=60)
    return path


def fingerprint(pub: Path) -> str:
    """`SHA256:...` of a public key file, as `ssh-keygen -lf` prints it."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return out.split()[1]


class Sshd:
    """One sshd process with its own keys, config, log and upload folder in `root`."""

    def __init__(self, root: Path, drop_mb: int | None = None, netns: str | None = None,
                 listen: str = "127.0.0.1") -> None:
        self.root = root
        self.drop_mb = drop_mb
        self.netns = netns  # run inside this network namespace (tests/wan.py) ...
        self.listen = listen  # ... on this address of it
        self.drop = root / "drop"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "sshd.log"

    @property
    def host_pub(self) -> Path:
        return self.root / "host_ed25519.pub"

    def __enter__(self) -> Sshd:
        if os.geteuid() != 0:
            raise AssertionError("tests/sshd.py needs root (as in CI): sshd runs in a private"
                                 " mount namespace with its own /run")
        self.drop.mkdir(parents=True)
        keygen(self.root / "host_ed25519")
        self.client_key = keygen(self.root / "client_ed25519")
        (self.root / "authorized_keys").write_text(
            (self.root / "client_ed25519.pub").read_text())
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line())
        (self.root / "sshd_config").write_text(self._config())
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def known_hosts_line(self, pub: Path | None = None) -> str:
        kind, blob = (pub or self.host_pub).read_text().split()[:2]
        return f"[{self.listen}]:{self.port} {kind} {blob}\n"

    def _config(self) -> str:
        r = self.root
        return "\n".join([
            f"ListenAddress {self.listen}:{self.port}",
            f"HostKey {r / 'host_ed25519'}",
            f"PidFile {r / 'sshd.pid'}",
            f"AuthorizedKeysFile {r / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "AllowUsers root", "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            "ChrootDirectory /run/sftp-root", "ForceCommand internal-sftp",
            "AllowTcpForwarding no", "X11Forwarding no", "PermitTTY no",
            # A dead client is noticed within seconds (the relay cuts connections).
            "ClientAliveInterval 5", "ClientAliveCountMax 2",
        ]) + "\n"

    def start(self) -> None:
        """Start sshd (again, after `stop`) with the same keys and port."""
        drop = (f"mount -t tmpfs -o size={self.drop_mb}m appliance-test-drop /run/sftp-root/drop"
                if self.drop_mb else 'mount --bind "$0" /run/sftp-root/drop')
        script = ('mount -t tmpfs -o mode=755 appliance-test-run /run && mkdir -m 755 /run/sshd'
                  f' /run/sftp-root /run/sftp-root/drop && {drop} && exec "$@"')
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*exec_prefix(self.netns), "unshare", "--mount", "--propagation", "private", "sh",
                 "-c", script, str(self.drop), SSHD_BIN, "-D", "-e", "-f", str(self.root / "sshd_config")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, timeout=30, what="sshd to listen", detail=self.log_text)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log_text()}")
        with entered(self.netns) if self.netns else contextlib.nullcontext(), socket.socket() as s:
            return s.connect_ex((self.listen, self.port)) == 0

    def stop(self) -> None:
        """Stop sshd and, with it, every session it serves (they are in its group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def destination(self, name: str = "center", port: int | None = None, **kw: object) -> Destination:
        """An sftp destination for this server (through a relay on `port` if given)."""
        args: dict[str, object] = {
            "host": "127.0.0.1", "port": port or self.port, "user": "root",
            "key": self.client_key, "known_hosts": self.known_hosts, "remote_dir": REMOTE_DIR,
            "timeout_s": 10.0, **kw}
        if "host_key_sha256" in kw:
            args["known_hosts"] = None
        if port is not None and "known_hosts" not in kw and args["known_hosts"] is not None:
            # the host key is pinned for the relay's address too
            relayed = self.root / f"known_hosts.{port}"
            relayed.write_text(self.known_hosts_line().replace(f":{self.port} ", f":{port} "))
            args["known_hosts"] = relayed
        return Destination(name=name, transport="sftp", **args)  # type: ignore[arg-type]


class Relay:
    """A TCP relay from a free loopback port to `target`, in one thread.

    `sent` counts the bytes clients sent in total; once it passes `cut_after` (if set),
    every connection is closed at once, both ways, as when a link dies.
    """

    def __init__(self, target_port: int, cut_after: int | None = None,
                 hold_after: int | None = None) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.cut_after = cut_after
        self.hold_after = hold_after
        self.sent = 0
        self.cuts = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                if key.data is None:
                    self._accept(sel, pairs)
                else:
                    self._pump(key.fileobj, sel, pairs)  # type: ignore[arg-type]
            if self.cut_after is not None and self.sent >= self.cut_after and pairs:
                self.cuts += 1
                self.cut_after = None
                self._close_all(sel, pairs)
        self._close_all(sel, pairs)
        sel.close()

    def _accept(self, sel: selectors.BaseSelector, pairs: dict[socket.socket, socket.socket]) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:  # the server is down: so is the link
            client.close()
            return
        for a, b, upstream in ((client, server, True), (server, client, False)):
            pairs[a] = b
            sel.register(a, selectors.EVENT_READ, upstream)

    def _pump(self, src: socket.socket, sel: selectors.BaseSelector,
              pairs: dict[socket.socket, socket.socket]) -> None:
        if src not in pairs:  # closed earlier in this round of events
            return
        upstream = sel.get_key(src).data
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if data and not self._held(src, sel, upstream, len(data)):
            try:
                pairs[src].sendall(data)
                return
            except OSError:  # the other side is gone
                data = b""
        if not data:  # one side closed: close the pair
            for s in (src, pairs[src]):
                with contextlib.suppress(KeyError):  # a held client is not registered
                    sel.unregister(s)
                pairs.pop(s)
                s.close()

    def _held(self, src: socket.socket, sel: selectors.BaseSelector, upstream: bool, n: int) -> bool:
        """Count what a client sent; past `hold_after`, stop reading from it (its writes
        then block, as on a link gone silent) and drop what was read."""
        if not upstream:
            return False
        self.sent += n
        if self.hold_after is not None and self.sent >= self.hold_after:
            sel.unregister(src)
            return True
        return False

    @staticmethod
    def _close_all(sel: selectors.BaseSelector, pairs: dict[socket.socket, socket.socket]) -> None:
        for s in list(pairs):
            with contextlib.suppress(KeyError):  # a held client is not registered
                sel.unregister(s)
            s.close()
        pairs.clear()

