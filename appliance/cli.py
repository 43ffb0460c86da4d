"""The `appliance` command line.

    appliance run            [--config PATH]     run the daemon in the foreground
    appliance config check   [--config PATH] [--systemd]
                                                 print the effective config, or every problem
    appliance config systemd-dropin [--config PATH] [--write]
                                                 the unit drop-in for paths outside /var/lib/appliance
    appliance keys init      [--config PATH]     create missing keys (never overwrites)
    appliance queue list     [--config PATH] [--json]
    appliance queue show|hold|release|retry|delete ID|--all [--config PATH]
    appliance bundle inspect FILE [--key KEY | --config PATH] [--json]
    appliance bundle extract FILE [--key KEY | --config PATH] --out DIR
    appliance status         [--config PATH] [--json]
    appliance ingest         --config CENTER.toml [--once]
                                                 reading center: bundles from the drop folder into the PACS
    appliance fleet ca init DIR | fleet sign BOX.csr --ca DIR
                                                 operations center: fleet CA (appliance/ops/cli.py)

`config check` and `keys init` given a center config (a file with only an [ingest] table)
check it, or create the center's keys, instead (appliance/ingest/commands.py).

Every command takes --config. `bundle` opens a bundle with --key, else with the config's
encryption.appliance_key (--config, or the default config when it exists).

Every error is one line on stderr and a documented exit code (see `errors.py`): 0 ok,
64 usage, 66 not found, 69 daemon not running or not answering (status), 73 state dir
(also: `queue list` before the daemon has ever run), 75 a listening port in use or its
address not on this machine (run; systemd retries), 77 permission denied (status; run: a
port below 1024), 78 configuration or key file (a config error prints one line per
problem). No command
prints a traceback; an unexpected bug prints one line and exits 70, with the traceback
only under APPLIANCE_DEBUG=1. Output into a pipe whose reader has gone (`appliance queue
list | head`) ends quietly with 141, as a tool killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from appliance import __version__
from appliance.core import config, crypto, durable, sandbox
from appliance.core.errors import (
    EX_USAGE,
    ApplianceError,
    ConfigError,
    DaemonNotRunningError,
    KeyFileError,
    NotFoundError,
    PermissionDeniedError,
    StateError,
    UsageError,
)
from appliance.ops import cli as ops_cli

EX_SIGPIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE: 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def add_subparsers(self, **kw: Any) -> Any:
        """Commands of this level. One left out is not an argparse error ("required: cmd"
        names our internals): `main` prints this level's help instead (exit 64)."""
        self.set_defaults(help_of_level=self)
        return super().add_subparsers(required=False, metavar="COMMAND", parser_class=_Parser,
                                      title="commands", **kw)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="appliance", description="Teleradiology edge appliance")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, default=None,
                        help=f"main config file (default {config.DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="sub")
    chk = cfg_sub.add_parser("check", parents=[common], help="check and print the effective config")
    chk.add_argument("--json", action="store_true")
    chk.add_argument("--systemd", action="store_true",
                     help="also check the folders against the systemd unit's writable paths"
                          " (automatic when the unit is installed)")
    chk.add_argument("--unit-dir", type=Path, default=sandbox.UNIT_DIR, help=argparse.SUPPRESS)
    dropin = cfg_sub.add_parser("systemd-dropin", parents=[common],
                                help="print (or --write) the systemd drop-in that lets the appliance"
                                     " write its state_dir and directory destinations")
    dropin.add_argument("--write", action="store_true",
                        help=f"write it to {sandbox.dropin_path()} instead of printing it")
    dropin.add_argument("--unit-dir", type=Path, default=sandbox.UNIT_DIR, help=argparse.SUPPRESS)
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="sub")
    keys_sub.add_parser("init", parents=[common],
                        help="create the spool key and appliance key pair if missing")
    q = sub.add_parser("queue", help="inspect the queue")
    q_sub = q.add_subparsers(dest="sub")
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
    b_sub = b.add_subparsers(dest="sub")
    key_help = ("a recipient's private key (PEM); default: encryption.appliance_key of the config"
                " (--config, or the default config when it exists)")
    bi = b_sub.add_parser("inspect", parents=[common],
                          help="show a bundle's header, and its manifest when a key opens it")
    bi.add_argument("file", type=Path)
    bi.add_argument("--key", type=Path, help=key_help)
    bi.add_argument("--json", action="store_true")
    be = b_sub.add_parser("extract", parents=[common],
                          help="verify a bundle and write its instances as Part-10 files")
    be.add_argument("file", type=Path)
    be.add_argument("--key", type=Path, help=key_help)
    be.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    st = sub.add_parser("status", parents=[common], help="show the running daemon's status")
    st.add_argument("--json", action="store_true")
    ing = sub.add_parser("ingest", parents=[common],
                         help="reading center: store bundles from the drop folder into the PACS")
    ing.add_argument("--once", action="store_true", help="one pass, print the counts, exit")
    ops_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # nothing the appliance creates should be readable by others
    try:
        args = _parser().parse_args(argv)
        if args.cmd is None or getattr(args, "sub", "") is None:
            sys.stderr.write(args.help_of_level.format_help())
            return EX_USAGE
        rc = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, in the handler, not at interpreter exit
        return rc
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return e.exit_code
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as e:
        if not _stdout_reader_gone():
            return _unexpected(e)
        # `appliance queue list | head`: the reader has all it wanted. End as a tool killed
        # by SIGPIPE would, quietly; stdout goes to /dev/null so that the interpreter's
        # last flush of what is still buffered does not report the same pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_SIGPIPE
    except Exception as e:
        return _unexpected(e)


def _unexpected(e: Exception) -> int:
    if os.environ.get("APPLIANCE_DEBUG") == "1":
        raise e
    print(f"error: unexpected {type(e).__name__}; rerun with APPLIANCE_DEBUG=1 for details",
          file=sys.stderr)
    return 70


def _stdout_reader_gone() -> bool:
    """Has the other end of stdout closed (a pipe's reader, a socket's peer)?

    Told apart from any other EPIPE (a socket of our own), which stays a bug to report.
    """
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), 0)  # no events asked: only ERR / HUP / NVAL come back
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "config":
        return cmd_config_check(args) if args.sub == "check" else cmd_systemd_dropin(args)
    if args.cmd == "keys":
        return cmd_keys_init(args)
    if args.cmd == "queue":
        return cmd_queue_list(args) if args.sub == "list" else cmd_queue_change(args)
    if args.cmd == "bundle":
        return cmd_bundle(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "ingest":
        return cmd_ingest(args)
    if args.cmd == "fleet":
        return ops_cli.dispatch(args)
    raise UsageError(f"unknown command {args.cmd}")


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.core import log
    from appliance.daemon import Daemon

    cfg = config.load(args.config)
    # Every problem `config check` finds stops the start here, with exit code 78 from the
    # main process: under systemd that is the code RestartPreventExitStatus= sees (it
    # ignores ExecStartPre=), so a bad config fails the unit once instead of looping.
    found = _check_files(cfg)
    if sandbox.read_only(cfg.appliance.state_dir):
        found.append(("appliance.state_dir", _read_only_state_dir(cfg.appliance.state_dir)))
    _raise_problems(cfg, found)
    log.setup(cfg.appliance.log_level, cfg.appliance.log_format)
    return Daemon(cfg).run()


def _read_only_state_dir(p: Path) -> str:
    return (f"{p} is on a read-only file system here; under the systemd unit a state_dir outside"
            f" /var/lib/appliance needs the drop-in {sandbox.dropin_path()}: write it with"
            " `appliance config systemd-dropin --write`, then `systemctl daemon-reload`")


def _raise_problems(cfg: config.Config, found: list[tuple[str, str]]) -> None:
    if found:
        raise ConfigError([f"{cfg.file_of(key)}: {key}: {msg}" for key, msg in found])


def cmd_ingest(args: argparse.Namespace) -> int:
    from appliance.ingest import commands
    from appliance.ingest import config as center

    if args.config is None:
        raise UsageError("appliance ingest: --config CENTER.toml is required")
    return commands.run(center.load(args.config), args.once)


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
        _print_tree(eff)
    return 0


def _is_center(args: argparse.Namespace) -> bool:
    from appliance.ingest.commands import is_center_file

    return is_center_file(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    if _is_center(args):
        return _center_config_check(args)
    cfg = config.load(args.config)
    found = _check_files(cfg)
    ops_found, ops_warnings = ops_cli.check(cfg)
    found += ops_found
    for w in ops_warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.systemd or sandbox.unit_installed():
        found += sandbox.problems(cfg, sandbox.granted(args.unit_dir),
                                  sandbox.dropin_path(args.unit_dir))
    _raise_problems(cfg, found)
    eff = config.effective(cfg)
    if args.json:
        print(json.dumps(eff, indent=2))
    else:
        _print_tree(eff)
    return 0


def cmd_systemd_dropin(args: argparse.Namespace) -> int:
    """Print or write the unit drop-in; hidden or unwritable folders are config errors."""
    cfg = config.load(args.config)
    found = [(key, f"{path} cannot be named in a unit file (control characters)")
             for key, path in sandbox.needed(cfg) if not sandbox.unit_safe(path)]
    found += sandbox.hidden(cfg)  # what no drop-in fixes
    _raise_problems(cfg, found)
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


CONTROL_SOCKET_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


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
    checks.append(("appliance.state_dir", _directory_or_absent, cfg.appliance.state_dir))
    out = []
    if len(bytes(cfg.control_socket)) > CONTROL_SOCKET_MAX:
        out.append(("appliance.state_dir", f"path too long: {cfg.control_socket} must be at most"
                    f" {CONTROL_SOCKET_MAX} bytes (a Unix socket limit)"))
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
    if _is_center(args):
        from appliance.ingest import commands
        from appliance.ingest import config as center

        print("\n".join(commands.keys_init(center.load(args.config))))
        return 0
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
    for line in ops_cli.keys_init(cfg):
        print(line)
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    from appliance.queue.index import open_index
    from appliance.queue.store import PRIORITY_STAT

    cfg = config.load(args.config)
    idx = open_index(cfg.appliance.state_dir, readonly=True)
    now = time.time()
    try:
        rows = [
            {"id": r["id"], "state": r["state"],
             "priority": "stat" if r["priority"] >= PRIORITY_STAT else "routine",
             "study": r["study_key"], "instances": r["instances"], "bytes": r["bytes"],
             "age_s": round(now - r["created"], 1), "reason": r["reason"],
             "destination": r["destination"],
             "incomplete": r["incomplete"] if "incomplete" in r.keys() else 0,  # noqa: SIM118
             "copy_to": r["copy_to"] if "copy_to" in r.keys() else None,  # noqa: SIM118
             "copy_of": r["parent"] if "copy_to" in r.keys() and r["copy_to"]  # noqa: SIM118
             and r["only_index"] is None else None}
            for r in idx.query("SELECT * FROM segments ORDER BY created")
        ]
        found = _receipts(idx)
    except sqlite3.Error as e:
        raise StateError(f"cannot read the queue index in {cfg.appliance.state_dir}: {e}") from None
    finally:
        idx.close()
    with_receipts = {d.name for d in cfg.destinations if d.receipt_key is not None}
    for r in rows:
        r["center"], r["shown"] = _center(r, found, with_receipts)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':28} {'STATE':17} {'PRIO':7} {'STUDY':16} {'INST':>6} {'BYTES':>12} {'AGE':>8}"
          f" {'DESTINATION':16} REASON")
    for r in rows:
        print(f"{r['id']:28} {r['shown']:17} {r['priority']:7} {r['study']:16} {r['instances']:>6}"
              f" {r['bytes']:>12}"
              f" {_age(r['age_s']):>8} {_list_destination(r):16} {_list_reason(r)}")
    if not rows:
        print("(the queue is empty)")
    return 0


def _list_destination(row: dict[str, Any]) -> str:
    """The DESTINATION column: where it went last; a copy: "copy:<its destination>"."""
    if row["copy_to"]:
        return f"copy:{row['copy_to']}"
    return str(row["destination"] or "-")


def _list_reason(row: dict[str, Any]) -> str:
    """The REASON column: the state's reason, and an incomplete segment said first; what
    the center stored of a bundle it did not store whole."""
    c = row["center"]
    center = (f"the center stored {c['stored']} of {c['stored'] + c['failed']} instance(s)"
              if c and c["receipt"] and row["shown"] != "stored at center" else "")
    parts = [f"INCOMPLETE: {row['incomplete']} acknowledged instance(s) missing (see the log)"
             if row["incomplete"] else "", center, row["reason"] or ""]
    return "; ".join(p for p in parts if p)


def _receipts(idx: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(item, destination) -> its receipt columns; {} on an index older than schema 6."""
    try:
        rows = idx.query("SELECT item_id, destination, receipt, receipt_at, receipt_stored,"
                         " receipt_failed, receipt_center FROM deliveries WHERE state='delivered'")
    except sqlite3.OperationalError:  # no such column: the daemon has not migrated it yet
        return {}
    return {(r["item_id"], r["destination"]): dict(r) for r in rows}


def _center(row: dict[str, Any], found: dict[tuple[str, str], dict[str, Any]],
            with_receipts: set[str]) -> tuple[dict[str, Any] | None, str]:
    """(what the reading center said of a delivered item, what STATE shows). A bundle
    delivered to a destination with receipts is "uploaded" until its receipt comes."""
    if row["state"] != "delivered" or row["destination"] not in with_receipts:
        return None, row["state"]
    d = found.get((row["id"], row["destination"]))
    if d is None or d["receipt"] is None:
        return {"receipt": None}, "uploaded"
    c = {"receipt": d["receipt"], "stored": d["receipt_stored"], "failed": d["receipt_failed"],
         "at": d["receipt_at"], "center": d["receipt_center"]}
    return c, f"{center_verdict(c['stored'], c['failed'])} at center"


def center_verdict(stored: int, failed: int) -> str:
    """stored | partial | failed, from the counts (a "duplicate" receipt carries the first
    ingest's outcomes, so it reads like the receipt it repeats)."""
    if stored and not failed:
        return "stored"
    return "partial" if stored else "failed"


def cmd_queue_change(args: argparse.Namespace) -> int:
    """show (read from the index), and hold / release / retry / delete, which the running
    daemon carries out (its control socket): the queue has one writer. With no daemon
    running they are done here, under the daemon's lock."""
    from appliance.health import control
    from appliance.queue import commands

    cfg = config.load(args.config)
    if args.sub == "show":
        return _queue_show(cfg, args)
    if args.all == bool(args.id):
        raise UsageError(f"appliance queue {args.sub}: give one ID or --all")
    req = {"verb": args.sub, "id": args.id, "all": args.all}
    results = control.request(cfg.control_socket, "queue.change", req)
    if results is None:  # no daemon: act on the index ourselves, holding its lock
        from appliance.daemon import audit_trail, state_lock
        from appliance.health.control import operator_name
        from appliance.queue.index import open_index
        from appliance.queue.store import Queue

        open_index(cfg.appliance.state_dir, readonly=True).close()  # clear error if never run
        with state_lock(cfg.appliance.state_dir):
            idx = open_index(cfg.appliance.state_dir)
            try:
                results = commands.change_audited(Queue(cfg.appliance.state_dir, idx), args.sub,
                                                  args.id, args.all, audit_trail(cfg),
                                                  operator_name(os.getuid()))
            finally:
                idx.close()
    for r in results:
        print(f"{r['id']}: {r['result']}")
    if not results:
        print(f"(no item to {args.sub})")
    return 0


def _queue_show(cfg: config.Config, args: argparse.Namespace) -> int:
    from appliance.queue.commands import show
    from appliance.queue.index import open_index
    from appliance.queue.store import Queue

    idx = open_index(cfg.appliance.state_dir, readonly=True)
    try:
        d = show(Queue(cfg.appliance.state_dir, idx), args.id)
    except sqlite3.Error as e:  # e.g. an index the upgraded daemon has not migrated yet
        raise StateError(f"cannot read the queue index in {cfg.appliance.state_dir}: {e}") from None
    finally:
        idx.close()
    _print_item(d, args.json)
    return 0


# Fields of a queue item or bundle header that hold a time (epoch seconds; 0 or None: unset).
TIME_FIELDS = ("created", "updated", "next_attempt", "sealed", "delivered")


def _print_item(d: dict[str, Any], as_json: bool) -> None:
    """`queue show`: times as local ISO-8601 with their age; --json keeps the numbers and
    adds `<field>_iso` beside each."""
    if as_json:
        print(json.dumps(_with_iso_times(d), indent=2))
        return
    now = time.time()
    for k, v in d.items():
        if k == "deliveries":
            for dl in v:
                _print_delivery("delivery", dl, now)
            continue
        if k == "copies":
            for c in v:
                print(f"{'copy':14} {c['id']} to {c['destination']}: {c['state']}")
                for dl in c["deliveries"]:
                    _print_delivery("  delivery", dl, now)
            continue
        if k == "route":
            print(f"{k:14} {', '.join(v) if v else 'every destination'}")
            continue
        print(f"{k:14} {_when(v, now) if k in TIME_FIELDS else '' if v is None else v}")


def _print_delivery(label: str, dl: dict[str, Any], now: float) -> None:
    """One delivery of `queue show`, and the center's receipt for it when there is one."""
    print(f"{label:14} {dl['destination']}: {dl['state']}, {dl['attempts']} attempt(s)"
          + (f", delivered {_when(dl['delivered'], now)}" if dl["delivered"] else "")
          + (f", last error: {dl['last_error']}" if dl["last_error"] else ""))
    if dl.get("receipt"):
        print(f"{'receipt':14} {dl['destination']}: "
              f"{center_verdict(dl['receipt_stored'], dl['receipt_failed'])} at center"
              f" {dl['receipt_center']} ({dl['receipt']}): {dl['receipt_stored']} of"
              f" {dl['receipt_stored'] + dl['receipt_failed']} instance(s) stored,"
              f" receipt read {_when(dl['receipt_at'], now)}")


def _with_iso_times(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = v
        if k in TIME_FIELDS:
            out[f"{k}_iso"] = local_time(v) if v else None
    return out


def local_time(t: float) -> str:
    """ISO-8601 in the box's local time, with its UTC offset: 2026-12-05T14:03:07+01:00."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).astimezone().isoformat(timespec="seconds")


def _when(t: float | None, now: float) -> str:
    """A time for people: ISO-8601 local, and how long ago (or how soon); "-" when unset."""
    if not t:
        return "-"
    ago = now - t
    return f"{local_time(t)} ({_age(ago)} ago)" if ago >= 0 else f"{local_time(t)} (in {_age(-ago)})"


def cmd_bundle(args: argparse.Namespace) -> int:
    from appliance.bundle import format as bundle

    key_path, explicit = _bundle_key(args)
    if args.sub == "inspect":
        _print_bundle(_inspect(args.file, key_path, explicit), args.json)
        return 0
    if key_path is None:
        raise UsageError("appliance bundle extract: give --key, or --config to use its"
                         f" encryption.appliance_key ({config.DEFAULT_CONFIG} does not exist)")
    key = crypto.load_private_key(key_path)
    args.out.mkdir(parents=True, exist_ok=True)
    with _open_input(args.file) as f:
        manifest = bundle.extract(f, key, args.out)
    print(f"{len(manifest.instances)} instances written to {args.out}")
    return 0


def _inspect(path: Path, key_path: Path | None, explicit: bool) -> dict[str, Any]:
    """A bundle's header, and its manifest when `key_path` opens it (verifying it all)."""
    from appliance.bundle import format as bundle

    with _open_input(path) as f:
        header = bundle.read_header(f)
        out: dict[str, Any] = {
            "bundle_id": header.bundle_id, "format_version": header.version,
            "created": header.created, "suite": header.suite_name, "chunk_size": header.chunk_size,
            "recipients": [r.key_id.hex() for r in header.recipients],
        }
        key = crypto.load_private_key(key_path) if key_path is not None else None
        if key is not None and not explicit and bundle.recipient_key_id(key.public_key()) not in {
                r.key_id for r in header.recipients}:
            # The box's own key, not asked for: a bundle of another box still shows its header.
            out["manifest_not_shown"] = f"encryption.appliance_key ({key_path}) is not a recipient"
        elif key is not None:
            f.seek(0)
            m = bundle.read_manifest(f, key)
            out["study"] = m.study_key
            # ids only: a UID identifies a patient's study as surely as a name does
            out["instances"] = [{"index": e.index, "sop_class": e.sop_class,
                                 "transfer_syntax": e.transfer_syntax, "action": e.action,
                                 "reason": e.reason, "received_size": e.received_size,
                                 "size": e.size, "sha256": e.sha256} for e in m.instances]
    return out


def _bundle_key(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """(the private key file that opens bundles, given explicitly?): --key, else the
    config's encryption.appliance_key (--config, or the default config when it exists)."""
    if args.key is not None:
        return args.key, True
    if args.config is not None or config.DEFAULT_CONFIG.exists():
        return config.load(args.config).encryption.appliance_key, False
    return None, False


def _print_bundle(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_with_iso_times(out), indent=2))
        return
    now = time.time()
    for k, v in out.items():
        if k == "manifest_not_shown":
            print(f"{'manifest':15} not shown: {v}")
        elif k != "instances":
            print(f"{k:15} {_when(v, now) if k in TIME_FIELDS else v}")
    for e in out.get("instances", []):
        print(f"  [{e['index']}] {e['action']:11} {e['received_size']:>10} -> {e['size']:>10}"
              f"  {e['transfer_syntax']}  sop_class {e['sop_class']}")


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
    if s < 2 * 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def cmd_status(args: argparse.Namespace) -> int:
    """The running daemon's counters. With --json every outcome is one JSON document on
    stdout, `running` true, false (nothing listens) or null (cannot tell), and the exit
    code is the same as without --json."""
    if not args.json:
        _print_status(_daemon_status(args.config))
        return 0
    try:
        st = _daemon_status(args.config)
    except ApplianceError as e:
        running = False if isinstance(e, DaemonNotRunningError) else None
        out: dict[str, Any] = {"running": running, "error": str(e)}
        if isinstance(e, ConfigError):
            out["error"], out["problems"] = "the configuration is not valid", e.problems
        print(json.dumps(out, indent=2))
        return e.exit_code
    print(json.dumps({"running": True, **st}, indent=2))
    return 0


def _daemon_status(config_path: Path | None) -> dict[str, Any]:
    from appliance.health import control

    sock = config.load(config_path).control_socket
    try:
        st = control.request(sock, "status", timeout=5.0)
    except PermissionError:
        raise PermissionDeniedError(f"permission denied on {sock}: run as root or the appliance's"
                                    " user") from None
    except control.DaemonUnavailable:  # a hung daemon (timeout) or one that died mid-answer
        raise control.DaemonUnavailable(f"the appliance daemon did not answer on {sock}") from None
    if st is None:
        raise DaemonNotRunningError(f"the appliance daemon is not running (nothing listens on"
                                    f" {sock})")
    result: dict[str, Any] = st
    return result


def _destination_detail(d: dict[str, Any]) -> str:
    """`status`: since when, the last failure's class, failures in a row, the next probe."""
    now = time.time()
    parts = [f"since {_when(d['since'], now)}" if d.get("since") else ""]
    if d.get("last_error") and (d["state"] == "down" or d["failures"]):
        parts.append(f"last error {d['last_error']}")
    if d.get("failures"):
        parts.append(f"{d['failures']} failure(s) in a row")
    if d.get("next_probe_in_s") is not None:
        parts.append(f"next probe in {_age(d['next_probe_in_s'])}")
    shown = [p for p in parts if p]
    return f" ({'; '.join(shown)})" if shown else ""


def _print_status(st: dict[str, Any]) -> None:
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
    for d in st.get("destinations", []):
        copy = " (copy)" if d.get("mode") == "copy" else ""
        print(f"destination    {d['name']}{copy}: {d['state'].upper()}" + _destination_detail(d))
    for rc in st.get("receipts", []):
        late = (f", {rc['overdue']} OVERDUE (uploaded more than {_age(rc['overdue_after_s'])} ago)"
                if rc["overdue"] else "")
        err = f"; reading receipts failed: {rc['last_error']}" if rc.get("last_error") else ""
        print(f"receipts       {rc['destination']}: {rc['awaiting']} uploaded, awaiting the"
              f" center's receipt{late}{err}")
    if "forward" in st:
        fw = st["forward"]
        copies = f" + {fw['copy_lanes']} for copies" if fw.get("copy_lanes") else ""
        print(f"forwarding     {fw['lanes']} lanes + {fw['stat_lanes']} for stat studies{copies};"
              f" {fw['parked']} instance(s) parked (see queue list)")
    for name, stage in st.get("stages", {}).items():
        since = stage["since_progress_s"]
        print(f"stage {name:9}{stage['state']}, {stage['jobs']} job(s), {stage['progress']} steps"
              + (f", last {_age(since)} ago" if since is not None else ""))
    if "ops" in st:
        print(ops_cli.status_line(st["ops"]))
    for problem in st.get("problems", []):
        print(f"STUCK          {problem}")
