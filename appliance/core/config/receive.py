"""The receiving side: [receive] (the SCP, the callers allowlist, [receive.tls]) and
[[rules]] (which studies are stat and where they go; receive/rules.py applies them).

Problems are recorded against their keys, not raised. Whether a rule's destinations name
[[destinations]] entries is checked with the whole tree (`tree._check_routes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.config.base import _NAME_RE, _Bad, _check_hosts, _check_ip, _Table


@dataclass(frozen=True)
class Caller:
    ae_title: str
    hosts: tuple[str, ...] = ()  # IP addresses or networks; empty = any source address


@dataclass(frozen=True)
class ReceiveTLS:
    port: int
    cert: Path
    key: Path
    ca: Path
    bind: str | None = None  # defaults to receive.bind
    require_client_cert: bool = True


@dataclass(frozen=True)
class Receive:
    ae_title: str = "EDGE"
    bind: str = "0.0.0.0"  # noqa: S104 - scanners reach the box over the LAN by design
    port: int = 104
    plain: bool = True
    accept_any_caller: bool = False
    callers: tuple[Caller, ...] = ()
    max_associations: int = 8
    max_connections: int = 32  # TCP connections at once, handshaking or associated
    max_connections_per_host: int = 8
    check_called_ae: bool = True
    max_pdu: int = 262144
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    in_memory_limit_mb: int = 32
    max_instance_mb: int = 4096  # larger data sets are refused; also the cap on inflating one
    tls: ReceiveTLS | None = None


# What a rule can match, each a list of patterns (any may match; case-insensitive shell
# globs: * ? [..]), besides cstore_priority.
RULE_MATCH_KEYS = ("calling_ae", "modality", "study_description", "requested_procedure",
                   "body_part")
CSTORE_PRIORITIES = ("high", "medium", "low")


@dataclass(frozen=True)
class Rule:
    """One [[rules]] entry: a study matching every criterion given gets `priority`.
    Rules are tried in order and the first that matches decides (receive/rules.py)."""

    name: str
    priority: str  # stat | routine
    calling_ae: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    study_description: tuple[str, ...] = ()
    requested_procedure: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    cstore_priority: tuple[str, ...] = ()  # high | medium | low (the C-STORE request's field)
    # names of [[destinations]]: a matching study goes only there (failover ones in config
    # order, copy ones copied); () = everywhere, as without a rule
    destinations: tuple[str, ...] = ()


def _parse_callers(t: _Table) -> tuple[Caller, ...]:
    callers: list[Caller] = []
    seen: dict[str, str] = {}
    for ct in t.tables("callers"):
        ae = ct.ae("ae_title")
        hosts = ct.get("hosts", (), _check_hosts)
        ct.finish()
        if ae is None:
            continue
        if ae in seen:
            # The allowlist matches the first entry with a title, so a second entry
            # would be dead: its hosts would never be allowed.
            t.ctx.problem(ct.key("ae_title"), f"duplicate of {seen[ae]} ({ae!r}); "
                          "list all of a caller's hosts in one entry")
            continue
        seen[ae] = ct.key("ae_title")
        callers.append(Caller(ae, hosts))
    return tuple(callers)


def _parse_receive_tls(t: _Table) -> ReceiveTLS | None:
    if not t.has("tls"):
        return None
    tt = t.table("tls")
    if not tt.valid:
        return None
    tls = ReceiveTLS(
        port=tt.integer("port", 2762, 1, 65535),
        cert=tt.path("cert"), key=tt.path("key"), ca=tt.path("ca"),
        bind=tt.get("bind", None, _check_ip),
        require_client_cert=tt.boolean("require_client_cert", True),
    )
    tt.finish()
    return tls


def _parse_receive(t: _Table) -> Receive:
    d = Receive()
    r = Receive(
        ae_title=t.ae("ae_title", d.ae_title),
        bind=t.get("bind", d.bind, _check_ip),
        port=t.integer("port", d.port, 1, 65535),
        plain=t.boolean("plain", d.plain),
        accept_any_caller=t.boolean("accept_any_caller", d.accept_any_caller),
        callers=_parse_callers(t),
        max_associations=t.integer("max_associations", d.max_associations, 1, 64),
        max_connections=t.integer("max_connections", d.max_connections, 1, 1024),
        max_connections_per_host=t.integer("max_connections_per_host", d.max_connections_per_host,
                                           1, 1024),
        check_called_ae=t.boolean("check_called_ae", d.check_called_ae),
        max_pdu=t.integer("max_pdu", d.max_pdu, 4096, 16 * 1024 * 1024),
        acse_timeout_s=t.number("acse_timeout_s", d.acse_timeout_s, 1, 600),
        dimse_timeout_s=t.number("dimse_timeout_s", d.dimse_timeout_s, 1, 3600),
        network_timeout_s=t.number("network_timeout_s", d.network_timeout_s, 1, 3600),
        in_memory_limit_mb=t.integer("in_memory_limit_mb", d.in_memory_limit_mb, 0, 1024),
        max_instance_mb=t.integer("max_instance_mb", d.max_instance_mb, 1, 65536),
        tls=_parse_receive_tls(t),
    )
    t.finish()
    if t.valid:
        _check_receive(t, r)
    return r


def _check_receive(t: _Table, r: Receive) -> None:
    """Problems that involve more than one [receive] key."""
    if not r.plain and r.tls is None and "tls" not in t.data:
        t.ctx.problem(t.key("plain"), "is false but there is no [receive.tls]: nothing would listen")
    # Safe default: nobody may send until the technician lists the scanners (a malformed
    # callers value was reported already).
    if not r.accept_any_caller and t.data.get("callers", []) == []:
        t.ctx.problem(t.key("callers"), "is empty: add a [[receive.callers]] entry per scanner, "
                      "or set accept_any_caller = true on a closed network")
    if r.max_connections < r.max_associations:
        t.ctx.problem(t.key("max_connections"), f"must be at least receive.max_associations "
                      f"({r.max_associations}): every association is a connection")
    if r.max_connections_per_host > r.max_connections:
        t.ctx.problem(t.key("max_connections_per_host"),
                      f"must not be greater than receive.max_connections ({r.max_connections})")
    if r.tls and r.plain and r.tls.port == r.port and (r.tls.bind or r.bind) == r.bind:
        t.ctx.problem(t.key("tls.port"), f"is the same as receive.port ({r.port})")


def _check_patterns(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(p, str) and p for p in v):
        raise _Bad("must be a non-empty array of patterns (like [\"CT\"] or [\"*STROKE*\"])")
    if any(len(p) > 128 for p in v):
        raise _Bad("a pattern is longer than 128 characters")
    return tuple(v)


def _check_cstore_priorities(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(p in CSTORE_PRIORITIES for p in v):
        raise _Bad(f"must be one or more of {', '.join(CSTORE_PRIORITIES)}")
    return tuple(v)


def _parse_rules(top: _Table) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    names: dict[str, str] = {}
    for rt in top.tables("rules"):
        name = rt.string("name", max_len=63, pattern=_NAME_RE,
                         hint="must be 1..63 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
        kw: dict[str, Any] = {k: rt.get(k, (), _check_patterns) for k in RULE_MATCH_KEYS}
        kw["cstore_priority"] = rt.get("cstore_priority", (), _check_cstore_priorities)
        kw["destinations"] = rt.get("destinations", (), _check_names)
        priority = rt.choice("priority", None, ("stat", "routine"))
        if priority is None and not rt.has("priority"):
            rt.ctx.problem(rt.key("priority"), "is required (stat or routine)")
        rt.finish()
        if isinstance(name, str):
            if name in names:
                rt.ctx.problem(rt.key("name"), f"duplicate of {names[name]} ({name!r})")
            names.setdefault(name, rt.key("name"))
        if name is not None and priority is not None:
            rules.append(Rule(name=name, priority=priority, **kw))
    return tuple(rules)


def _check_names(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(n, str) and n for n in v):
        raise _Bad("must be a non-empty array of destination names (like [\"center-b\"])")
    if len(set(v)) != len(v):
        raise _Bad("names a destination twice")
    return tuple(v)
