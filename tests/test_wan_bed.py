"""The WAN test bed itself (tests/wan.py): rate, loss, partitions, delay, and teardown.

Each test makes its own bed; traffic is plain Python sockets made inside the namespaces
(iperf is not installed), so the figures are what TCP/UDP over the bed really get.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.peers import wait_for
from tests.wan import WG_RUN, Wan, entered, netns_list

pytestmark = pytest.mark.wan


@pytest.fixture
def wan() -> Iterator[Wan]:
    if os.geteuid() != 0:
        pytest.fail("the WAN test bed needs root (CI runs as root)")
    with Wan() as bed:
        yield bed


def udp_pair(wan: Wan) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """A UDP socket in `site` and one bound in `center`; the center's address."""
    with wan.center.entered():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((wan.center.addr, 0))
    with wan.site.entered():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return tx, rx, rx.getsockname()


def send_and_count(tx: socket.socket, rx: socket.socket, dst: tuple[str, int], n: int) -> int:
    """Send `n` datagrams in batches of 50, draining the receiver between batches (so
    that no socket buffer overflows); how many arrived."""
    got = 0

    def drain(wait: float) -> int:
        rx.settimeout(wait)
        k = 0
        try:
            while True:
                rx.recv(2048)
                k += 1
        except (TimeoutError, BlockingIOError):
            return k

    for i in range(n):
        tx.sendto(b"x", dst)
        if i % 50 == 49:
            time.sleep(0.002)
            got += drain(0.0)
    return got + drain(0.5)


def test_kernel_has_tbf_and_nft_numgen_but_no_netem(wan: Wan) -> None:
    """What the bed relies on exists here, and netem (which it must not rely on) does not."""
    wan.link.rate(20)
    wan.link.loss(1)
    assert "tbf" in wan.site.run("tc", "qdisc", "show", "dev", "to-center").stdout
    assert "numgen random mod 100 < 1 drop" in wan.center.run("nft", "list", "ruleset").stdout
    r = wan.site.run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "10ms")
    assert r.returncode != 0, "netem exists after all: the bed could use it for delay"


def test_a_20_mbit_link_carries_20_mbit(wan: Wan) -> None:
    """Frames on the wire within 3 % of 20 Mbit/s; TCP goodput 90-97 % of it (headers)."""
    wan.link.rate(20)
    m = wan.link.measure(seconds=4)
    assert abs(m["wire_bps"] / 20e6 - 1) < 0.03, m
    assert 0.90 * 20e6 < m["goodput_bps"] < 0.97 * 20e6, m


def test_loss_drops_about_the_asked_share(wan: Wan) -> None:
    """10 % loss: of 3000 datagrams each way, 10 % +- 3 points go missing (> 4 sigma)."""
    wan.link.loss(10)
    tx, rx, dst = udp_pair(wan)
    with tx, rx:
        lost = 1 - send_and_count(tx, rx, dst, 3000) / 3000
    assert 0.07 < lost < 0.13, lost
    with wan.site.entered():  # and the other direction: center -> site
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back.bind((wan.site.addr, 0))
    with back, wan.center.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        lost_back = 1 - send_and_count(out, back, back.getsockname(), 3000) / 3000
    assert 0.07 < lost_back < 0.13, lost_back


def test_no_loss_rule_drops_nothing(wan: Wan) -> None:
    """The bed's baseline: with loss(0) every datagram arrives (so the test above measures nft)."""
    wan.link.loss(10)
    wan.link.loss(0)
    tx, rx, dst = udp_pair(wan)
    with tx, rx:
        assert send_and_count(tx, rx, dst, 1000) == 1000


def test_partition_stops_a_tcp_stream_and_heal_resumes_it(wan: Wan) -> None:
    """Bytes written during a partition do not arrive; after heal they all do, on the
    same connection."""
    with wan.center.entered():
        srv = socket.create_server((wan.center.addr, 0))
    got = bytearray()

    def receive() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            while data := conn.recv(65536):
                got.extend(data)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    with wan.site.entered():
        c = socket.create_connection(srv.getsockname(), timeout=30)
    with c, srv:
        c.sendall(b"a" * 1000)
        wait_for(lambda: len(got) == 1000, 10, "the first 1000 bytes")
        wan.link.partition()
        c.sendall(b"b" * 1000)
        time.sleep(2)  # the assertion is that nothing arrives in this window
        assert len(got) == 1000
        wan.link.heal()
        wait_for(lambda: len(got) == 2000, 30, "the bytes sent during the partition")
        c.shutdown(socket.SHUT_WR)
        t.join(30)
    assert bytes(got) == b"a" * 1000 + b"b" * 1000


def test_partition_refuses_new_connections_until_healed(wan: Wan) -> None:
    """A connect across a partition times out (silently dropped, not refused)."""
    with wan.center.entered():
        srv = socket.create_server((wan.center.addr, 0))
    with srv:
        wan.link.partition()
        with wan.site.entered(), pytest.raises(TimeoutError):
            socket.create_connection(srv.getsockname(), timeout=1.5)
        wan.link.heal()
        with wan.site.entered():
            socket.create_connection(srv.getsockname(), timeout=10).close()


def test_delay_relay_adds_the_asked_delay_each_way(wan: Wan) -> None:
    """A round trip through a 50 ms relay takes 100 ms (+ at most 60 ms of scheduling)."""
    with wan.center.entered():
        srv = socket.create_server((wan.center.addr, 0))

    def echo() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    host, port = wan.delay(50, wan.center.addr, srv.getsockname()[1])
    with wan.site.entered():
        c = socket.create_connection((host, port), timeout=30)
    with c, srv:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(5):
            t0 = time.monotonic()
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
            rtts.append(time.monotonic() - t0)
    assert 0.100 <= min(rtts) < 0.160, rtts


def test_a_second_center_is_one_call_with_its_own_link(wan: Wan) -> None:
    """`add_center("center_b")`: its own namespace, subnet and link; cutting A leaves B up."""
    b = wan.add_center("center_b")
    assert not wan.links["center"].net.overlaps(wan.links["center_b"].net)
    wan.link.partition()
    with b.entered():
        srv = socket.create_server((b.addr, 0))
    with srv, wan.site.entered():
        socket.create_connection(srv.getsockname(), timeout=10).close()


def test_nothing_is_left_after_the_bed_closes() -> None:
    """Namespaces, the relay, wireguard-go, and a process started through the namespace prefix are all
    gone after close(), also when the body fails."""
    pids: list[int] = []
    names: list[str] = []
    wg_sockets = []
    with pytest.raises(RuntimeError, match="body failed"), Wan() as bed:
        names = bed.names() + [bed.add_center("center_b").name]
        bed.delay(10, bed.center.addr, 9)
        bed.vpn()
        wg_sockets = [WG_RUN / f"{i}.sock" for i in bed.wg_ifaces]
        assert all(s.exists() for s in wg_sockets)
        pids += [p.pid for p in bed.procs]
        loose = subprocess.Popen([*bed.site.prefix(), "sleep", "600"], start_new_session=True)
        pids.append(loose.pid)
        wait_for(lambda: loose.pid in bed.site.pids(), 10, "sleep inside the site namespace")
        raise RuntimeError("body failed")
    loose.wait(10)
    assert not set(names) & set(netns_list())
    assert not [s for s in wg_sockets if s.exists()]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} outlived the bed"
    with pytest.raises(FileNotFoundError), entered(names[0]):
        pass


def test_vpn_tunnel_carries_tcp_over_the_link(wan: Wan) -> None:
    """wireguard-go site -> center: a connection to the center's tunnel address works, and
    it rides on the link: a partition of the link stops it."""
    addr = wan.vpn()
    with wan.center.entered():
        srv = socket.create_server((addr, 0))
    with srv:
        with wan.site.entered():
            socket.create_connection(srv.getsockname(), timeout=20).close()
        wan.link.partition()
        with wan.site.entered(), pytest.raises(TimeoutError):
            socket.create_connection(srv.getsockname(), timeout=1.5)
        wan.link.heal()
        with wan.site.entered():
            socket.create_connection(srv.getsockname(), timeout=20).close()
    assert wan.site.run("wg", "show", wan.wg_ifaces[0]).returncode == 0
