"""`appliance config check` and `appliance config systemd-dropin`, and the checks they
share with `run` and `keys init`: every file the config names, checked the way the daemon
will use it (nothing is created), each problem a (dotted key, message) pair that
`raise_problems` turns into one ConfigError (exit 78, one line per problem)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import stopping
from appliance.core import config, crypto, durable, sandbox
from appliance.core.errors import ConfigError, KeyFileError, UsageError
from appliance.ops import cli as ops_cli
from appliance.update import handoff


def raise_problems(cfg: config.Config, found: list[tuple[str, str]]) -> None:
    if found:
        raise ConfigError([f"{cfg.file_of(key)}: {key}: {msg}" for key, msg in found])


def _center_config_check(args: argparse.Namespace) -> int:
    from appliance.ingest import commands
    from appliance.ingest import config as center

    cfg = center.load(args.config)
    found = commands.problems(cfg)
    if found:
        raise ConfigError(found)
    eff = center.effective(cfg)
    if args.json:
        print(json.dumps(eff, indent=2))
    else:
        print_tree(eff)
    return 0


def is_center(args: argparse.Namespace) -> bool:
    from appliance.ingest.commands import is_center_file

    return is_center_file(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    if is_center(args):
        return _center_config_check(args)
    cfg = config.load(args.config)
    found, warnings = check(cfg, args.systemd, args.unit_dir)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    raise_problems(cfg, found)
    eff = config.effective(cfg)
    set_by = {str(f): keys for f, keys in config.set_by(cfg).items()}
    if args.json:
        print(json.dumps({**eff, "set_by": set_by}, indent=2))
    else:
        print_tree(eff)
        print_set_by(cfg, set_by)
    return 0


def print_set_by(cfg: config.Config, set_by: dict[str, list[str]]) -> None:
    """Which drop-in set which keys (the main file set the rest); the operations
    center's are named as such, so a technician sees a remote setting and where it is."""
    remote = config.remote_dir(cfg.sources[0]) if cfg.sources else None
    for f, keys in set_by.items():
        who = " (operations center: remote config)" if remote and Path(f).parent == remote else ""
        print(f"# set by {f}{who}: {', '.join(keys) or '(nothing)'}")


def check(cfg: config.Config, systemd: bool = False,
          unit_dir: Path = sandbox.UNIT_DIR) -> tuple[list[tuple[str, str]], list[str]]:
    """What `config check` checks beyond parsing (the files the config names, the ops
    link's, the unit's writable paths when asked or installed, its stop timeout):
    (problems, warnings)."""
    found = check_files(cfg)
    ops_found, warnings = ops_cli.check(cfg)
    found += ops_found
    warnings += handoff.watch_warnings(cfg, (unit_dir, *sandbox.UNIT_SEARCH[1:]))
    warnings += stopping.timeout_warnings(cfg, (unit_dir, *sandbox.UNIT_SEARCH[1:]))
    if systemd or sandbox.unit_installed():
        found += sandbox.problems(cfg, sandbox.granted(unit_dir), sandbox.dropin_path(unit_dir))
    return found, warnings


def cmd_systemd_dropin(args: argparse.Namespace) -> int:
    """Print or write the unit drop-in; hidden or unwritable folders are config errors."""
    cfg = config.load(args.config)
    found = [(key, f"{path} cannot be named in a unit file (control characters)")
             for key, path in sandbox.needed(cfg) if not sandbox.unit_safe(path)]
    found += sandbox.hidden(cfg)  # what no drop-in fixes
    raise_problems(cfg, found)
    target = sandbox.dropin_path(args.unit_dir)
    text = sandbox.dropin_text(cfg)
    if not args.write:
        print(text, end="")
        return 0
    # World-readable, as unit files are: `config check` reads it as the service user.
    umask = os.umask(0o022)
    try:
        durable.make_dirs(target.parent, mode=0o755)
        durable.atomic_write(target, text.encode(), mode=0o644)
    except PermissionError:
        raise UsageError(f"cannot write {target}: permission denied (run as root)") from None
    finally:
        os.umask(umask)
    print(f"wrote {target}; now run: systemctl daemon-reload && systemctl restart appliance")
    return 0


def check_files(cfg: config.Config) -> list[tuple[str, str]]:
    """(dotted key, problem) for every file the config names that the daemon could not use.

    Key files are part of a working config: they are checked the way the daemon will
    load them (present, the right kind, 0600, owned by us). Nothing is created here.
    """
    checks: list[tuple[str, Callable[[Path], object], Path]] = [
        ("spool.key_file", crypto.load_spool_key, cfg.spool.key_file),
        ("encryption.appliance_key", crypto.load_private_key, cfg.encryption.appliance_key),
        ("encryption.appliance_public_key", crypto.load_public_key,
         cfg.encryption.appliance_public_key),
    ]
    checks += [(f"encryption.recipients[{i}]", crypto.load_public_key, p)
               for i, p in enumerate(cfg.encryption.recipients)]
    tls_files: list[tuple[str, config.ReceiveTLS | config.TLSClient | None]] = [
        ("receive.tls", cfg.receive.tls)]
    tls_files += [(f"destinations[{i}].tls", d.tls) for i, d in enumerate(cfg.destinations)]
    for key, tls in tls_files:
        if tls is not None:
            checks += [(f"{key}.cert", _regular_file, tls.cert),
                       (f"{key}.key", _private_key_file, tls.key),
                       (f"{key}.ca", _regular_file, tls.ca)]
    for i, d in enumerate(cfg.destinations):
        if d.transport == "sftp" and d.key:
            checks.append((f"destinations[{i}].key", _private_key_file, d.key))
        if d.transport == "sftp" and d.known_hosts and d.host and d.port:
            checks.append((f"destinations[{i}].known_hosts", _known_hosts_for(d.host, d.port),
                           d.known_hosts))
        if d.transport == "sftp" and d.receipt_key:
            checks.append((f"destinations[{i}].receipt_key", _receipt_key, d.receipt_key))
        if d.transport == "directory" and d.path:
            checks.append((f"destinations[{i}].path", _directory_or_absent, d.path))
        if d.transport == "dicomweb" and d.token_file:
            checks.append((f"destinations[{i}].token_file", _private_key_file, d.token_file))
    place = cfg.operations.diagnostics if cfg.operations is not None else None
    if place is not None:  # [operations.diagnostics]: checked as an sftp destination's files
        checks.append(("operations.diagnostics.key", _private_key_file, place.key))
        if place.known_hosts is not None:
            checks.append(("operations.diagnostics.known_hosts",
                           _known_hosts_for(place.sftp_host, place.sftp_port), place.known_hosts))
    a = cfg.audit
    if a.syslog_host and a.syslog_ca is not None:
        checks.append(("audit.syslog_ca", _regular_file, a.syslog_ca))
        if a.syslog_cert is not None and a.syslog_key is not None:
            checks += [("audit.syslog_cert", _regular_file, a.syslog_cert),
                       ("audit.syslog_key", _private_key_file, a.syslog_key)]
    checks.append(("appliance.state_dir", _directory_or_absent, cfg.appliance.state_dir))
    out = []
    for key, check, path in checks:
        try:
            check(path)
        except (KeyFileError, _FileProblem) as e:
            out.append((key, str(e)))
    return out


class _FileProblem(Exception):
    pass


def _regular_file(p: Path) -> None:
    if not p.is_file():
        raise _FileProblem(f"{p} does not exist or is not a file")


def _known_hosts_for(host: str, port: int) -> Callable[[Path], None]:
    """A known_hosts file that pins a key for this server (else every send is refused)."""
    def check(p: Path) -> None:
        from appliance.forward import Permanent, sftp  # noqa: PLC0415 - paramiko only when used

        _regular_file(p)
        try:
            keys = sftp.pinned_keys(p, host, port)
        except Permanent as e:
            raise _FileProblem(str(e)) from None
        if not keys:
            raise _FileProblem(f"{p} has no key for {sftp.host_key_name(host, port)} (for a port"
                               " other than 22 a line starts with [host]:port)")
    return check


def _receipt_key(p: Path) -> None:
    """The reading center's Ed25519 public key, as the receipt poller loads it."""
    from appliance.ingest.receipt import load_verify_key  # noqa: PLC0415

    load_verify_key(p)


def _private_key_file(p: Path) -> None:
    """A key that `keys init` does not make (TLS, SSH): present, 0600, ours."""
    if not p.exists():
        raise _FileProblem(f"key file {p} does not exist")
    crypto.check_private_key_file(p)


def _directory_or_absent(p: Path) -> None:
    """The daemon creates a missing directory, but cannot use a file in its place."""
    if p.exists() and not p.is_dir():
        raise _FileProblem(f"{p} exists and is not a directory")


def print_tree(d: Any, prefix: str = "") -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict | list) and v and not (isinstance(v, list) and not isinstance(v[0], dict)):
                print_tree(v, key)
            else:
                print(f"{key} = {json.dumps(v)}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            print_tree(v, f"{prefix}[{i}]")
