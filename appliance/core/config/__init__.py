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

import dataclasses
import tomllib
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
from appliance.core.config.destinations import (
    _OPTIONAL_DEST,
    _SHA256_FP_RE,
    COMMON_DEST_KEYS,
    DEST_MODES,
    TRANSPORT_KEYS,
    UNAVAILABLE_TRANSPORTS,
    Destination,
    TLSClient,
    _check_cap_hours,
    _check_url,
    _common_dest_keys,
    _dicom_keys,
    _dicomweb_keys,
    _parse_destination,
    _parse_destinations,
    _sftp_keys,
)
from appliance.core.config.operations import (
    OPS_NAME_RE,
    VPN_IFACE_RE,
    Audit,
    Operations,
    Update,
    Vpn,
    _check_bind,
    _check_endpoint,
    _check_networks,
    _check_sources,
    _check_syslog_host,
    _check_vpn_routes,
    _check_wg_key,
    _parse_audit,
    _parse_operations,
    _parse_update,
    _parse_vpn,
    check_source,
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
