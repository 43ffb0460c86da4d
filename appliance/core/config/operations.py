"""The links beyond the box: [operations] (the ops link to the center's MQTT broker),
[vpn] (the WireGuard tunnel), [update] (where update bundles may be fetched from) and
[audit] (the local trail and the hospital's syslog repository); [operations.diagnostics]
(where the `diagnostics` command may upload its document by SFTP).

[operations], [vpn] and [update] are optional: absent, the value is None and the feature
is off. Problems are recorded against their keys, not raised.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.config.base import _HOST_RE, Check, _Bad, _check_path_list, _Table, _tname
from appliance.core.config.destinations import _SHA256_FP_RE

# The ops link's box name: the certificate CN, the MQTT client id and a topic level, so
# lowercase and never an MQTT wildcard (+ #) or level separator (/).
OPS_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class DiagnosticsPlace:
    """[operations.diagnostics]: an SFTP folder at the center where the `diagnostics`
    command uploads its document when asked `{"to": "sftp"}` (ops/diagdrop.py). The host
    key is pinned as for an sftp destination: known_hosts or host_key_sha256, one of them."""
    sftp_host: str
    user: str
    key: Path  # this box's SSH private key (OpenSSH format, unencrypted, 0600)
    sftp_port: int = 22
    known_hosts: Path | None = None
    host_key_sha256: str | None = None  # "SHA256:<base64>" as `ssh-keygen -lf` prints it
    dir: str = "."  # the folder on the server; files are named <box>-<cmd_id>.json
    timeout_s: float = 30.0  # the whole upload (and each wait in it) within this
    link_timeout_s: float = 6.0  # a silent link (TCP connect, nothing acknowledged) is lost after this


@dataclass(frozen=True)
class Operations:
    """[operations]: the ops link to the operations center's MQTT broker (appliance/ops/)."""
    host: str
    ca: Path
    cert: Path
    key: Path
    port: int = 8883
    heartbeat_s: float = 15.0  # `state` at least this often (and on change, at most every 2 s)
    keepalive_s: int = 30  # MQTT keepalive: the broker publishes the will after 1.5 x this
    command_keys: tuple[Path, ...] = ()  # Ed25519 public keys of the operations center
    metrics_bind: str = "127.0.0.1:9110"  # empty = no metrics endpoint
    config_deadline_s: float = 120.0  # a remote config is kept only if healthy within this
    diagnostics: DiagnosticsPlace | None = None  # None: diagnostics go over MQTT only


@dataclass(frozen=True)
class Audit:
    max_mb: int = 32  # STATE/audit/audit.log is rotated past this size
    files: int = 8  # audit.log and the rotated ones kept (the oldest beyond are removed)
    # The hospital's audit record repository (syslog over TLS, RFC 5425; audit/repository.py)
    syslog_host: str = ""  # empty = the trail stays on the box
    syslog_port: int = 6514
    syslog_ca: Path | None = None  # the CA that signed the repository's certificate (required with a host)
    syslog_cert: Path | None = None  # this box's client certificate, if the repository asks for one
    syslog_key: Path | None = None  # its private key (with syslog_cert)


# WireGuard interface names: the kernel's limit (IFNAMSIZ 16 with the NUL), and nothing
# a unit file or a path would read differently.
VPN_IFACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")


@dataclass(frozen=True)
class Vpn:
    """[vpn]: a WireGuard tunnel to the center, set up by systemd-networkd from the files
    `appliance vpn render` writes (appliance/vpn/, docs/vpn.md)."""
    addresses: tuple[str, ...]  # this box's address(es) inside the tunnel, with prefix
    peer_public_key: str  # the center's WireGuard public key (base64 of 32 bytes)
    endpoint: str  # the center's WireGuard server, HOST:PORT
    allowed_ips: tuple[str, ...]  # networks reached through the tunnel
    interface: str = "wg0"
    private_key: Path = Path("/data/vpn/wireguard.key")  # made by `appliance keys init`
    persistent_keepalive_s: int = 25  # 0 = off
    mtu: int = 1420


@dataclass(frozen=True)
class Update:
    """[update]: where the operations center's `update` command may fetch a bundle from
    (appliance/update/fetch.py, docs/updates.md)."""
    sources: tuple[str, ...]  # URL prefixes: https://HOST[:PORT]/PATH/ or sftp://USER@HOST[:PORT]/PATH/
    download_dir: Path | None = None  # None: <state_dir>/update
    max_mb: int = 2048  # a bundle larger than this is not fetched
    deadline_s: float = 3600.0  # the whole fetch, resumed across cuts, within this
    ca: Path | None = None  # HTTPS: None = [operations] ca, else the system's trust store
    ssh_key: Path | None = None  # SFTP: this box's private key (required with an sftp:// source)
    known_hosts: Path | None = None  # SFTP: the server's host key (required with an sftp:// source)


def _check_bind(key: str, v: Any) -> str:
    """metrics_bind: "" (off) or HOST:PORT with an IP address and a port."""
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    if not v:
        return v
    host, sep, port = v.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise _Bad(f"{v!r} is not IP:PORT (e.g. 127.0.0.1:9110), nor empty (off)")
    return v


def _parse_operations(top: _Table) -> Operations | None:
    if not top.has("operations"):
        return None
    t = top.table("operations")
    if not t.valid:
        return None
    o = Operations(
        host=t.string("host", max_len=253),
        port=t.integer("port", 8883, 1, 65535),
        ca=t.path("ca"), cert=t.path("cert"), key=t.path("key"),
        heartbeat_s=t.number("heartbeat_s", 15.0, 1, 3600),
        keepalive_s=t.integer("keepalive_s", 30, 5, 3600),
        command_keys=t.get("command_keys", (), _check_path_list(t.ctx)),
        metrics_bind=t.get("metrics_bind", "127.0.0.1:9110", _check_bind),
        config_deadline_s=t.number("config_deadline_s", 120.0, 10, 3600),
        diagnostics=_parse_diagnostics_place(t) if t.has("diagnostics") else None,
    )
    t.finish()
    return o


def _parse_diagnostics_place(ops: _Table) -> DiagnosticsPlace | None:
    t = ops.table("diagnostics")
    if not t.valid:
        return None
    d = DiagnosticsPlace("", "", Path())
    p = DiagnosticsPlace(
        sftp_host=t.string("sftp_host", max_len=253, pattern=_HOST_RE,
                           hint="must be a DNS name or an IP address"),
        sftp_port=t.integer("sftp_port", d.sftp_port, 1, 65535),
        user=t.string("user", max_len=64),
        key=t.path("key"),
        known_hosts=t.path("known_hosts", None),
        host_key_sha256=t.string("host_key_sha256", None, max_len=100, pattern=_SHA256_FP_RE,
                                 hint="must be SHA256: and 43 base64 characters, as"
                                      " `ssh-keygen -lf` prints it"),
        dir=t.string("dir", d.dir, max_len=1024),
        timeout_s=t.number("timeout_s", d.timeout_s, 5, 600),
        link_timeout_s=t.number("link_timeout_s", d.link_timeout_s, 2, 600),
    )
    # Exactly one host-key pin, as for an sftp destination (destinations._sftp_keys).
    pins = [k for k in ("known_hosts", "host_key_sha256") if t.has(k)]
    if not pins:
        t.ctx.problem(t.key("known_hosts"), "or host_key_sha256 is required (the server's host key)")
    elif len(pins) == 2:
        t.ctx.problem(t.key("host_key_sha256"), "and known_hosts are both set: choose one")
    t.finish()
    return p


def _check_networks(interfaces: bool) -> Check:
    """An array of IP networks (allowed_ips) or of addresses with a prefix (addresses)."""
    def check(key: str, v: Any) -> tuple[str, ...]:
        what = "addresses with a prefix (like 10.8.0.2/24)" if interfaces else \
            "IP networks (like 10.8.0.0/24)"
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
            raise _Bad(f"must be a non-empty array of {what}")
        out = []
        for x in v:
            try:
                out.append(str(ipaddress.ip_interface(x) if interfaces
                               else ipaddress.ip_network(x, strict=False)))
            except ValueError:
                raise _Bad(f"{x!r} is not one of {what}") from None
            if interfaces and "/" not in x:
                raise _Bad(f"{x!r} has no prefix: write it as {x}/24 or the tunnel's own")
        return tuple(out)
    return check


def _check_wg_key(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _Bad("is not a WireGuard public key (44 characters of base64, as `wg pubkey` prints)")
    return v


def _check_endpoint(key: str, v: Any) -> str:
    """HOST:PORT, HOST a DNS name or an IPv4 address, or [IPv6]:PORT."""
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    host, sep, port = v.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ok = bool(sep) and 1 <= int(port) <= 65535
        if bare != host:
            ipaddress.IPv6Address(bare)
    except ValueError:
        ok = False
    unbracketed_v6 = ":" in host and bare == host
    if not ok or unbracketed_v6 or not _HOST_RE.match(bare):
        raise _Bad(f"{v!r} is not HOST:PORT (e.g. vpn.example.org:51820, [2001:db8::1]:51820)")
    return v


def _parse_vpn(top: _Table) -> Vpn | None:
    if not top.has("vpn"):
        return None
    t = top.table("vpn")
    if not t.valid:
        return None
    d = Vpn((), "", "", ())
    v = Vpn(
        interface=t.string("interface", d.interface, max_len=15, pattern=VPN_IFACE_RE,
                           hint="must be 1..15 letters, digits, '_' or '-', starting with a letter"),
        addresses=t.get("addresses", None, _check_networks(True)),
        private_key=t.path("private_key", d.private_key),
        peer_public_key=t.get("peer_public_key", None, _check_wg_key),
        endpoint=t.get("endpoint", None, _check_endpoint),
        allowed_ips=t.get("allowed_ips", None, _check_networks(False)),
        persistent_keepalive_s=t.integer("persistent_keepalive_s", d.persistent_keepalive_s, 0, 3600),
        mtu=t.integer("mtu", d.mtu, 1280, 9000),
    )
    for name in ("addresses", "peer_public_key", "endpoint", "allowed_ips"):
        if not t.has(name):
            t.ctx.problem(t.key(name), "is required")
    t.finish()
    if v.allowed_ips and v.endpoint:
        _check_vpn_routes(t, v)
    return v


def _check_vpn_routes(t: _Table, v: Vpn) -> None:
    """The tunnel's routes must not capture the tunnel's own packets to its endpoint."""
    nets = [ipaddress.ip_network(n) for n in v.allowed_ips]
    if any(n.prefixlen == 0 for n in nets):
        t.ctx.problem(t.key("allowed_ips"), "must not hold a default route (0.0.0.0/0, ::/0): name"
                      " the center's networks (the tunnel's own packets must not enter it)")
        return
    try:
        ip = ipaddress.ip_address(v.endpoint.rpartition(":")[0].strip("[]"))
    except ValueError:
        return  # a DNS name: resolved by networkd, not known here
    if any(ip in n for n in nets):
        t.ctx.problem(t.key("endpoint"), f"{ip} is inside allowed_ips: the tunnel's own packets"
                      " would be routed into it")


def check_source(key: str, v: Any) -> str:
    """An update source: https://HOST[:PORT]/PATH/ or sftp://USER@HOST[:PORT]/PATH/, a
    prefix ending in '/', without password, query, fragment or '..'."""
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    hint = "like https://10.8.0.1/updates/ or sftp://updates@10.8.0.1/updates/"
    if len(v) > 1024 or any(not (0x21 <= ord(c) < 0x7F) for c in v):
        raise _Bad(f"{v[:40]!r}... is not a URL of printable ASCII without spaces ({hint})")
    u = urllib.parse.urlsplit(v)
    try:
        u.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise _Bad(f"{v!r} has an invalid port") from None
    if u.scheme not in ("https", "sftp") or not u.hostname or not _HOST_RE.match(u.hostname):
        raise _Bad(f"{v!r} is not an https:// or sftp:// URL with a host ({hint})")
    if (u.scheme == "sftp") != (u.username is not None) or u.password is not None:
        raise _Bad(f"{v!r}: an sftp:// source names its user (sftp://USER@HOST/...), an https://"
                   " one none, and neither a password")
    if u.query or u.fragment or not u.path.endswith("/") or "/../" in u.path + "/":
        raise _Bad(f"{v!r} must be a folder ending in '/', without '..', query or fragment ({hint})")
    return v


def _check_sources(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or len(v) > 32:
        raise _Bad("must be an array of 1..32 URL prefixes (https:// or sftp://)")
    return tuple(check_source(key, x) for x in v)


def _parse_update(top: _Table) -> Update | None:
    if not top.has("update"):
        return None
    t = top.table("update")
    if not t.valid:
        return None
    d = Update(())
    u = Update(
        sources=t.get("sources", (), _check_sources),
        download_dir=t.path("download_dir", None),
        max_mb=t.integer("max_mb", d.max_mb, 16, 16384),
        deadline_s=t.number("deadline_s", d.deadline_s, 60, 86400),
        ca=t.path("ca", None), ssh_key=t.path("ssh_key", None), known_hosts=t.path("known_hosts", None),
    )
    if not t.has("sources"):
        t.ctx.problem(t.key("sources"), "is required (where update bundles may be fetched from)")
    if any(s.startswith("sftp:") for s in u.sources):
        for k in ("ssh_key", "known_hosts"):
            if not t.has(k):
                t.ctx.problem(t.key(k), "is required with an sftp:// source")
    t.finish()
    return u


def _parse_audit(t: _Table) -> Audit:
    d = Audit()
    host = t.get("syslog_host", d.syslog_host, _check_syslog_host)
    a = Audit(max_mb=t.integer("max_mb", d.max_mb, 1, 4096), files=t.integer("files", d.files, 2, 1000),
              syslog_host=host, syslog_port=t.integer("syslog_port", d.syslog_port, 1, 65535),
              syslog_ca=t.path("syslog_ca", None), syslog_cert=t.path("syslog_cert", None),
              syslog_key=t.path("syslog_key", None))
    if host and a.syslog_ca is None:
        t.ctx.problem(t.key("syslog_ca"), "is required with syslog_host (the CA that signed the"
                      " audit repository's certificate)")
    if (a.syslog_cert is None) != (a.syslog_key is None):
        t.ctx.problem(t.key("syslog_cert" if a.syslog_cert is None else "syslog_key"),
                      "syslog_cert and syslog_key go together (the client certificate and its key)")
    t.finish()
    return a


def _check_syslog_host(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    if v and not _HOST_RE.match(v):
        raise _Bad("must be a DNS name or an IP address (empty: no audit repository)")
    return v
