"""Configuration: one frozen dataclass tree, parsed once.

Sources, in order: the main file (`--config PATH`; without it the imported site config
`/data/config/current/appliance.toml` when there is one, else `/etc/appliance/appliance.toml`)
then the drop-ins `conf.d/*.toml` beside it, in name order, and last the operations
center's remote drop-ins `remote.d/*.toml` (`remote_dir`: beside the `current` link for an
imported site config, so that a stick import never replaces them; ops/desired.py writes
them), so the center's keys win over the technician's. A drop-in overrides the keys it
names; tables merge key by key, arrays (such as `[[destinations]]`) are replaced whole,
so a drop-in never half-edits a list.

`parse` is pure: it takes the merged mapping and the map of which file set which key,
and returns a `Config` or raises `ConfigError` listing *every* problem, each as
`FILE: dotted.key: what is wrong`. Unknown keys are errors, because a typo that is
silently ignored is a setting the technician believes in and does not have. Relative
paths are resolved against the directory of the file that names them. `load` is the I/O
edge that reads the files.

Nothing here opens sockets or key files; checking that key files exist and are private
happens where they are used (and `appliance config check` does it too). Messages name
files, keys and the offending config value, never anything received from a modality.

`config/appliance.example.toml` documents every key of this tree for the field
technician; a test fails when a field here is missing there (or the other way round).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.config.base import (
    _HOST_RE,
    _MISSING,
    _NAME_RE,
    DEFAULT_CONFIG,
    DROPIN_DIR,
    ELIDED,
    NOT_A_KEY,
    REMOTE_DIR,
    SECRET,
    SITE_CONFIG_DIR,
    SITE_CONFIG_LINK,
    Check,
    _Bad,
    _check_hosts,
    _check_ip,
    _check_path_list,
    _Context,
    _file_of,
    _resolve,
    _Table,
    _tname,
    check_ae_title,
)
from appliance.core.config.box import (
    DURING_BURST,
    Appliance,
    Encryption,
    Health,
    Pack,
    Queue,
    Spool,
    _parse_appliance,
    _parse_encryption,
    _parse_health,
    _parse_pack,
    _parse_queue,
    _parse_spool,
)
from appliance.core.config.receive import (
    CSTORE_PRIORITIES,
    RULE_MATCH_KEYS,
    Caller,
    Receive,
    ReceiveTLS,
    Rule,
    _check_cstore_priorities,
    _check_names,
    _check_patterns,
    _check_receive,
    _parse_callers,
    _parse_receive,
    _parse_receive_tls,
    _parse_rules,
)
from appliance.core.errors import ConfigError

__all__ = ["Appliance", "Audit", "COMMON_DEST_KEYS", "CSTORE_PRIORITIES", "Caller", "Check",
    "Config", "DEFAULT_CONFIG", "DEST_MODES", "DROPIN_DIR", "DURING_BURST", "Destination",
    "ELIDED", "Encryption", "Health", "NOT_A_KEY", "OPS_NAME_RE", "Operations", "Pack", "Queue",
    "REMOTE_DIR", "RULE_MATCH_KEYS", "Receive", "ReceiveTLS", "Rule", "SECRET", "SITE_CONFIG_DIR",
    "SITE_CONFIG_LINK", "Spool", "TLSClient", "TRANSPORT_KEYS", "UNAVAILABLE_TRANSPORTS", "Update",
    "VPN_IFACE_RE", "Vpn", "check_ae_title", "check_source", "default_path", "dropin_files",
    "effective", "load", "parse", "read", "remote_dir", "remote_files", "set_by", "site_config",
    # the sections' helpers, as config.py had them (ingest/config.py reads with _Table)
    "_Bad", "_Context", "_HOST_RE", "_MISSING", "_NAME_RE", "_OPTIONAL_DEST", "_SHA256_FP_RE",
    "_Table", "_check_bind", "_check_cap_hours", "_check_cstore_priorities", "_check_endpoint",
    "_check_hosts", "_check_ip", "_check_names", "_check_networks", "_check_path_list",
    "_check_patterns", "_check_receive", "_check_routes", "_check_sources", "_check_syslog_host",
    "_check_url", "_check_vpn_routes", "_check_wg_key", "_common_dest_keys", "_dicom_keys",
    "_dicomweb_keys", "_file_of", "_merge", "_parse_appliance", "_parse_audit", "_parse_callers",
    "_parse_destination", "_parse_destinations", "_parse_encryption", "_parse_health",
    "_parse_operations", "_parse_pack", "_parse_queue", "_parse_receive", "_parse_receive_tls",
    "_parse_rules", "_parse_spool", "_parse_update", "_parse_vpn", "_read_toml", "_record",
    "_resolve", "_sftp_keys", "_tname", "_toml_files"]


@dataclass(frozen=True)
class TLSClient:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Destination:
    name: str
    transport: str  # dicom | dicomweb | sftp | directory
    # directory
    path: Path | None = None
    # dicom and sftp
    host: str | None = None
    port: int | None = None
    # dicom
    ae_title: str | None = None
    calling_ae_title: str | None = None
    tls: TLSClient | None = None
    plaintext: bool = False
    storage_commitment: bool = False
    commitment_port: int | None = None  # where the PACS sends its commitment report
    commitment_bind: str = "0.0.0.0"  # noqa: S104 - the PACS calls back
    commitment_timeout_s: float = 300.0
    timeout_s: float = 30.0
    link_timeout_s: float = 6.0  # dicom, sftp, dicomweb: a silent link is lost after this
    # sftp
    user: str | None = None
    key: Path | None = None
    key_passphrase: str | None = field(default=None, metadata=SECRET)
    known_hosts: Path | None = None
    host_key_sha256: str | None = None  # "SHA256:<base64>": the other way to pin the host key
    remote_dir: str | None = None
    # The reading center's Ed25519 public key (PEM): set, the appliance reads back the
    # center's signed receipts (forward.receipts) and trusts only those that verify with it.
    receipt_key: Path | None = None
    receipt_overdue_s: float = 1800.0  # uploaded this long without a receipt: overdue
    # dicomweb (also tls, plaintext, timeout_s)
    url: str | None = None  # the DICOMweb root: STOW-RS posts to {url}/studies
    token_file: Path | None = None  # a bearer token, read at each attempt
    max_request_mb: int = 64  # instances per STOW-RS request, up to this many MB
    # any transport
    max_kbit_s: float = 0.0  # bandwidth cap, all lanes together; 0 = none
    cap_hours: str | None = None  # "HH:MM-HH:MM" local time: cap only then; None = always
    # failover: one of the ordered chain (the first that is up takes the bundle);
    # copy: every bundle also goes here, on its own, whatever the chain does
    mode: str = "failover"


# [[destinations]] keys that apply to every transport, besides `name` and `transport`.
COMMON_DEST_KEYS = ("max_kbit_s", "cap_hours", "mode")
DEST_MODES = ("failover", "copy")


# The ops link's box name: the certificate CN, the MQTT client id and a topic level, so
# lowercase and never an MQTT wildcard (+ #) or level separator (/).
OPS_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


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


@dataclass(frozen=True)
class Config:
    appliance: Appliance = Appliance()
    receive: Receive = Receive()
    spool: Spool = Spool()
    pack: Pack = Pack()
    encryption: Encryption = Encryption()
    queue: Queue = Queue()
    health: Health = Health()
    audit: Audit = Audit()
    destinations: tuple[Destination, ...] = ()
    rules: tuple[Rule, ...] = ()
    operations: Operations | None = None  # no [operations] table: no ops link
    vpn: Vpn | None = None  # no [vpn] table: no tunnel (the site routes to the center)
    update: Update | None = None  # no [update] table: the `update` command is refused
    # Files read, in order, and which file set each dotted key (so that problems found
    # later, such as a missing key file, can name the file the technician must edit).
    sources: tuple[Path, ...] = field(default=(), metadata=NOT_A_KEY)
    origins: Mapping[str, Path] = field(default_factory=dict, compare=False, repr=False,
                                        metadata=NOT_A_KEY)

    @property
    def control_socket(self) -> Path:
        return self.appliance.state_dir / "run" / "control.sock"

    def file_of(self, key: str) -> Path:
        """The file that set dotted `key` (or its nearest table); else the main file."""
        return _file_of(self.origins, key, self.sources[0] if self.sources else DEFAULT_CONFIG)


# Which [[destinations]] keys apply to which transport, besides `name` and `transport`.
TRANSPORT_KEYS: dict[str, tuple[str, ...]] = {
    "directory": ("path",),
    "dicom": ("host", "port", "ae_title", "calling_ae_title", "tls", "plaintext",
              "storage_commitment", "commitment_port", "commitment_bind", "commitment_timeout_s",
              "timeout_s", "link_timeout_s"),
    "sftp": ("host", "port", "user", "key", "key_passphrase", "known_hosts", "host_key_sha256",
             "remote_dir", "timeout_s", "link_timeout_s", "receipt_key", "receipt_overdue_s"),
    "dicomweb": ("url", "tls", "token_file", "plaintext", "timeout_s", "link_timeout_s",
                 "max_request_mb"),
}

# Transports whose keys are parsed (above) but that this version cannot send with yet,
# and what `config check` and `run` say at once when a destination names one, rather
# than first asking for every key of it. (None today.)
UNAVAILABLE_TRANSPORTS: dict[str, str] = {}


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
    )
    t.finish()
    return o


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


def _dicom_keys(t: _Table) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "host": t.string("host", max_len=253),
        "port": t.integer("port", 104, 1, 65535),
        "ae_title": t.ae("ae_title"),
        "calling_ae_title": t.ae("calling_ae_title", None),
        "plaintext": t.boolean("plaintext", False),
        "storage_commitment": t.boolean("storage_commitment", False),
        "commitment_port": t.integer("commitment_port", None, 1, 65535),
        "commitment_bind": t.get("commitment_bind", "0.0.0.0", _check_ip),  # noqa: S104
        "commitment_timeout_s": t.number("commitment_timeout_s", 300.0, 1, 86400),
        "timeout_s": t.number("timeout_s", 30.0, 1, 3600),
        "link_timeout_s": t.number("link_timeout_s", 6.0, 2, 600),
    }
    if t.has("tls"):
        tt = t.table("tls")
        if tt.valid:
            kw["tls"] = TLSClient(cert=tt.path("cert"), key=tt.path("key"), ca=tt.path("ca"))
            tt.finish()
        if kw["plaintext"]:
            t.ctx.problem(t.key("plaintext"), "is true but tls is also set: choose one")
    elif not kw["plaintext"]:
        # Never send patient data in the clear by omission: plaintext must be explicit.
        t.ctx.problem(t.key("tls"), "is required; or set plaintext = true to send "
                      "unencrypted DICOM (only on a VPN or closed network)")
    return kw


def _sftp_keys(t: _Table) -> dict[str, Any]:
    kw = {
        "host": t.string("host", max_len=253),
        "port": t.integer("port", 22, 1, 65535),
        "user": t.string("user", max_len=64),
        "key": t.path("key"),
        "key_passphrase": t.string("key_passphrase", None),
        "known_hosts": t.path("known_hosts", None),
        "host_key_sha256": t.string("host_key_sha256", None, max_len=100, pattern=_SHA256_FP_RE,
                                    hint="must be SHA256: and 43 base64 characters, as"
                                         " `ssh-keygen -lf` prints it"),
        "remote_dir": t.string("remote_dir", "."),
        "timeout_s": t.number("timeout_s", 30.0, 1, 3600),
        "link_timeout_s": t.number("link_timeout_s", 6.0, 2, 600),
        "receipt_key": t.path("receipt_key", None),
        "receipt_overdue_s": t.number("receipt_overdue_s", 1800.0, 1, 30 * 86400),
    }
    if t.has("receipt_overdue_s") and not t.has("receipt_key"):
        t.ctx.problem(t.key("receipt_overdue_s"), "is set but receipt_key is not: without the"
                      " center's key no receipt is read back")
    # Exactly one host-key pin: without it the appliance cannot tell the reading center
    # from a machine in the middle; with two, which one counts would be a guess.
    pins = [k for k in ("known_hosts", "host_key_sha256") if t.has(k)]
    if not pins:
        t.ctx.problem(t.key("known_hosts"), "or host_key_sha256 is required (the server's host key)")
        kw["known_hosts"] = None
    elif len(pins) == 2:
        t.ctx.problem(t.key("host_key_sha256"), "and known_hosts are both set: choose one")
    return kw


def _dicomweb_keys(t: _Table) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "url": t.get("url", None, _check_url),
        "token_file": t.path("token_file", None),
        "plaintext": t.boolean("plaintext", False),
        "timeout_s": t.number("timeout_s", 30.0, 1, 3600),
        "link_timeout_s": t.number("link_timeout_s", 6.0, 2, 600),
        "max_request_mb": t.integer("max_request_mb", 64, 1, 4096),
    }
    if not t.has("url"):
        t.ctx.problem(t.key("url"), "is required (the DICOMweb root, like https://pacs.example/dicom-web)")
    if t.has("tls"):
        tt = t.table("tls")
        if tt.valid:
            kw["tls"] = TLSClient(cert=tt.path("cert"), key=tt.path("key"), ca=tt.path("ca"))
            tt.finish()
    url = kw["url"]
    if url is None:
        return kw
    if url.startswith("http:") and not kw["plaintext"]:
        # Never send patient data in the clear by omission: plaintext must be explicit.
        t.ctx.problem(t.key("url"), "is http://: use https://, or set plaintext = true to send "
                      "unencrypted DICOM (only on a VPN or closed network)")
    elif url.startswith("https:") and kw["plaintext"]:
        t.ctx.problem(t.key("plaintext"), "is true but url is https://: choose one")
    elif url.startswith("http:") and t.has("tls"):
        t.ctx.problem(t.key("tls"), "does not apply to an http:// url")
    elif url.startswith("https:") and not t.has("tls") and kw["token_file"] is None:
        t.ctx.problem(t.key("tls"), "or token_file is required: how the server knows this "
                      "appliance (a client certificate, or a bearer token)")
    return kw


def _check_url(key: str, v: Any) -> str:
    """An http(s) URL without credentials, query or fragment; no trailing slash."""
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    if len(v) > 2048 or any(not (0x21 <= ord(c) < 0x7F) for c in v):
        raise _Bad("must be an URL of at most 2048 printable ASCII characters, without spaces")
    u = urllib.parse.urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise _Bad("must be an http:// or https:// URL with a host (like https://pacs.example/dicom-web)")
    if u.username is not None or u.password is not None:
        raise _Bad("must not hold a user name or password (use tls or token_file)")
    if u.query or u.fragment:
        raise _Bad("must not have a query (?...) or fragment (#...)")
    try:
        u.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise _Bad("has an invalid port") from None
    return (u.scheme + v[len(u.scheme):]).rstrip("/")


_SHA256_FP_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
# Keys that may be None in a valid Destination (sftp: the host-key pin not chosen).
_OPTIONAL_DEST = ("calling_ae_title", "key_passphrase", "tls", "commitment_port", "cap_hours",
                  "known_hosts", "host_key_sha256", "token_file", "receipt_key")


def _check_cap_hours(key: str, v: Any) -> str:
    from appliance.forward.bandwidth import parse_hours  # noqa: PLC0415 - config is imported first

    if not isinstance(v, str):
        raise _Bad(f"must be a string like \"07:00-19:00\", not {_tname(v)}")
    try:
        parse_hours(v)
    except ValueError as e:
        raise _Bad(str(e)) from None
    return v


def _common_dest_keys(t: _Table) -> dict[str, Any]:
    d = Destination(name="", transport="")
    kw = {"max_kbit_s": t.number("max_kbit_s", d.max_kbit_s, 0, 100_000_000),
          "cap_hours": t.get("cap_hours", None, _check_cap_hours),
          "mode": t.choice("mode", d.mode, DEST_MODES)}
    if kw["cap_hours"] is not None and not kw["max_kbit_s"]:
        t.ctx.problem(t.key("cap_hours"), "is set but max_kbit_s is not: there is no cap to apply")
    return kw


def _parse_destination(t: _Table) -> Destination | None:
    name = t.string("name", max_len=63, pattern=_NAME_RE,
                    hint="must be 1..63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    transport = t.choice("transport", None, tuple(TRANSPORT_KEYS))
    if transport is None:
        if not t.has("transport"):
            t.ctx.problem(t.key("transport"), "is required (dicom, sftp or directory)")
        t.ignore_rest()  # which keys belong here depends on the transport
        return None
    if transport in UNAVAILABLE_TRANSPORTS:
        t.ctx.problem(t.key("transport"), UNAVAILABLE_TRANSPORTS[transport])
        t.ignore_rest()
        return None
    kw: dict[str, Any]
    if transport == "directory":
        kw = {"path": t.path("path")}
    elif transport == "dicom":
        kw = _dicom_keys(t)
    elif transport == "dicomweb":
        kw = _dicomweb_keys(t)
    else:
        kw = _sftp_keys(t)
    kw.update(_common_dest_keys(t))
    for k in t.data:
        if k not in t.used and any(k in keys for keys in TRANSPORT_KEYS.values()):
            t.used.add(k)
            t.ctx.problem(t.key(k), f"does not apply to transport {transport!r}")
    t.finish()
    if name is None or any(v is None for k, v in kw.items() if k not in _OPTIONAL_DEST):
        return None
    return Destination(name=name, transport=transport, **kw)


def _parse_destinations(top: _Table) -> tuple[Destination, ...]:
    dests: list[Destination] = []
    names: dict[str, str] = {}
    for dt in top.tables("destinations"):
        dest = _parse_destination(dt)
        name = dt.data.get("name")
        if isinstance(name, str) and name:
            if name in names:
                dt.ctx.problem(dt.key("name"), f"duplicate of {names[name]} ({name!r})")
            names.setdefault(name, dt.key("name"))
        if dest is not None:
            dests.append(dest)
    return tuple(dests)


def _check_routes(cfg: Config, ctx: _Context) -> None:
    """Copy destinations need a failover one beside them; a rule names known destinations
    and at least one failover destination (else its studies would have nowhere to go)."""
    modes = {d.name: d.mode for d in cfg.destinations}
    if modes and "failover" not in modes.values():
        ctx.problem("destinations", 'every entry is mode = "copy": at least one must be'
                    ' mode = "failover" (the chain every bundle goes through)')
    for i, r in enumerate(cfg.rules):
        unknown = [n for n in r.destinations if n not in modes]
        if unknown:
            ctx.problem(f"rules[{i}].destinations", f"names no [[destinations]] entry: "
                        f"{', '.join(repr(n) for n in unknown)} (known: {', '.join(modes) or 'none'})")
        elif r.destinations and all(modes[n] == "copy" for n in r.destinations):
            ctx.problem(f"rules[{i}].destinations", 'names only mode = "copy" destinations: add'
                        ' at least one failover destination')


def parse(data: Mapping[str, Any], origins: Mapping[str, Path], main_file: Path,
          sources: tuple[Path, ...] = ()) -> Config:
    """Turn merged TOML data into a Config, or raise ConfigError listing every problem.

    `origins` maps dotted keys (`receive.port`, `destinations[0]`) to the file that set
    them; relative paths resolve against that file's directory and problems name it.
    Keys without an origin belong to `main_file`.
    """
    ctx = _Context(origins, main_file)
    top = _Table(dict(data), "", ctx)
    cfg = Config(
        appliance=_parse_appliance(top.table("appliance")),
        receive=_parse_receive(top.table("receive")),
        spool=_parse_spool(top.table("spool")),
        pack=_parse_pack(top.table("pack")),
        encryption=_parse_encryption(top.table("encryption")),
        queue=_parse_queue(top.table("queue")),
        health=_parse_health(top.table("health")),
        audit=_parse_audit(top.table("audit")),
        destinations=_parse_destinations(top),
        rules=_parse_rules(top),
        operations=_parse_operations(top),
        vpn=_parse_vpn(top),
        update=_parse_update(top),
        sources=sources or (main_file,),
        origins=dict(origins),
    )
    top.finish()
    _check_routes(cfg, ctx)
    for i, d in enumerate(cfg.destinations):
        if 0 < d.max_kbit_s < cfg.queue.min_rate_kbit_s:
            ctx.problem(f"destinations[{i}].max_kbit_s", f"is below queue.min_rate_kbit_s "
                        f"({cfg.queue.min_rate_kbit_s:g}): every attempt would run out of time")
    if cfg.operations is not None and not OPS_NAME_RE.match(cfg.appliance.name):
        ctx.problem("appliance.name", f"{cfg.appliance.name!r} cannot name this box to the operations"
                    " center ([operations]): use 1..63 lowercase letters, digits, '.', '_' or '-',"
                    " starting with a letter or digit")
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return cfg



def _merge(base: dict[str, Any], over: Mapping[str, Any], origins: dict[str, Path],
           src: Path, prefix: str = "") -> None:
    for k, v in over.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, origins, src, key)
        else:
            # Drop what the replaced value recorded, then record the new one.
            for o in [o for o in origins if o == key or o.startswith((key + ".", key + "["))]:
                del origins[o]
            base[k] = v
            _record(v, key, origins, src)


def _record(v: Any, key: str, origins: dict[str, Path], src: Path) -> None:
    origins[key] = src
    if isinstance(v, dict):
        for k, sub in v.items():
            _record(sub, f"{key}.{k}", origins, src)
    elif isinstance(v, list):
        for i, sub in enumerate(v):
            _record(sub, f"{key}[{i}]", origins, src)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a file"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read: {e.strerror}"]) from None


def _toml_files(d: Path) -> list[Path]:
    """`d/*.toml` by name. Hidden files (`.name.toml`, as editors and package managers
    leave behind) are not read, so a half-written copy never becomes configuration."""
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("*.toml") if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def dropin_files(main: Path) -> list[Path]:
    """The technician's drop-ins of `main`, in the order they apply: `conf.d/*.toml` by name."""
    return _toml_files(main.parent / DROPIN_DIR)


def remote_dir(main: Path) -> Path:
    """Where the operations center's drop-ins of `main` live (ops/desired.py writes there).

    Fixed by the config's location, so that every reader finds the same folder without a
    setting (the daemon, `config check` in a technician's shell, the import, the records
    read before the config is): `remote.d` beside the main file; for an imported site
    config (`.../current/appliance.toml`, `current` the import's link) beside the link,
    i.e. `/data/config/remote.d`, because an import replaces the whole set `current`
    points to and must not drop the center's keys with it."""
    folder = main.absolute().parent
    if folder.name == SITE_CONFIG_LINK and folder.is_symlink():
        return folder.parent / REMOTE_DIR
    return folder / REMOTE_DIR


def remote_files(main: Path, remote: Path | None = None) -> list[Path]:
    """The operations center's drop-ins, in the order they apply (after `dropin_files`)."""
    return _toml_files(remote_dir(main) if remote is None else remote)


def read(path: Path, instead: Mapping[Path, dict[str, Any] | None] | None = None,
         remote: Path | None = None) -> tuple[dict[str, Any], dict[str, Path], Path, tuple[Path, ...]]:
    """The merged data of a config file, its conf.d drop-ins and then its remote drop-ins,
    which file set each key, the main file and every file read (any kind of config: the
    appliance's, a center's).

    `instead` maps a drop-in's path to the data to use for it (None: left out), whether
    the file exists or not: a candidate drop-in is checked as if it were in place
    (ops/desired.py) without being written first. `remote` names the remote folder
    instead of `remote_dir(path)` (the import checks a staged set with the one in force)."""
    main = path.absolute()
    rdir = remote_dir(main) if remote is None else remote.absolute()
    instead = dict(instead or {})
    added = [p for p, d in instead.items() if d is not None]
    local = {*dropin_files(main), *(p for p in added if p.parent != rdir)}
    far = {*remote_files(main, rdir), *(p for p in added if p.parent == rdir)}
    ordered = [*sorted(local, key=lambda p: p.name), *sorted(far, key=lambda p: p.name)]
    files = [main, *(f for f in ordered if f not in instead or instead[f] is not None)]
    data: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    problems: list[str] = []
    for f in files:
        try:
            got = instead.get(f)
            _merge(data, got if got is not None else _read_toml(f), origins, f)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return data, origins, main, tuple(files)


def set_by(cfg: Config) -> dict[Path, list[str]]:
    """For every file but the main one: the keys it set, in the order read; a table as its
    keys (`queue.min_rate_kbit_s`), a list whole (`destinations`: a drop-in replaces a
    list whole). What `config check` shows, so that a technician sees which drop-in
    (theirs, the center's) won."""
    main = cfg.sources[0] if cfg.sources else DEFAULT_CONFIG
    out: dict[Path, list[str]] = {f: [] for f in cfg.sources if f != main}
    for key, f in cfg.origins.items():
        shown = key.split("[", 1)[0]
        if f in out and shown not in out[f]:
            out[f].append(shown)
    for f, keys in out.items():  # a table's own entry goes when its keys are there
        out[f] = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    return out


def site_config() -> Path:
    return SITE_CONFIG_DIR / SITE_CONFIG_LINK / "appliance.toml"


def default_path() -> Path:
    """The config read when no --config is given: the imported site config when there
    is one, else DEFAULT_CONFIG."""
    site = site_config()
    return site if site.is_file() else DEFAULT_CONFIG


def load(path: Path | None = None, remote: Path | None = None) -> Config:
    """Read the main file, its conf.d drop-ins and its remote drop-ins and parse them."""
    return parse(*read(path or default_path(), remote=remote))


def effective(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, with secrets elided (for `config check`).

    A destination shows only the keys of its own transport, so that the printout is
    what the technician can set for it (a directory has no timeout, a dicom link no
    remote_dir). Unset optional values (None) are left out.
    """
    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            names = [f.name for f in dataclasses.fields(obj) if not f.metadata.get("not_a_key")]
            if isinstance(obj, Destination):
                names = ["name", "transport", *TRANSPORT_KEYS.get(obj.transport, ()),
                         *COMMON_DEST_KEYS]
            secret = {f.name for f in dataclasses.fields(obj) if f.metadata.get("secret")}
            out = {}
            for name in names:
                v = getattr(obj, name)
                if v is None:
                    continue
                out[name] = ELIDED if name in secret else conv(v)
            return out
        if isinstance(obj, tuple | list):
            return [conv(v) for v in obj]
        if isinstance(obj, Path):
            return str(obj)
        return obj
    return {"sources": [str(s) for s in cfg.sources], **conv(cfg)}
