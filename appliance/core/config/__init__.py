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

The package, by section (this module re-exports every name, so `config.X` is the way in):
`base` (where the files live, the table reader `_Table`, the checks several sections
share), `box` ([appliance] [spool] [pack] [encryption] [queue] [health]), `receive`
([receive], [[rules]]), `destinations` ([[destinations]], `TRANSPORT_KEYS`), `operations`
([operations] [vpn] [update] [audit]), `tree` (`Config`, `parse`, `effective`) and `load`
(reading and merging the files: `read`, `set_by`, `remote_dir`). `site_config`,
`default_path` and `load` are defined here, so that they read `DEFAULT_CONFIG` and
`SITE_CONFIG_DIR` as this module's names: setting `config.DEFAULT_CONFIG` (as the CLI
tests do) changes the default path.
"""

from __future__ import annotations

from pathlib import Path

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
from appliance.core.config.load import (
    _merge,
    _read_toml,
    _record,
    _toml_files,
    dropin_files,
    read,
    remote_dir,
    remote_files,
    set_by,
)
from appliance.core.config.operations import (
    OPS_NAME_RE,
    VPN_IFACE_RE,
    Audit,
    DiagnosticsPlace,
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
from appliance.core.config.tree import Config, _check_routes, effective, parse
from appliance.core.errors import ConfigError  # config.ConfigError, as config.py had it

__all__ = ["Appliance", "Audit", "COMMON_DEST_KEYS", "CSTORE_PRIORITIES", "Caller", "Check",
    "Config", "ConfigError", "DEFAULT_CONFIG", "DEST_MODES", "DROPIN_DIR", "DURING_BURST", "Destination",
    "DiagnosticsPlace",
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
