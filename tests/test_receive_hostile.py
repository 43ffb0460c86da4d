"""Hostile peers on the receive port (core/listener.py in front of pynetdicom): stalled
sockets, an association request or PDU that declares more than any limit, too many
connections from one address or in total. The real daemon, DCMTK's echoscu/storescu and
pynetdicom as the peers; the hostile ones are raw sockets from loopback addresses."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.hostile import (
    MiB,
    Stallers,
    connect_from,
    oversized_associate_rq,
    proc_status,
    write_deflate_bomb,
)
from tests.peers import Appliance, echoscu, free_port, storescu, wait_for
from tests.receive_support import daemon_log_events, held_config
from tests.spoolcheck import dataset_bytes

ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"
Factory = Callable[..., Appliance]


def start(factory: Factory, root: Path, **receive: Any) -> Appliance:
    return factory(held_config(root, free_port(), **receive), root=root)


def refused(app: Appliance) -> dict[str, int]:
    result: dict[str, int] = app.status()["receive"]["connections_refused"]
    return result


def pid(app: Appliance) -> int:
    assert app.proc is not None
    return app.proc.pid


def closed_soon(s: socket.socket, within: float = 5.0) -> bool:
    """Has the daemon closed `s` (EOF or reset) within `within` s?"""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def pynetdicom_echo(port: int, source: str) -> int | None:
    """A C-ECHO by pynetdicom from `source`; its status, or None if not associated."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_allowed_modality_gets_through_60_stalled_sockets(
        appliance_factory: Factory, tmp_path: Path, samples: Path) -> None:
    """60 connections from 60 addresses that each sent one byte and stalled do not keep an
    allowed modality out: its C-ECHO and C-STORE succeed at once (before, both were
    rejected with "local limit exceeded")."""
    app = start(appliance_factory, tmp_path / "a", acse_timeout_s=30)
    st = Stallers.open(app.port, 60)
    try:
        t0 = time.monotonic()
        echo = echoscu(app.port)
        echo_s = time.monotonic() - t0
        t0 = time.monotonic()
        store = storescu(app.port, [samples / ONE_CT])
        store_s = time.monotonic() - t0
    finally:
        st.close()
    assert echo.returncode == 0, echo.stderr
    assert store.returncode == 0 and "Store Failed" not in store.stderr, store.stderr
    print(f"\nunder 60 stalled sockets: C-ECHO {echo_s:.2f} s, C-STORE {store_s:.2f} s")
    assert echo_s < 5 and store_s < 5
    assert len(app.spooled()) == 1


def test_stalled_sockets_cost_no_threads(appliance_factory: Factory, tmp_path: Path) -> None:
    """A stalled connection waits in the gate (one thread for all), not in two pynetdicom
    threads of its own (before: 126 threads for 60)."""
    app = start(appliance_factory, tmp_path / "a", acse_timeout_s=30)
    idle = proc_status(pid(app), "Threads")
    st = Stallers.open(app.port, 60)
    try:
        wait_for(lambda: sum(refused(app).values()) >= 60 - 32, what="the listener full")
        loaded = proc_status(pid(app), "Threads")
    finally:
        st.close()
    print(f"\nthreads: idle {idle}, under 60 stalled sockets {loaded}")
    assert loaded <= idle + 2


def test_stalled_sockets_are_closed_within_the_acse_timeout(
        appliance_factory: Factory, tmp_path: Path) -> None:
    """Every stalled connection is closed by the daemon: those past max_connections (32) at
    once (the oldest evicted for newcomers), the rest when receive.acse_timeout_s (5 s)
    has passed since it was accepted; each closing is counted by class."""
    app = start(appliance_factory, tmp_path / "a", acse_timeout_s=5)
    st = Stallers.open(app.port, 60)
    try:
        closed_after = st.wait_closed(timeout=30)
    finally:
        st.close()
    assert closed_after is not None, f"{st.open_count()} stalled sockets still open after 30 s"
    waited = sorted(t - st.opened[i] for i, t in st.closed_at.items())
    print(f"\nall 60 closed {closed_after:.1f} s after opening; "
          f"{sum(1 for w in waited if w < 2.5)} within 2.5 s")
    assert sum(1 for w in waited if w < 2.5) >= 60 - 32  # evicted at once
    assert all(w > 4.5 for w in waited[60 - 32:])  # the rest held their 5 s
    assert closed_after < 5 + 4
    counts = refused(app)
    # (the daemon's readiness probe in tests.peers may be evicted too)
    assert counts["handshake_timeout"] == 32 and counts["evicted"] >= 60 - 32, counts


def test_oversized_associate_request_is_closed_before_its_body_is_read(
        appliance_factory: Factory, tmp_path: Path) -> None:
    """An A-ASSOCIATE-RQ whose header declares 1 GiB is closed as soon as its header is in:
    the daemon does not take the 256 MiB of junk that follow (before, it read them all and
    its peak RSS grew by 515 MiB)."""
    app = start(appliance_factory, tmp_path / "a")
    before = proc_status(pid(app), "VmHWM")
    flood = oversized_associate_rq(app.port, declared=1 << 30, stream=256 * MiB, timeout=60)
    grew = (proc_status(pid(app), "VmHWM") - before) / 1024
    print(f"\nclosed={flood.closed} after {flood.seconds:.2f} s; {flood.sent / MiB:.1f} MiB sent; "
          f"peak RSS grew {grew:.1f} MiB")
    assert flood.closed and flood.seconds < 10
    assert flood.sent < 32 * MiB  # what the kernel's socket buffers took before the close
    assert grew < 16
    assert refused(app) == {"pdu_too_long": 1}
    events = [e for e in daemon_log_events(app.log_text()) if e.get("event") == "connection.refused"]
    assert [(e["reason"], e["peer"]) for e in events] == [("pdu_too_long", "127.0.0.1")]


def test_oversized_pdu_inside_an_association_ends_it(appliance_factory: Factory, tmp_path: Path) -> None:
    """Once associated, a P-DATA-TF declaring more than receive.max_pdu is refused before
    its body is read: the association is aborted, the connection closed."""
    app = start(appliance_factory, tmp_path / "a")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established
    before = proc_status(pid(app), "VmHWM")
    sock = assoc.dul.socket.socket
    try:
        sock.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30))
        with contextlib.suppress(OSError):  # the daemon may close before it is all out
            sock.sendall(b"\0" * MiB)
        wait_for(lambda: not assoc.is_established, timeout=20, what="the association to end")
    finally:
        assoc.abort()
        sock.close()  # pynetdicom leaves it open when the peer closed first
    assert (proc_status(pid(app), "VmHWM") - before) / 1024 < 16
    assert refused(app) == {"pdu_too_long": 1}
    wait_for(lambda: app.status()["receive"]["associations_active"] == 0, what="no association left")


def test_deflate_bomb_is_stored_without_being_inflated(appliance_factory: Factory, tmp_path: Path) -> None:
    """storescu -xd sends a data set that inflates to 256 MiB (~256 KiB on the wire) from an
    allowed caller: it is stored as received (Success), and the daemon's peak RSS grows by
    a few MiB, not by its inflated size (before: 66 -> 1093 MiB for 512 MiB)."""
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", inflated=256 * MiB)
    app = start(appliance_factory, tmp_path / "a")
    assert echoscu(app.port).returncode == 0
    before = proc_status(pid(app), "VmHWM")
    r = storescu(app.port, [bomb], extra=["-xd", "-v"])
    grew = (proc_status(pid(app), "VmHWM") - before) / 1024
    print(f"\ndeflate bomb {bomb.stat().st_size >> 10} KiB -> 256 MiB: peak RSS grew {grew:.1f} MiB")
    assert r.returncode == 0 and "Received Store Response (Success)" in r.stderr, r.stderr[-2000:]
    assert grew < 32
    (stored,) = app.spooled().values()
    assert len(stored) < MiB  # kept deflated, as received
    # the same data set as the file's, compared inflated piece by piece
    assert inflated_digest(dataset_bytes(stored)) == inflated_digest(dataset_bytes(bomb.read_bytes()))


def inflated_digest(deflated: bytes) -> str:
    """SHA-256 of what `deflated` inflates to, 4 MiB at a time. (DCMTK pads an odd-length
    stream with a byte after its end: stop at the end of the stream.)"""
    d, h = zlib.decompressobj(-zlib.MAX_WBITS), hashlib.sha256()
    data = deflated
    while data and not d.eof:
        h.update(d.decompress(data, 4 * MiB))
        data = d.unconsumed_tail
    h.update(d.flush())
    return h.hexdigest()


def test_per_host_cap_refuses_the_next_connection_from_that_address_only(
        appliance_factory: Factory, tmp_path: Path) -> None:
    """With max_connections_per_host = 3, a 4th connection from 127.0.0.1 is closed at once
    while the first three wait; 127.0.0.2 still gets in and its C-ECHO succeeds."""
    app = start(appliance_factory, tmp_path / "a", max_connections_per_host=3, acse_timeout_s=60)
    first = [connect_from("127.0.0.1", app.port) for _ in range(3)]
    try:
        with connect_from("127.0.0.1", app.port) as fourth:
            assert closed_soon(fourth), "the 4th connection from one address was not refused"
        assert pynetdicom_echo(app.port, "127.0.0.2") == 0x0000
        assert not any(closed_soon(s, within=0.2) for s in first)
    finally:
        for s in first:
            s.close()
    assert refused(app) == {"per_host_cap": 1}


def test_a_full_listener_evicts_its_oldest_connection_without_an_association(
        appliance_factory: Factory, tmp_path: Path) -> None:
    """With max_connections = 3 taken by idle connections, a newcomer closes the oldest of
    them (not the others) and gets in."""
    app = start(appliance_factory, tmp_path / "a", max_connections=3, max_associations=3,
                max_connections_per_host=3, acse_timeout_s=60)
    idle = []
    for i in range(3):
        idle.append(connect_from(f"127.0.1.{i + 1}", app.port))
        time.sleep(0.05)  # so that "oldest" is well defined
    try:
        wait_for(lambda: app.status()["receive"]["associations_active"] == 0, what="status")
        assert pynetdicom_echo(app.port, "127.0.0.2") == 0x0000
        assert closed_soon(idle[0])
        assert not closed_soon(idle[1], within=0.2) and not closed_soon(idle[2], within=0.2)
    finally:
        for s in idle:
            s.close()
    assert refused(app) == {"evicted": 1}


def test_status_shows_refused_connections_by_class(appliance_factory: Factory, tmp_path: Path) -> None:
    """`appliance status` prints the refused connections by class, without any peer data."""
    app = start(appliance_factory, tmp_path / "a")
    oversized_associate_rq(app.port, stream=MiB, timeout=10)
    wait_for(lambda: refused(app) == {"pdu_too_long": 1}, what="the refusal counted")
    from tests.peers import cli
    r = cli("status", "--config", str(app.config_path), check=True)
    assert "connections    refused: pdu_too_long 1" in r.stdout, r.stdout
