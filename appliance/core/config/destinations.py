"""[[destinations]]: the `Destination` dataclass, which keys apply to which transport
(`TRANSPORT_KEYS`, which `effective` and forward/registry.py follow) and the parser of
each transport's keys.

A key of another transport is reported as not applying to this one; sending in the clear
is never chosen by omission (plaintext must be set). Problems are recorded, not raised;
a destination with a problem is left out of the tree, which `parse` then refuses.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.config.base import _NAME_RE, SECRET, _Bad, _check_ip, _Table, _tname


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
