"""The WireGuard VPN ([vpn]): its config keys, the systemd-networkd files rendered from
them, the box's key, and the handshake age the unprivileged daemon reports.

The host kernel has no WireGuard, so networkd cannot bring the tunnel up here (the image
test does, tests/test_image_vpn.py). Here: every `Section.Key` rendered is one that this
machine's systemd-networkd (252, as in the image) has in its parser tables (`systemd-analyze
verify` does not read .netdev/.network files), keys agree with `wg pubkey`, and the
handshake file, written by the image unit's own command, is read right against a real
wireguard-go tunnel between network namespaces (tests/wan.py).
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli.status import vpn_line
from appliance.core import config
from appliance.core.errors import EX_CONFIG, ConfigError, KeyFileError
from appliance.ops import messages
from appliance.vpn import handshake, keys, netdev
from tests.peers import REPO, base_config, cli, free_port, to_toml, wait_for

MAIN = Path("/etc/appliance/appliance.toml")
UNITS = REPO / "image-build" / "overlay" / "usr" / "lib" / "systemd" / "system"
NETWORKD = Path("/lib/systemd/systemd-networkd")
PEER = base64.b64encode(bytes(range(32))).decode()


def vpn_table(**over: Any) -> dict[str, Any]:
    return {"addresses": ["10.8.0.2/24"], "peer_public_key": PEER, "endpoint": "vpn.example.org:51820",
            "allowed_ips": ["10.8.0.0/24", "10.20.0.0/16"], **over}


def parse_vpn(**over: Any) -> config.Vpn:
    cfg = config.parse({"receive": {"callers": [{"ae_title": "CT"}]}, "vpn": vpn_table(**over)}, {}, MAIN)
    assert cfg.vpn is not None
    return cfg.vpn


def vpn_problems(table: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse({"receive": {"callers": [{"ae_title": "CT"}]}, "vpn": table}, {}, MAIN)
    return e.value.problems


# --- config ---------------------------------------------------------------------------


def test_vpn_absent_means_no_tunnel() -> None:
    assert config.parse({"receive": {"callers": [{"ae_title": "CT"}]}}, {}, MAIN).vpn is None


def test_vpn_defaults_interface_key_keepalive_and_mtu() -> None:
    v = parse_vpn()
    assert (v.interface, v.private_key, v.persistent_keepalive_s, v.mtu) == (
        "wg0", Path("/data/vpn/wireguard.key"), 25, 1420)
    assert v.allowed_ips == ("10.8.0.0/24", "10.20.0.0/16")


def test_vpn_requires_addresses_peer_endpoint_and_allowed_ips() -> None:
    ps = vpn_problems({})
    assert sorted(p.split(": ")[1] for p in ps) == [
        "vpn.addresses", "vpn.allowed_ips", "vpn.endpoint", "vpn.peer_public_key"]
    assert all(p.endswith("is required") for p in ps)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("interface", "wireguard-to-center", "longer than 15 characters"),
    ("interface", "wg/0", "1..15 letters"),
    ("addresses", ["10.8.0.2"], "has no prefix"),
    ("addresses", ["10.8.0.300/24"], "is not one of addresses"),
    ("addresses", [], "non-empty array"),
    ("peer_public_key", "not-a-key", "is not a WireGuard public key"),
    ("peer_public_key", base64.b64encode(b"x" * 31).decode(), "is not a WireGuard public key"),
    ("endpoint", "vpn.example.org", "is not HOST:PORT"),
    ("endpoint", "vpn.example.org:70000", "is not HOST:PORT"),
    ("endpoint", "2001:db8::1:51820", "is not HOST:PORT"),
    ("allowed_ips", ["10.8.0.0/33"], "is not one of IP networks"),
    ("allowed_ips", ["0.0.0.0/0"], "must not hold a default route"),
    ("endpoint", "10.20.1.1:51820", "inside allowed_ips"),
    ("persistent_keepalive_s", -1, "must be 0..3600"),
    ("mtu", 1000, "must be 1280..9000"),
    ("listen_port", 51820, "unknown key"),
])
def test_vpn_bad_value_is_one_problem_naming_its_key(key: str, value: Any, says: str) -> None:
    ps = vpn_problems(vpn_table(**{key: value}))
    assert len(ps) == 1, ps
    assert f": vpn.{key}: " in ps[0] and says in ps[0], ps[0]


def test_vpn_endpoint_takes_a_bracketed_ipv6_address() -> None:
    assert parse_vpn(endpoint="[2001:db8::1]:51820").endpoint == "[2001:db8::1]:51820"


# --- the networkd files ---------------------------------------------------------------


def sections(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting of a networkd file, in order."""
    out, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.append((section, k, v))
    return out


def test_render_writes_the_peer_key_file_routes_and_addresses() -> None:
    files = netdev.render(parse_vpn(interface="wgc", mtu=1380, persistent_keepalive_s=10))
    assert sections(files[netdev.NETDEV]) == [
        ("NetDev", "Name", "wgc"), ("NetDev", "Kind", "wireguard"), ("NetDev", "MTUBytes", "1380"),
        ("NetDev", "Description", "VPN to the reading center (appliance [vpn])"),
        ("WireGuard", "PrivateKeyFile", "/data/vpn/wireguard.key"), ("WireGuard", "RouteTable", "main"),
        ("WireGuardPeer", "PublicKey", PEER), ("WireGuardPeer", "Endpoint", "vpn.example.org:51820"),
        ("WireGuardPeer", "AllowedIPs", "10.8.0.0/24"), ("WireGuardPeer", "AllowedIPs", "10.20.0.0/16"),
        ("WireGuardPeer", "PersistentKeepalive", "10")]
    assert sections(files[netdev.NETWORK]) == [
        ("Match", "Name", "wgc"), ("Link", "RequiredForOnline", "no"), ("Network", "Address", "10.8.0.2/24"),
        ("Network", "LinkLocalAddressing", "no"), ("Network", "IPv6AcceptRA", "no")]


def test_render_leaves_keepalive_out_when_it_is_off() -> None:
    text = netdev.render(parse_vpn(persistent_keepalive_s=0))[netdev.NETDEV]
    assert "PersistentKeepalive" not in text


def test_rendered_settings_are_all_known_to_systemd_networkd() -> None:
    """networkd's parser tables (gperf, `Section.Key` strings in its binary): a key it
    does not know would only be a warning in its log and a setting silently missing."""
    assert NETWORKD.is_file(), f"{NETWORKD} not found (Debian package systemd)"
    binary = NETWORKD.read_bytes()
    for name, text in netdev.render(parse_vpn()).items():
        for section, key, _ in sections(text):
            assert f"{section}.{key}\0".encode() in binary, f"{name}: {section}.{key}"


# --- the key ----------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temp dir every user may enter, as /data is (pytest's own are 0700, which
    systemd-networkd could not pass, and keys.ensure_key rightly refuses)."""
    d = Path(tempfile.mkdtemp(prefix="vpn-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def wg_pubkey(private: str) -> str:
    return subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()


def test_new_private_key_has_the_public_key_wg_derives() -> None:
    private = keys.new_private_key()
    assert keys.public_key(private) == wg_pubkey(private)


def test_ensure_key_makes_a_key_networkd_can_read_and_keeps_it(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (the key is given to the group systemd-network)")
    path = open_dir / "vpn" / "wireguard.key"
    pub, created = keys.ensure_key(path)
    assert created and pub == wg_pubkey(path.read_text())
    gid = grp.getgrnam("systemd-network").gr_gid
    for p, mode in ((path, 0o640), (path.parent, 0o750)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, mode), p
    assert keys.ensure_key(path) == (pub, False)


def test_ensure_key_refuses_a_key_networkd_cannot_reach(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (the key is given to the group systemd-network)")
    closed = open_dir / "keys"
    closed.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="systemd-networkd cannot enter .*keys .*0700"):
        keys.ensure_key(closed / "wireguard.key")


def test_read_private_key_refuses_what_is_not_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "wg.key"
    bad.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="is not a WireGuard private key"):
        keys.read_private_key(bad)


# --- the CLI: render and keys init ------------------------------------------------------


def site_config(tmp_path: Path, key_dir: Path, **vpn: Any) -> Path:
    cfg = base_config(tmp_path, free_port())
    cfg["vpn"] = vpn_table(private_key=str(key_dir / "wireguard.key"), **vpn)
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    return path


def test_vpn_render_writes_both_files_world_readable_and_prints_the_public_key(
        tmp_path: Path, open_dir: Path) -> None:
    out = tmp_path / "run" / "network"
    r = cli("vpn", "render", "--config", str(site_config(tmp_path, open_dir / "vpn", interface="wgt")),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(netdev.FILES)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert "Name=wgt" in (out / netdev.NETDEV).read_text()
    pub = wg_pubkey((open_dir / "vpn" / "wireguard.key").read_text())
    assert f"vpn public key: {pub}" in r.stdout


def test_vpn_render_without_vpn_removes_what_an_earlier_render_wrote(tmp_path: Path) -> None:
    out = tmp_path / "network"
    out.mkdir()
    for name in netdev.FILES:
        (out / name).write_text("old\n")
    (out / "10-other.network").write_text("not ours\n")
    main = tmp_path / "appliance.toml"
    main.write_text(to_toml(base_config(tmp_path, free_port())))
    r = cli("vpn", "render", "--config", str(main), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["10-other.network"]


def test_vpn_render_with_a_bad_vpn_table_is_a_config_error(tmp_path: Path) -> None:
    r = cli("vpn", "render", "--config", str(site_config(tmp_path, tmp_path, mtu=100)),
            "--out", str(tmp_path / "o"))
    assert r.returncode == EX_CONFIG
    assert "vpn.mtu: must be 1280..9000" in r.stderr
    assert not (tmp_path / "o").exists()


def vpn_module(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m appliance.vpn`: what appliance-vpn.service runs at boot."""
    return subprocess.run([sys.executable, "-m", "appliance.vpn", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_vpn_module_renders_as_the_cli_does(tmp_path: Path, open_dir: Path) -> None:
    main = site_config(tmp_path, open_dir / "vpn")
    r = vpn_module("render", "--config", str(main), "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert cli("vpn", "render", "--config", str(main), "--out", str(tmp_path / "b")).returncode == 0
    for name in netdev.FILES:
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert "vpn public key: " in r.stdout


def test_vpn_module_says_each_config_problem_and_exits_78(tmp_path: Path) -> None:
    r = vpn_module("render", "--config", str(site_config(tmp_path, tmp_path, mtu=1, endpoint="x")),
                   "--out", str(tmp_path / "o"))
    assert r.returncode == EX_CONFIG
    assert [line.split(": ")[2] for line in r.stderr.splitlines()] == ["vpn.endpoint", "vpn.mtu"]


def test_keys_init_makes_the_vpn_key_too(tmp_path: Path, open_dir: Path) -> None:
    r = cli("keys", "init", "--config", str(site_config(tmp_path, open_dir / "vpn")))
    assert r.returncode == 0, r.stderr
    key = open_dir / "vpn" / "wireguard.key"
    assert f"vpn key: {key} created" in r.stdout
    assert f"vpn public key: {wg_pubkey(key.read_text())}" in r.stdout


def test_keys_init_as_a_user_who_may_not_see_the_vpn_key_leaves_it_to_root(open_dir: Path) -> None:
    """As the image's appliance-keys.service (the appliance user): /data/vpn is networkd's
    (root:systemd-network 0750); keys init makes the other keys and says who makes that one."""
    if os.geteuid() != 0:
        pytest.fail("needs root (to run keys init as another user)")
    box, vpn_dir = open_dir / "box", open_dir / "vpn"
    box.mkdir()
    vpn_dir.mkdir(mode=0o750)
    nobody = pwd.getpwnam("nobody")
    os.chown(box, nobody.pw_uid, nobody.pw_gid)
    main = site_config(box, vpn_dir)
    r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                        sys.executable, "-m", "appliance", "keys", "init", "--config", str(main)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert f"vpn key: {vpn_dir / 'wireguard.key'} is not this user's to make or read;" in r.stdout
    assert (box / "keys" / "spool.key").exists()
    assert not list(vpn_dir.iterdir())


# --- the handshake age ------------------------------------------------------------------

NOW = 1_800_000_000.0
OTHER = base64.b64encode(bytes(32)).decode()


def test_handshake_view_is_up_within_reject_after_time() -> None:
    text = f"wg0\t{OTHER}\t{int(NOW) - 5}\nwg0\t{PEER}\t{int(NOW) - 42}\nwg1\t{PEER}\t{int(NOW)}\n"
    assert handshake.view(text, 3.0, "wg0", PEER, NOW) == {
        "interface": "wg0", "up": True, "handshake_age_s": 42, "reading": "ok"}


def test_handshake_view_is_down_after_reject_after_time() -> None:
    v = handshake.view(f"wg0\t{PEER}\t{int(NOW) - 181}\n", 3.0, "wg0", PEER, NOW)
    assert (v["up"], v["handshake_age_s"]) == (False, 181)


def test_handshake_view_is_down_with_no_age_before_the_first_handshake() -> None:
    v = handshake.view(f"wg0\t{PEER}\t0\n", 3.0, "wg0", PEER, NOW)
    assert (v["up"], v["handshake_age_s"], v["reading"]) == (False, None, "ok")


@pytest.mark.parametrize(("text", "file_age", "reading"), [
    (None, None, "missing"),
    (f"wg0\t{PEER}\t{int(NOW)}\n", handshake.STALE_AFTER_S + 1, "stale"),
    (f"wg0\t{OTHER}\t{int(NOW)}\n", 1.0, "no peer"),
    (f"wg9\t{PEER}\t{int(NOW)}\n", 1.0, "no interface"),
    ("", 1.0, "no interface"),
])
def test_handshake_view_claims_nothing_without_a_fresh_reading_of_the_peer(
        text: str | None, file_age: float | None, reading: str) -> None:
    v = handshake.view(text, file_age, "wg0", PEER, NOW)
    assert (v["up"], v["handshake_age_s"], v["reading"]) == (None, None, reading)


def test_handshake_timer_period_is_the_one_the_reader_assumes() -> None:
    timer = (UNITS / "appliance-vpn-handshake.timer").read_text()
    assert re.search(rf"^OnUnitActiveSec={handshake.WRITTEN_EVERY_S}s$", timer, re.M), timer


def unit_command(tmp: Path) -> str:
    """The handshake unit's ExecStart= shell command, writing into `tmp` instead of /run."""
    unit = (UNITS / "appliance-vpn-handshake.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    m = re.fullmatch(r"ExecStart=/bin/sh -c '(.*)'", line)
    assert m, line
    return m.group(1).replace("/run/appliance-vpn", str(tmp))


def test_handshake_reader_sees_a_real_wireguard_go_tunnel_come_up(tmp_path: Path) -> None:
    """Two wireguard-go ends in network namespaces; the image unit's own command (wg show
    all latest-handshakes, written by rename) before and after traffic crosses."""
    from tests.wan import Wan

    with Wan() as wan:
        center_addr = wan.vpn()
        site_if, center_if = wan.wg_ifaces[-2:]
        center_pub = wan.center.run("wg", "show", center_if, "public-key", check=True).stdout.strip()
        write = ["sh", "-c", unit_command(tmp_path)]
        subprocess.run(write, check=True, timeout=30)
        before = handshake.read(site_if, center_pub, time.time(), tmp_path / "latest-handshakes")
        assert (before["reading"], before["up"]) == ("ok", False), before
        with wan.site.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"into the tunnel", (center_addr, 9))  # a packet to send makes it shake hands

        def reading() -> dict[str, Any] | None:
            subprocess.run(write, check=True, timeout=30)
            v = handshake.read(site_if, center_pub, time.time(), tmp_path / "latest-handshakes")
            return v if v["up"] else None
        after = wait_for(reading, timeout=60, poll=0.5, what="a handshake in the reading")
        assert 0 <= after["handshake_age_s"] < 60, after
        assert stat.S_IMODE((tmp_path / "latest-handshakes").stat().st_mode) == 0o644
        assert [p.name for p in tmp_path.iterdir()] == ["latest-handshakes"]


# --- where the age is shown -------------------------------------------------------------


@pytest.mark.parametrize(("view", "line"), [
    ({"interface": "wg0", "up": True, "handshake_age_s": 42, "reading": "ok"},
     "vpn            wg0: UP, last handshake 42s ago"),
    ({"interface": "wg0", "up": False, "handshake_age_s": 600, "reading": "ok"},
     "vpn            wg0: DOWN, last handshake 10m ago"),
    ({"interface": "wg0", "up": False, "handshake_age_s": None, "reading": "ok"},
     "vpn            wg0: DOWN, no handshake yet"),
    ({"interface": "wg0", "up": None, "handshake_age_s": None, "reading": "stale"},
     "vpn            wg0: handshake unknown (the last reading is old: is appliance-vpn-handshake.timer"
     " running?)"),
])
def test_status_line_says_up_or_down_and_the_handshake_age(view: dict[str, Any], line: str) -> None:
    assert vpn_line(view) == line


def state_of(snap_extra: dict[str, Any]) -> dict[str, Any]:
    snap = {"name": "box", **snap_extra}
    return messages.state(snap, seq=1, now=NOW, boot_id="b", conn_seq=1, certs={}, time_synced=None,
                          outbox={})


def test_ops_state_carries_the_vpn_view_only_with_vpn() -> None:
    view = {"interface": "wg0", "up": True, "handshake_age_s": 42, "reading": "ok"}
    assert state_of({"vpn": view})["vpn"] == view
    assert "vpn" not in state_of({})


def test_ops_state_change_is_the_tunnel_going_down_not_its_age_ticking() -> None:
    up = {"interface": "wg0", "up": True, "handshake_age_s": 42, "reading": "ok"}
    older, down = {**up, "handshake_age_s": 99}, {**up, "up": False, "handshake_age_s": 200}
    c = messages.comparable
    assert c(state_of({"vpn": up})) == c(state_of({"vpn": older}))
    assert c(state_of({"vpn": up})) != c(state_of({"vpn": down}))


def test_running_daemon_reports_its_vpn_in_status(tmp_path: Path, open_dir: Path,
                                                  appliance_factory: Any) -> None:
    cfg = base_config(tmp_path, free_port())
    cfg["vpn"] = vpn_table(interface="wgnotthere", private_key=str(open_dir / "vpn" / "wg.key"))
    app = appliance_factory(cfg, root=tmp_path)
    r = cli("status", "--json", "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vpn"]["interface"] == "wgnotthere"
    r = cli("status", "--config", str(app.config_path))
    assert "vpn            wgnotthere: " in r.stdout
