"""The root of the tree: `Config`, `parse` and `effective`.

`parse` is pure: merged data and the map of which file set each key in, a `Config` or a
ConfigError listing every problem out, in the order of the sections; checks that involve
more than one section (routes, the bandwidth cap against the queue's minimum rate, the
box name with [operations]) are here. `effective` is the config as plain data, secrets
elided, for `config check`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.config.base import DEFAULT_CONFIG, ELIDED, NOT_A_KEY, _Context, _file_of, _Table
from appliance.core.config.box import (
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
from appliance.core.config.destinations import (
    COMMON_DEST_KEYS,
    TRANSPORT_KEYS,
    Destination,
    _parse_destinations,
)
from appliance.core.config.operations import (
    OPS_NAME_RE,
    Audit,
    Operations,
    Update,
    Vpn,
    _parse_audit,
    _parse_operations,
    _parse_update,
    _parse_vpn,
)
from appliance.core.config.receive import Receive, Rule, _parse_receive, _parse_rules
from appliance.core.errors import ConfigError


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
