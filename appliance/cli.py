"""The `appliance` command line.

    appliance run            [--config PATH]     run the daemon in the foreground
    appliance config check   [--config PATH]     print the effective config, or every problem
    appliance keys init      [--config PATH]     create missing keys (never overwrites)
    appliance queue list     [--config PATH] [--json]
    appliance status         [--config PATH] [--json]

Every error is one line on stderr and a documented exit code (see `errors.py`): 0 ok,
64 usage, 66 not found, 69 daemon not running or not answering (status), 73 state dir
(also: `queue list` before the daemon has ever run), 75 a listening port in use or its
address not on this machine (run; systemd retries), 77 permission denied (status; run: a
port below 1024), 78 configuration or key file (a config error prints one line per
problem). No command
prints a traceback; an unexpected bug prints one line and exits 70, with the traceback
only under APPLIANCE_DEBUG=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from appliance import __version__
from appliance.core import config, crypto, durable
from appliance.core.errors import (
    EX_NOPERM,
    EX_UNAVAILABLE,
    ApplianceError,
    ConfigError,
    KeyFileError,
    NotFoundError,
    StateError,
    UsageError,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="appliance", description="Teleradiology edge appliance")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, default=None,
                        help=f"main config file (default {config.DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    chk = cfg_sub.add_parser("check", parents=[common], help="check and print the effective config")
    chk.add_argument("--json", action="store_true")
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    keys_sub.add_parser("init", parents=[common],
                        help="create the spool key and appliance key pair if missing")
    q = sub.add_parser("queue", help="inspect the queue")
    q_sub = q.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    ql = q_sub.add_parser("list", parents=[common], help="list segments and bundles")
    ql.add_argument("--json", action="store_true")
    qs = q_sub.add_parser("show", parents=[common], help="show one queue item")
    qs.add_argument("id")
    qs.add_argument("--json", action="store_true")
    for verb, text in (("hold", "stop forwarding an item until released"),
                       ("release", "make a held, deferred or failed item ready again"),
                       ("retry", "attempt a deferred or held item now"),
                       ("delete", "delete an item that is not in flight, and its bundle file")):
        v = q_sub.add_parser(verb, parents=[common], help=text)
        v.add_argument("id", nargs="?")
        v.add_argument("--all", action="store_true", help="every item this applies to")
    b = sub.add_parser("bundle", help="inspect and extract bundle files")
    b_sub = b.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    bi = b_sub.add_parser("inspect", help="show a bundle's header, and its manifest with --key")
    bi.add_argument("file", type=Path)
    bi.add_argument("--key", type=Path, help="a recipient's private key (PEM)")
    bi.add_argument("--json", action="store_true")
    be = b_sub.add_parser("extract", help="verify a bundle and write its instances as Part-10 files")
    be.add_argument("file", type=Path)
    be.add_argument("--key", type=Path, required=True, help="a recipient's private key (PEM)")
    be.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    st = sub.add_parser("status", parents=[common], help="show the running daemon's status")
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # nothing the appliance creates should be readable by others
    try:
        args = _parser().parse_args(argv)
        return _dispatch(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return e.exit_code
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("APPLIANCE_DEBUG") == "1":
            raise
        print(f"error: unexpected {type(e).__name__}; rerun with APPLIANCE_DEBUG=1 for details",
              file=sys.stderr)
        return 70


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "config":
        return cmd_config_check(args)
    if args.cmd == "keys":
        return cmd_keys_init(args)
    if args.cmd == "queue":
        return cmd_queue_list(args) if args.sub == "list" else cmd_queue_change(args)
    if args.cmd == "bundle":
        return cmd_bundle(args)
    if args.cmd == "status":
        return cmd_status(args)
    raise UsageError(f"unknown command {args.cmd}")


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.core import log
    from appliance.daemon import Daemon

    cfg = config.load(args.config)
    log.setup(cfg.appliance.log_level, cfg.appliance.log_format)
    return Daemon(cfg).run()


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    problems = [f"{cfg.file_of(key)}: {key}: {msg}" for key, msg in _check_files(cfg)]
    if problems:
        raise ConfigError(problems)
    eff = config.effective(cfg)
    if args.json:
        print(json.dumps(eff, indent=2))
    else:
        _print_tree(eff)
    return 0


STATUS_SOCKET_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


def _check_files(cfg: config.Config) -> list[tuple[str, str]]:
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
        if d.transport == "sftp" and d.key and d.known_hosts:
            checks += [(f"destinations[{i}].key", _private_key_file, d.key),
                       (f"destinations[{i}].known_hosts", _regular_file, d.known_hosts)]
        if d.transport == "directory" and d.path:
            checks.append((f"destinations[{i}].path", _directory_or_absent, d.path))
    checks.append(("appliance.state_dir", _directory_or_absent, cfg.appliance.state_dir))
    out = []
    for i, d in enumerate(cfg.destinations):
        if d.transport == "sftp":  # parsed and checked, but the daemon cannot send with it yet
            out.append((f"destinations[{i}].transport",
                        "sftp is not available in this version of the appliance"))
    if len(bytes(cfg.status_socket)) > STATUS_SOCKET_MAX:
        out.append(("appliance.state_dir", f"path too long: {cfg.status_socket} must be at most"
                    f" {STATUS_SOCKET_MAX} bytes (a Unix socket limit)"))
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


def _private_key_file(p: Path) -> None:
    """A key that `keys init` does not make (TLS, SSH): present, 0600, ours."""
    if not p.exists():
        raise _FileProblem(f"key file {p} does not exist")
    crypto.check_private_key_file(p)


def _directory_or_absent(p: Path) -> None:
    """The daemon creates a missing directory, but cannot use a file in its place."""
    if p.exists() and not p.is_dir():
        raise _FileProblem(f"{p} exists and is not a directory")


def _print_tree(d: Any, prefix: str = "") -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict | list) and v and not (isinstance(v, list) and not isinstance(v[0], dict)):
                _print_tree(v, key)
            else:
                print(f"{key} = {json.dumps(v)}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            _print_tree(v, f"{prefix}[{i}]")


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Create the keys the config names that do not exist yet; never replace one."""
    cfg = config.load(args.config)
    p = cfg.spool.key_file
    if p.exists():
        crypto.load_spool_key(p)
        print(f"spool key: {p} exists, kept")
    else:
        crypto.create_spool_key(p)
        print(f"spool key: {p} created")
    priv, pub = cfg.encryption.appliance_key, cfg.encryption.appliance_public_key
    if priv.exists():
        key = crypto.load_private_key(priv)
        print(f"appliance key: {priv} exists, kept")
        if not pub.exists():
            # The public half is derived from the private key, so recreating a lost
            # copy changes nothing that the reading center already trusts.
            durable.make_dirs(pub.parent)
            durable.atomic_write(pub, key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                mode=0o644)
            print(f"appliance public key: {pub} was missing, written again from {priv}")
    else:
        if pub.exists():
            raise KeyFileError(f"{pub} exists but its private key {priv} does not; "
                               "move it aside first")
        crypto.create_keypair(priv, pub)
        print(f"appliance key: {priv} created, public key {pub}")
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    from appliance.queue.index import open_index

    cfg = config.load(args.config)
    idx = open_index(cfg.appliance.state_dir, readonly=True)
    now = time.time()
    try:
        rows = [
            {"id": r["id"], "state": r["state"], "study": r["study_key"],
             "instances": r["instances"], "bytes": r["bytes"],
             "age_s": round(now - r["created"], 1), "reason": r["reason"]}
            for r in idx.query("SELECT * FROM segments ORDER BY created")
        ]
    except sqlite3.Error as e:
        raise StateError(f"cannot read the queue index in {cfg.appliance.state_dir}: {e}") from None
    finally:
        idx.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':28} {'STATE':10} {'STUDY':16} {'INST':>6} {'BYTES':>12} {'AGE':>8}  REASON")
    for r in rows:
        print(f"{r['id']:28} {r['state']:10} {r['study']:16} {r['instances']:>6} {r['bytes']:>12}"
              f" {_age(r['age_s']):>8}  {r['reason'] or ''}")
    if not rows:
        print("(the queue is empty)")
    return 0


_VERB_STATES = {
    "hold": ("ready", "deferred"),
    "release": ("held", "deferred", "failed"),
    "retry": ("deferred", "held"),
    "delete": ("ready", "deferred", "held", "delivered", "failed"),
}


def cmd_queue_change(args: argparse.Namespace) -> int:
    """show / hold / release / retry / delete, usable while the daemon runs (SQLite WAL)."""
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue

    cfg = config.load(args.config)
    open_index(cfg.appliance.state_dir, readonly=True).close()  # clear error if never run
    q = Queue(cfg.appliance.state_dir, open_index(cfg.appliance.state_dir))
    if args.sub == "show":
        item = q.get(args.id)
        d = dataclasses.asdict(item)
        if args.json:
            print(json.dumps(d, indent=2))
        else:
            for k, v in d.items():
                print(f"{k:14} {'' if v is None else v}")
        return 0
    if args.all == bool(args.id):
        raise UsageError(f"appliance queue {args.sub}: give one ID or --all")
    ids = [args.id] if args.id else [i.id for i in q.list(_VERB_STATES[args.sub])]
    for item_id in ids:
        if args.sub == "hold":
            state = q.get(item_id).state
            if state not in _VERB_STATES["hold"]:
                raise StateError(f"queue item {item_id} is {state}; only ready or deferred items"
                                 " can be held")
            q.hold(item_id, "held by operator")
        else:
            getattr(q, args.sub)(item_id)
        print(f"{item_id}: {args.sub}")
    if not ids:
        print(f"(no item to {args.sub})")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from appliance.bundle import format as bundle

    if args.sub == "extract":
        key = crypto.load_private_key(args.key)
        args.out.mkdir(parents=True, exist_ok=True)
        with _open_input(args.file) as f:
            manifest = bundle.extract(f, key, args.out)
        print(f"{len(manifest.instances)} instances written to {args.out}")
        return 0
    with _open_input(args.file) as f:
        header = bundle.read_header(f)
        out: dict[str, Any] = {
            "bundle_id": header.bundle_id, "format_version": header.version,
            "created": header.created, "suite": header.suite_name, "chunk_size": header.chunk_size,
            "recipients": [r.key_id.hex() for r in header.recipients],
        }
        if args.key:
            f.seek(0)
            m = bundle.read_manifest(f, crypto.load_private_key(args.key))
            out["study"] = m.study_key
            # ids only: a UID identifies a patient's study as surely as a name does
            out["instances"] = [{"index": e.index, "sop_class": e.sop_class,
                                 "transfer_syntax": e.transfer_syntax, "action": e.action,
                                 "reason": e.reason, "received_size": e.received_size,
                                 "size": e.size, "sha256": e.sha256} for e in m.instances]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            if k != "instances":
                print(f"{k:15} {v}")
        for e in out.get("instances", []):
            print(f"  [{e['index']}] {e['action']:11} {e['received_size']:>10} -> {e['size']:>10}"
                  f"  {e['transfer_syntax']}  sop_class {e['sop_class']}")
    return 0


def _open_input(p: Path) -> Any:
    try:
        return p.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"{p} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{p} is a directory, not a bundle file") from None


def _age(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.health.status import query

    cfg = config.load(args.config)
    sock = cfg.status_socket
    try:
        st = query(sock)
    except PermissionError:
        print(f"error: permission denied on {sock}: run as root or the appliance's user",
              file=sys.stderr)
        return EX_NOPERM
    except (OSError, ValueError):  # a hung daemon (timeout) or one that died mid-answer
        print(f"error: the appliance daemon did not answer on {sock}", file=sys.stderr)
        return EX_UNAVAILABLE
    if st is None:
        print(f"error: the appliance daemon is not running (nothing listens on {sock})",
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    r, sp = st["receive"], st["spool"]
    for listener in st["listening"]:
        print(f"listening      {listener['host']}:{listener['port']}{' (TLS)' if listener['tls'] else ''}"
              f" as {st['ae_title']}")
    print(f"uptime         {_age(st['uptime_s'])} (pid {st['pid']}, version {st['version']})")
    why = ", ".join(f"{k} {v}" for k, v in sorted(r.get("associations_rejected_by_reason", {}).items()))
    print(f"associations   {r['associations_active']} active, {r['associations_total']} total,"
          f" {r['associations_rejected']} rejected{f' ({why})' if why else ''}")
    conns = ", ".join(f"{k} {v}" for k, v in sorted(r.get("connections_refused", {}).items())) or "none"
    print(f"connections    refused: {conns}")
    print(f"received       {r['instances_received']} instances ({r['instances_duplicate']} duplicates)")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(r["instances_refused"].items())) or "none"
    print(f"refused        {refused}")
    print(f"spool          {sp['instances']} instances, {sp['bytes'] >> 20} MiB")
    print(f"spool free     {sp['free_bytes'] >> 20} MiB (reserve {sp['reserve_bytes'] >> 20} MiB)")
    if "queue" in st:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st["queue"].items())) or "empty"
        print(f"queue          {counts}; oldest waiting {_age(st['oldest_waiting_s'])}")
        for dest, err in st.get("last_errors", {}).items():
            print(f"last error     {dest}: {err}")
    return 0
