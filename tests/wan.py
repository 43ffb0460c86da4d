"""The emulated WAN for tests and benches: network namespaces, veth links, rate, loss,
partitions and delay, all made by the test and torn down after it.

    with Wan() as wan:                       # namespaces `site` and `center`, one link
        wan.link.rate(20)                    # 20 Mbit/s each way (tc tbf)
        center = wan.center                  # Orthanc runs here (Orthanc(..., netns=center.name))
        wan.site.run("storescu", ..., wan.center.addr, "4242")
        wan.link.loss(5)                     # 5 % of the packets each way are dropped (nft)
        wan.link.partition(); wan.link.heal()
        host, port = wan.delay(20, wan.center.addr, 4242)  # a relay in `site`, +20 ms each way
        vpn_addr = wan.vpn()                 # a wireguard-go tunnel site -> center over the link
        center_b = wan.add_center("center_b")               # a second center, its own link

What it owns: namespaces named `wan<role>-<random>` (e.g. `wansite-3fa91c`), the veth pair
of each link (created directly inside the two namespaces: nothing is added to, moved
through or routed by the host's own namespace), a tbf qdisc on each end, an `inet wanbed`
nft table in each namespace, and the processes it starts in them (tracked and stopped by
PID). Addresses: one private /30 per link, `10.a.b.c/30`, drawn at random and checked not
to overlap any address or route of the host, nor another link of the bed.

Teardown (`close()`, the context manager's exit, and an atexit hook for a process that
dies in a test) stops every tracked process by PID (SIGTERM, then SIGKILL), then any
process still inside one of its namespaces (`ip netns pids`: started by the test through
`exec_prefix`, e.g. the daemon or Orthanc), then deletes the namespaces, which removes
their veths, qdiscs and nft tables with them. It is safe to call twice.

What this kernel supports (checked on 6.18, Debian 12 iproute2 6.1 and nftables 1.0.6;
`test_wan_bed.py` checks each one): `tc qdisc tbf` yes; `netem` no ("Specified qdisc kind
is unknown"), so delay is a userspace TCP relay (`relay_main`), not a qdisc; nft `numgen
random mod 100 < N drop` yes; kernel WireGuard no, so the VPN path is wireguard-go
(Debian `wireguard-go`, `wireguard-tools` for `wg`), a TUN device per namespace.

Choices, and why:
- Rate: `tbf rate R burst B latency 50ms` on the egress of both veth ends. B = max(R x 10 ms,
  16 kB): tbf needs a bucket of at least one timer tick of traffic to reach its rate at
  all, and a small bucket keeps the "first burst at line rate" short (10 ms worth). Latency
  50 ms bounds the queue (limit = R x 50 ms + B), like a modest modem buffer; TCP fills it
  and then sees drops, as on a real uplink. tbf counts whole frames (Ethernet header
  included): TCP payload goodput is ~95.6 % of R (1448 of every 1514 bytes on a 1500 MTU).
- Loss and partitions are dropped at the *receiving* end (nft `input` hook, matched on the
  link's interface), never at the sender's `output` hook: a packet dropped in `output` is
  an error returned to the sending TCP stack, which retries at once instead of
  experiencing loss. Loopback traffic inside a namespace (modality -> appliance) is never
  touched. `loss(p)` drops p % of the packets in each direction independently.
- Delay: one-way, in each direction, added by a relay process (asyncio) in a namespace
  that accepts on a local port and connects onward; a round trip through it gains 2 x ms.
  Each chunk read is written out `ms` after it was read, so the relay adds delay without
  limiting throughput (bounded buffering: 256 chunks of 64 kB per direction).

Needs root (network namespaces, tc, nft); CI runs as root. Fails, never skips, without.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
PREFIX = "wan"
WG_RUN = Path("/var/run/wireguard")
WG_PORT = 51820
_libc = ctypes.CDLL(None, use_errno=True)
_live: set[Wan] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the calling *thread* inside network namespace `netns` for the block.

    Sockets created in the block belong to that namespace for their whole life, so a test
    can talk to a server in a namespace (Orthanc's REST API on its 127.0.0.1) or make a
    socket there and use it outside the block. Other threads are not affected.
    """
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / netns) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def exec_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a program inside `netns` (nothing for None)."""
    return ["ip", "netns", "exec", netns] if netns else []


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for row in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in row.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for row in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = row.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def free_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A random 10.x.y.z/30 that overlaps none of `taken`."""
    for _ in range(1000):
        base = int(ipaddress.IPv4Address("10.0.0.0")) + secrets.randbelow(1 << 22) * 4
        net = ipaddress.ip_network(f"{ipaddress.IPv4Address(base)}/30")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.0.0.0/8 /30 subnet for the WAN test bed")


class Namespace:
    """One network namespace of the bed: a host on the emulated WAN."""

    def __init__(self, bed: Wan, role: str) -> None:
        self.bed, self.role = bed, role
        self.name = f"{PREFIX}{role.replace('_', '')}-{bed.tag}"
        self.addr = ""  # its address on its first link, set by Wan.connect
        _ip("netns", "add", self.name)
        bed.namespaces.append(self)
        _ip("-n", self.name, "link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        return exec_prefix(self.name)

    def run(self, *cmd: str, timeout: float = 120, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `cmd` to completion inside the namespace."""
        return subprocess.run([*self.prefix(), *cmd], capture_output=True, text=True,
                              timeout=timeout, check=check, env=env)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start `cmd` inside the namespace; the bed stops it by PID at teardown."""
        kw.setdefault("start_new_session", True)
        p: subprocess.Popen[bytes] = subprocess.Popen([*self.prefix(), *cmd], **kw)
        self.bed.procs.append(p)
        return p

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return entered(self.name)

    def nft(self, script: str) -> None:
        r = subprocess.run([*self.prefix(), "nft", "-f", "-"], input=script, capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"nft in {self.role}: {r.stderr.strip()}")

    def pids(self) -> list[int]:
        r = _ip("netns", "pids", self.name, check=False)
        return [int(x) for x in r.stdout.split()]


class Link:
    """A veth pair between two namespaces: the WAN between them, with its impairments.

    `rate`, `loss` and `partition` each replace the previous setting of their kind;
    `clear()` removes them all.
    """

    def __init__(self, a: Namespace, b: Namespace, net: ipaddress.IPv4Network) -> None:
        self.a, self.b, self.net = a, b, net
        self.dev_a, self.dev_b = f"to-{b.role}"[:15], f"to-{a.role}"[:15]
        ha, hb = list(net.hosts())
        self.addr_a, self.addr_b = str(ha), str(hb)
        # gso_max_segs 1: TCP hands the link one frame at a time, as on a real uplink, so
        # the interface counters count frames (GSO super-packets count headers only once).
        _ip("-n", a.name, "link", "add", self.dev_a, "gso_max_segs", "1", "type", "veth", "peer",
            "name", self.dev_b, "gso_max_segs", "1", "netns", b.name)
        for ns, dev, addr in ((a, self.dev_a, self.addr_a), (b, self.dev_b, self.addr_b)):
            _ip("-n", ns.name, "addr", "add", f"{addr}/{net.prefixlen}", "dev", dev)
            _ip("-n", ns.name, "link", "set", dev, "up")
        self._loss = 0.0
        self._cut = False
        self.mbit: float | None = None

    def ends(self) -> tuple[tuple[Namespace, str], tuple[Namespace, str]]:
        return (self.a, self.dev_a), (self.b, self.dev_b)

    # --- rate: tc tbf ---

    @staticmethod
    def tbf_args(mbit: float) -> list[str]:
        rate_bytes = mbit * 1e6 / 8
        burst = max(int(rate_bytes * 0.010), 16 * 1024)
        return ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "50ms"]

    def rate(self, mbit: float) -> None:
        """Limit each direction to `mbit` Mbit/s (frames on the wire, headers included)."""
        if not 0.01 <= mbit <= 10_000:
            raise ValueError("rate: 0.01..10000 Mbit/s")
        for ns, dev in self.ends():
            _ip("-n", ns.name, "link", "set", dev, "up")
            r = subprocess.run(["tc", "-n", ns.name, "qdisc", "replace", "dev", dev, "root",
                                *self.tbf_args(mbit)], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"tc tbf on {ns.role}: {r.stderr.strip()}")
        self.mbit = mbit

    def unlimited(self) -> None:
        for ns, dev in self.ends():
            subprocess.run(["tc", "-n", ns.name, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)
        self.mbit = None

    # --- loss and partitions: nft, at the receiving end ---

    def _apply_filter(self) -> None:
        if self._cut:
            verdict = "drop"
        elif self._loss > 0:
            verdict = f"numgen random mod 100 < {int(round(self._loss))} drop"
        else:
            verdict = ""
        for ns, dev in self.ends():
            rule = f'iifname "{dev}" {verdict}' if verdict else ""
            ns.nft(f"table inet wanbed {{}}\ndelete table inet wanbed\n"
                   f"table inet wanbed {{\n chain input {{\n  type filter hook input priority -10;"
                   f" policy accept;\n  {rule}\n }}\n}}\n")

    def loss(self, pct: float) -> None:
        """Drop `pct` % (whole percent, 0..100) of the packets in each direction."""
        if not 0 <= pct <= 100 or pct != int(pct):
            raise ValueError("loss: a whole percentage 0..100")
        self._loss = pct
        self._apply_filter()

    def partition(self) -> None:
        """Drop every packet in both directions (connections stay open, as on a cut line)."""
        self._cut = True
        self._apply_filter()

    def heal(self) -> None:
        self._cut = False
        self._apply_filter()

    def clear(self) -> None:
        self._cut, self._loss = False, 0
        self._apply_filter()
        self.unlimited()

    # --- counters ---

    def counter(self, side: Namespace, which: str = "tx") -> int:
        """Bytes `side` sent ("tx") or received ("rx") on this link so far (whole frames)."""
        dev = self.dev_a if side is self.a else self.dev_b
        row = json.loads(_ip("-n", side.name, "-s", "-j", "link", "show", "dev", dev).stdout)[0]
        return int(row["stats64"][which]["bytes"])

    def measure(self, seconds: float = 4.0, warmup: float = 1.0) -> dict[str, float]:
        """Push TCP from `a` to `b` for warmup + `seconds`; the steady rate after warmup,
        as TCP payload (`goodput_bps`) and as frames on the wire (`wire_bps`), bits/s."""
        with self.b.entered():
            srv = socket.create_server((self.addr_b, 0))
        port = srv.getsockname()[1]
        stop = threading.Event()
        result: dict[str, float] = {}

        def receive() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                got = len(conn.recv(CHUNK))
                t_end = time.monotonic() + warmup + seconds
                t1 = time.monotonic() + warmup
                mark: tuple[float, int, int] | None = None
                while (now := time.monotonic()) < t_end:
                    if mark is None and now >= t1:
                        mark = (now, got + _unread(conn), self.counter(self.b, "rx"))
                    got += len(conn.recv(CHUNK))
                t2, rx2 = time.monotonic(), self.counter(self.b, "rx")
                got += _unread(conn)
                stop.set()
                assert mark is not None
                result["goodput_bps"] = (got - mark[1]) * 8 / (t2 - mark[0])
                result["wire_bps"] = (rx2 - mark[2]) * 8 / (t2 - mark[0])

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        try:
            with self.a.entered():
                c = socket.create_connection((self.addr_b, port), timeout=30)
            with c:
                block = b"\0" * CHUNK
                while not stop.is_set():
                    c.sendall(block)
        except OSError:
            if not stop.is_set():
                raise
        finally:
            t.join(60)
            srv.close()
        if "wire_bps" not in result:
            raise RuntimeError("throughput measurement did not finish")
        return result


def _unread(conn: socket.socket) -> int:
    """Bytes received by the kernel that the application has not read yet."""
    return struct.unpack("i", fcntl.ioctl(conn, termios.FIONREAD, b"\0" * 4))[0]  # type: ignore[no-any-return]


class Wan:
    """The bed: `site` and `center` joined by one link; more centers with `add_center`."""

    def __init__(self, centers: tuple[str, ...] = ("center",)) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the WAN test bed needs root (network namespaces, tc, nft)")
        self.tag = secrets.token_hex(3)
        self.namespaces: list[Namespace] = []
        self.links: dict[str, Link] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._taken: list[ipaddress.IPv4Network] = []
        self.wg_ifaces: list[str] = []
        self._keys: Path | None = None
        _live.add(self)
        try:
            self.site = Namespace(self, "site")
            for c in centers:
                self.add_center(c)
        except BaseException:
            self.close()
            raise

    @property
    def center(self) -> Namespace:
        return self.by_role("center")

    @property
    def link(self) -> Link:
        """The link between `site` and `center`."""
        return self.links["center"]

    def by_role(self, role: str) -> Namespace:
        return next(ns for ns in self.namespaces if ns.role == role)

    def add_center(self, role: str) -> Namespace:
        """A new namespace `role` with its own link to `site` (e.g. `center_b` for failover)."""
        if any(ns.role == role for ns in self.namespaces):
            raise ValueError(f"{role} exists")
        ns = Namespace(self, role)
        if not self._taken:
            self._taken = _host_networks()
        net = free_subnet(self._taken)
        self._taken.append(net)
        link = Link(self.site, ns, net)
        ns.addr = link.addr_b
        if not self.site.addr:
            self.site.addr = link.addr_a
        self.links[role] = link
        return ns

    def delay(self, ms: float, host: str, port: int, where: Namespace | None = None) -> tuple[str, int]:
        """Start a relay in `where` (default `site`) that forwards to host:port, adding `ms`
        one-way in each direction; returns the (127.0.0.1, port) to connect to there."""
        ns = where or self.site
        port_file = Path(f"/tmp/{ns.name}-relay-{secrets.token_hex(4)}.port")  # noqa: S108
        p = ns.popen(sys.executable, "-m", "tests.wan", "relay", "--listen", "127.0.0.1:0",
                     "--to", f"{host}:{port}", "--delay-ms", str(ms), "--port-file", str(port_file),
                     cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                if port_file.exists() and port_file.read_text().endswith("\n"):
                    return "127.0.0.1", int(port_file.read_text())
                if p.poll() is not None:
                    raise RuntimeError(f"relay exited with {p.returncode}")
                time.sleep(0.02)
            raise TimeoutError("relay did not start within 20 s")
        finally:
            port_file.unlink(missing_ok=True)

    # --- the VPN path: wireguard-go ---

    def vpn(self, center: Namespace | None = None) -> str:
        """A WireGuard tunnel (userspace wireguard-go) from `site` to `center` over their
        link; returns the center's address inside the tunnel. Its packets cross the link,
        so the link's rate, loss and partitions apply to it."""
        ns = center or self.center
        link = self.links[ns.role]
        net = free_subnet(self._taken)
        self._taken.append(net)
        ha, hb = (str(h) for h in net.hosts())
        if self._keys is None:
            self._keys = Path(tempfile.mkdtemp(prefix=f"wan-{self.tag}-wg-"))
        ends = []
        for side, peer_addr in ((self.site, link.addr_b), (ns, link.addr_a)):
            # wireguard-go's control socket is /var/run/wireguard/IF.sock, shared by every
            # namespace: the interface name must be unique on the machine, not per namespace.
            ifname = f"wg{self.tag}{len(self.wg_ifaces)}"
            self.wg_ifaces.append(ifname)
            key = self._keys / f"{ifname}.key"
            key.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                                          check=True, timeout=10).stdout)
            key.chmod(0o600)
            pub = subprocess.run(["wg", "pubkey"], input=key.read_text(), capture_output=True,
                                 text=True, check=True, timeout=10).stdout.strip()
            side.popen("wireguard-go", "-f", ifname, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ends.append((side, ifname, key, pub, peer_addr))
        for (side, ifname, _k, _p, _a), addr in zip(ends, (ha, hb), strict=True):
            sock = WG_RUN / f"{ifname}.sock"
            deadline = time.monotonic() + 20
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"wireguard-go {ifname} did not start within 20 s")
                time.sleep(0.02)
            _ip("-n", side.name, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ifname)
        for me, other in ((ends[0], ends[1]), (ends[1], ends[0])):
            side, ifname, key, _pub, peer_addr = me
            r = side.run("wg", "set", ifname, "private-key", str(key), "listen-port", str(WG_PORT),
                         "peer", other[3], "allowed-ips", f"{net}", "endpoint", f"{peer_addr}:{WG_PORT}",
                         timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"wg set {ifname}: {r.stderr.strip()}")
            _ip("-n", side.name, "link", "set", ifname, "up")
        return hb

    # --- teardown ---

    def close(self) -> None:
        for p in self.procs:
            _stop_pid(p)
        for ns in self.namespaces:
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in self.namespaces:
            deadline = time.monotonic() + 10
            while ns.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            _ip("netns", "del", ns.name, check=False)
        self.namespaces.clear()
        for ifname in self.wg_ifaces:  # left behind only by a wireguard-go that was SIGKILLed
            (WG_RUN / f"{ifname}.sock").unlink(missing_ok=True)
        if self._keys is not None:
            shutil.rmtree(self._keys, ignore_errors=True)
        _live.discard(self)

    def names(self) -> list[str]:
        return [ns.name for ns in self.namespaces]

    def __enter__(self) -> Wan:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _stop_pid(p: subprocess.Popen[bytes], grace: float = 5) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


@atexit.register
def _close_all() -> None:
    for bed in list(_live):
        bed.close()


def netns_list() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


# --- the delay relay (runs as `python -m tests.wan relay ...` inside a namespace) ---------

CHUNK = 65536
QUEUED_CHUNKS = 256


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader -> writer, each chunk written `delay` s after it was read."""
    q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while data := await reader.read(CHUNK):
            await q.put((loop.time() + delay, data))
        await q.put((loop.time() + delay, b""))

    async def write() -> None:
        while True:
            due, data = await q.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _relay(listen: tuple[str, int], to: tuple[str, int], delay: float, port_file: Path) -> None:
    async def session(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.wait_for(asyncio.open_connection(*to), 30)
        except (TimeoutError, OSError):
            cw.close()
            return
        for w in (cw, sw):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (cw, sw):
                w.close()

    server = await asyncio.start_server(session, *listen)
    port = server.sockets[0].getsockname()[1]
    port_file.write_text(f"{port}\n")
    async with server:
        await server.serve_forever()


def relay_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="a TCP relay that delays each direction")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    a = ap.parse_args(argv)
    lh, lp = a.listen.rsplit(":", 1)
    th, tp = a.to.rsplit(":", 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_relay((lh, int(lp)), (th, int(tp)), a.delay_ms / 1000, a.port_file))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        sys.exit(relay_main(sys.argv[2:]))
    sys.exit("usage: python -m tests.wan relay --listen H:P --to H:P --delay-ms MS --port-file F")
