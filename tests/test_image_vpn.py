"""The image's WireGuard VPN ([vpn], docs/vpn.md) booted in QEMU: a study sent to the
guest reaches a PACS that only the tunnel leads to.

    host loopback 127.0.0.1:P  <-- UDP relay (this test) -->  netns: wireguard-go (UDP 51820)
          ^ QEMU user net: the guest's endpoint 10.0.2.2:P         | TUN, 10.x.y.1/30
    guest: appliance-vpn.service renders [vpn] -> networkd: wg0 10.x.y.2/30
                                                          Orthanc in the netns (DICOM 4242)

The center side lives in a network namespace of its own (tests/wan.py, one namespace, no
link): wireguard-go's UDP socket and TUN device, and Orthanc, are there, and the
namespace has no other interface than its loopback, so the only way in from the guest is
the tunnel. QEMU's user networking can only reach the host's own loopback (10.0.2.2), so
a small UDP relay in this test carries datagrams between a socket on the host's loopback
and one inside the namespace (WireGuard does not care what the outer addresses are).

The ops broker (Mosquitto, as tests/mosquitto.py configures it) is in the namespace too,
so the box's ops link also goes through the tunnel, and its `state` shows the handshake
age that the root timer read and the unprivileged daemon reported.

The site config is a drop-in written into a sparse copy of the image's root A with
debugfs (the image stays as built): [vpn] with the host peer's public key, a dicom
destination at Orthanc's tunnel address and [operations] at the broker's; the box's MQTT
key and certificate (signed by a fleet CA made here) go into the copy's /data/keys, owned
by the appliance user. The guest makes its own key at boot and prints
the public key on the console (appliance-vpn.service); the test gives it to its
wireguard-go, the guest's keepalive starts the handshake, and then a C-STORE into the
guest (hostfwd) is packed, forwarded through the tunnel and compared with the original.

QEMU is tests/qemu.py's, on the copy and with user networking not restricted (the guest
must reach the host's 10.0.2.2). Run with `make image-test`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import qemu
from tests.e2e_support import J2K_LOSSLESS, compare_instance, read_dataset
from tests.mosquitto import MOSQUITTO, Watcher
from tests.orthanc import Orthanc
from tests.peers import SAMPLES, dcmtk_env, free_port, wait_for
from tests.wan import WG_RUN, Wan, _host_networks, free_subnet

pytestmark = [pytest.mark.image]

PUBKEY_LINE = re.compile(r"vpn public key: ([A-Za-z0-9+/]{43}=)")
CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"
WG_LISTEN = 51820


# --- the center: wireguard-go and Orthanc in a namespace, a UDP relay to the loopback ----


class UdpRelay:
    """Datagrams between `outer` (the host's loopback, where QEMU's user net delivers
    the guest's 10.0.2.2:P) and wireguard-go's port inside the namespace. One guest: a
    reply goes to whoever sent last. Stopped by `close()`."""

    def __init__(self, netns: Wan, port: int) -> None:
        self.outer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outer.bind(("127.0.0.1", port))
        with netns.site.entered():
            self.inner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.inner.connect(("127.0.0.1", WG_LISTEN))
        self.guest: tuple[str, int] | None = None
        self.datagrams = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.outer, self.inner], [], [], 0.2)
            for s in ready:
                try:
                    if s is self.outer:
                        data, self.guest = self.outer.recvfrom(65535)
                        self.inner.send(data)
                    else:
                        data = self.inner.recv(65535)
                        if self.guest is not None:
                            self.outer.sendto(data, self.guest)
                    self.datagrams += 1
                except OSError:  # wireguard-go not listening yet: ICMP unreachable, drop
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.outer.close()
        self.inner.close()


@dataclass
class Center:
    wan: Wan
    ifname: str
    public_key: str
    tunnel: ipaddress.IPv4Network
    relay_port: int

    @property
    def addr(self) -> str:
        return str(list(self.tunnel.hosts())[0])

    @property
    def guest_addr(self) -> str:
        return str(list(self.tunnel.hosts())[1])

    def wg(self, *args: str) -> str:
        r = self.wan.site.run("wg", *args, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def accept(self, guest_public_key: str) -> None:
        self.wg("set", self.ifname, "peer", guest_public_key, "allowed-ips", f"{self.guest_addr}/32")

    def handshake_at(self) -> int:
        """The latest handshake with the guest (epoch seconds; 0 = none yet)."""
        return max((int(f[1]) for line in self.wg("show", self.ifname, "latest-handshakes").splitlines()
                    if len(f := line.split()) == 2), default=0)


def start_center(wan: Wan, tmp: Path) -> Center:
    ifname = f"wg{wan.tag}v"  # wireguard-go's socket dir is shared: unique on the machine
    wan.wg_ifaces.append(ifname)
    key = tmp / "center.key"
    key.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True,
                                  timeout=10).stdout)
    key.chmod(0o600)
    pub = subprocess.run(["wg", "pubkey"], input=key.read_text(), capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    wan.site.popen("wireguard-go", "-f", ifname, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wait_for(lambda: (WG_RUN / f"{ifname}.sock").exists(), timeout=30, what="wireguard-go's socket")
    # Not the host's networks, nor the guest's own (QEMU user net: 10.0.2.0/24).
    tunnel = free_subnet([*_host_networks(), ipaddress.ip_network("10.0.2.0/24")])
    c = Center(wan, ifname, pub, tunnel, free_port())
    c.wg("set", ifname, "private-key", str(key), "listen-port", str(WG_LISTEN))
    for args in (["addr", "add", f"{c.addr}/30", "dev", ifname], ["link", "set", ifname, "up"]):
        r = wan.site.run("ip", *args)
        assert r.returncode == 0, r.stderr
    return c


# --- the guest: a copy of the image with the site's drop-in --------------------------------


def site_dropin(c: Center, pacs_port: int, broker_port: int) -> str:
    return f"""# tests/test_image_vpn.py: the center is reached only through the tunnel
[vpn]
addresses = ["{c.guest_addr}/30"]
peer_public_key = "{c.public_key}"
endpoint = "10.0.2.2:{c.relay_port}"
allowed_ips = ["{c.tunnel}"]
persistent_keepalive_s = 5

[pack]
adaptive = false
codec = "jpeg2000"

[[destinations]]
name = "center"
transport = "dicom"
host = "{c.addr}"
port = {pacs_port}
ae_title = "ORTHANC"
plaintext = true
timeout_s = 60

[operations]
host = "{c.addr}"
port = {broker_port}
ca = "/data/keys/fleet-ca.pem"
cert = "/data/keys/mqtt.pem"
key = "/data/keys/mqtt.key"
heartbeat_s = 5
"""


def debugfs(fs: str, script: str) -> str:
    r = subprocess.run(["debugfs", "-w", "-f", "-", fs], input=script, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "debugfs:" in r.stdout, r.stdout + r.stderr
    return r.stdout + r.stderr


def image_with(tmp: Path, dropin: str, keys: dict[str, tuple[Path, int]]) -> Path:
    """A sparse copy of the image: /etc/appliance/conf.d/vpn.toml in root A, and `keys`
    (name -> (file, mode)) in /data/keys, owned by the appliance user as keys init
    would leave them."""
    disk = tmp / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(qemu.IMAGE), str(disk)], check=True, timeout=300)
    r = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True,
                       timeout=60)
    parts = {p["name"]: p for p in json.loads(r.stdout)["partitiontable"]["partitions"]}
    root, data = (f"{disk}?offset={int(parts[n]['start']) * 512}" for n in ("root-a", "data"))
    src = tmp / "vpn.toml"
    src.write_text(dropin)
    src.chmod(0o644)
    debugfs(root, f"mkdir /etc/appliance/conf.d\ncd /etc/appliance/conf.d\nwrite {src} vpn.toml\n")
    passwd = subprocess.run(["debugfs", "-R", "cat /etc/passwd", root], capture_output=True, text=True,
                            timeout=60).stdout
    uid = next(int(f[2]) for line in passwd.splitlines() if (f := line.split(":"))[0] == "appliance")
    script = ["cd /keys"]
    for name, (path, mode) in keys.items():
        script += [f"write {path} {name}", f"sif {name} uid {uid}", f"sif {name} gid {uid}",
                   f"sif {name} mode 0{0o100000 | mode:o}"]
    debugfs(data, "\n".join(script) + "\n")
    got = subprocess.run(["debugfs", "-R", "cat /etc/appliance/conf.d/vpn.toml", root], capture_output=True,
                         text=True, timeout=60).stdout
    assert got == dropin
    return disk


class CenterBroker:
    """Mosquitto as tests/mosquitto.py configures it, but inside the center's namespace on
    every address there (the guest reaches it through the tunnel), and a watcher."""

    def __init__(self, wan: Wan, tmp: Path, center: Center) -> None:
        from appliance.ops import pki
        from tests.mosquitto import Broker

        self.ca = tmp / "fleet"
        pki.ca_init(self.ca, (center.addr, "127.0.0.1"))
        self.broker = Broker(tmp / "broker", self.ca)
        conf = self.broker.conf.read_text()
        self.broker.conf.write_text(conf.replace(f"listener {self.broker.port} 127.0.0.1",
                                                 f"listener {self.broker.port}"))
        with self.broker.log.open("ab") as log:
            wan.site.popen(MOSQUITTO, "-c", str(self.broker.conf), stdout=log, stderr=subprocess.STDOUT)
        self.wan = wan
        wait_for(self.listening, 30, "mosquitto listening in the center", detail=self.broker.log_text)
        self.box_key, self.box_csr = tmp / "mqtt.key", tmp / "mqtt.csr"
        pki.box_key_and_csr("appliance", self.box_key, self.box_csr)  # the image's [appliance] name
        pki.sign_csr(pki.load_ca(self.ca), self.box_csr, tmp / "mqtt.pem")
        self.box_cert = tmp / "mqtt.pem"

    def listening(self) -> bool:
        with self.wan.site.entered(), socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.broker.port)) == 0

    def watcher(self) -> Watcher:
        with self.wan.site.entered():  # its socket, made in connect(), lives in the namespace
            return Watcher(self.broker, self.ca / "ops-center.pem", self.ca / "ops-center.key")


@dataclass
class Bed:
    center: Center
    relay: UdpRelay
    pacs: Orthanc
    broker: CenterBroker
    watcher: Watcher
    guest: qemu.Guest
    guest_public_key: str


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The center (namespace, wireguard-go, relay, Orthanc) and the guest booted to READY."""
    qemu.require_tools("storescu", "wireguard-go", "wg", "debugfs")
    tmp = tmp_path_factory.mktemp("qemu-vpn")
    with Wan(centers=()) as wan:
        center = start_center(wan, tmp)
        relay = UdpRelay(wan, center.relay_port)
        pacs = Orthanc(tmp / "orthanc", netns=wan.site.name).start()
        broker = CenterBroker(wan, tmp, center)
        watcher = broker.watcher()
        disk = image_with(tmp, site_dropin(center, pacs.dicom_port, broker.broker.port), {
            "mqtt.key": (broker.box_key, 0o600), "mqtt.pem": (broker.box_cert, 0o644),
            "fleet-ca.pem": (broker.ca / "ca.pem", 0o644)})
        try:
            with qemu.booted(tmp, disk=disk, restrict=False) as g:
                m = PUBKEY_LINE.search(g.console_text())
                assert m, f"no 'vpn public key:' line on the console:\n{g.tail()}"
                center.accept(m.group(1))
                yield Bed(center, relay, pacs, broker, watcher, g, m.group(1))
        finally:
            watcher.close()
            pacs.stop()
            relay.close()
            disk.unlink(missing_ok=True)


def test_image_vpn_guest_shakes_hands_with_the_center(bed: Bed) -> None:
    """The guest's keepalive (5 s) reaches wireguard-go through QEMU's user net and the relay."""
    at = wait_for(bed.center.handshake_at, timeout=120, poll=1.0, detail=bed.guest.tail,
                  what="a WireGuard handshake from the guest")
    assert abs(time.time() - at) < 150
    assert bed.relay.datagrams > 0


def test_image_vpn_carries_the_forwarded_study_to_the_center(bed: Bed) -> None:
    wait_for(bed.center.handshake_at, timeout=120, poll=1.0, detail=bed.guest.tail,
             what="a WireGuard handshake from the guest")
    files = sorted(CT.iterdir())[:3]
    r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "EDGE", "-R", "127.0.0.1",
                        str(bed.guest.dicom_port), *map(str, files)],
                       capture_output=True, text=True, timeout=300, env=dcmtk_env())
    assert r.returncode == 0, r.stderr + bed.guest.tail()
    # study_quiet_s, packing with verification under TCG, then the send: minutes at most.
    wait_for(lambda: bed.pacs.count() >= len(files), timeout=400, poll=2.0, detail=bed.guest.tail,
             what="the study in the center's Orthanc")
    by_sop = bed.pacs.files_by_sop_uid()
    problems = []
    for f in files:
        stored = by_sop[str(read_dataset(f).SOPInstanceUID)]
        c, category = compare_instance(f, stored, J2K_LOSSLESS)
        if c.problems or category != "compressed":
            problems.append(f"{f.name}: {category}: {c.problems[:4]}")
    assert not problems, problems


def test_image_vpn_state_reaches_the_ops_broker_through_the_tunnel_with_the_handshake_age(
        bed: Bed) -> None:
    """The ops link's broker is in the center too: the box's `state` arrives through the
    tunnel and carries what the handshake timer read, via the unprivileged daemon."""
    def vpn_up() -> dict[str, Any] | None:
        for m in reversed(bed.watcher.on("appliance/appliance/state")):
            vpn = m.json().get("vpn") or {}
            if vpn.get("up") is True:
                return dict(vpn)
        return None
    vpn = wait_for(vpn_up, timeout=240, poll=1.0, detail=lambda: str(bed.watcher.last(
        "appliance/appliance/state")) + bed.guest.tail(), what="a state with the VPN up")
    assert vpn["interface"] == "wg0" and vpn["reading"] == "ok", vpn
    assert 0 <= vpn["handshake_age_s"] < 180, vpn
