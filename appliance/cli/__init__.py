"""The `appliance` command line.

    appliance run            [--config PATH]     run the daemon in the foreground
    appliance config check   [--config PATH] [--systemd]
                                                 print the effective config, or every problem
    appliance config systemd-dropin [--config PATH] [--write]
                                                 the unit drop-in for paths outside /var/lib/appliance
    appliance config import  SRC [--config-dir DIR] [--changed-marker FILE]
                                                 check SRC/appliance.toml (+ conf.d) and install it
                                                 under /data/config; the verdict to SRC/appliance-result.txt
    appliance keys init      [--config PATH]     create missing keys (never overwrites)
    appliance keys show      [--config PATH]     the box's identity (name, version, slot, fingerprints)
    appliance queue list     [--config PATH] [--json]
    appliance queue show|hold|release|retry|delete ID|--all [--config PATH]
    appliance bundle inspect FILE [--key KEY | --config PATH] [--json]
    appliance bundle extract FILE [--key KEY | --config PATH] --out DIR
    appliance status         [--config PATH] [--json]
    appliance vpn render     --out DIR [--config PATH]
                                                 the systemd-networkd files for [vpn] (root, at boot)
    appliance audit show     [--config PATH] [--all]
                                                 the local audit trail, opened (holds patient IDs)
    appliance ingest         --config CENTER.toml [--once]
                                                 reading center: bundles from the drop folder into the PACS
    appliance update FILE    [--config PATH] [--no-reboot] [--once]
                                                 install an update bundle (RAUC) and reboot into it
    appliance update-gate    [--config PATH]     the mark-good unit: keep the booted slot if healthy
    appliance update-fetch   --url U --sha256 H  the ops center's `update` (the daemon starts it)
    appliance fleet ca init DIR | fleet sign BOX.csr --ca DIR | fleet status | fleet serve
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

This module owns the parser, the dispatch and that one handler; each command lives beside
it: run.py (run, ingest), config_cmds.py (config check, systemd-dropin, and the file
checks `run` makes too), config_import.py (config import), keys.py, identity.py (what
`keys show` prints), queue.py, bundle.py, status.py, audit.py, vpn.py, switches.py,
echo.py, update.py; times.py shows times.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.cli import switches
from appliance.cli.audit import cmd_audit_show
from appliance.cli.bundle import cmd_bundle
from appliance.cli.config_cmds import cmd_config_check, cmd_systemd_dropin
from appliance.cli.config_import import cmd_config_import
from appliance.cli.echo import cmd_echo
from appliance.cli.keys import cmd_keys_init, cmd_keys_show
from appliance.cli.queue import cmd_queue_change, cmd_queue_list
from appliance.cli.run import cmd_ingest, cmd_run
from appliance.cli.status import cmd_diagnostics, cmd_status
from appliance.cli.update import add_parsers as add_update_parsers
from appliance.cli.update import cmd_update, cmd_update_fetch, cmd_update_gate
from appliance.cli.vpn import add_parsers as add_vpn_parsers
from appliance.cli.vpn import cmd_vpn_render
from appliance.core import config, sandbox
from appliance.core.errors import EX_USAGE, ApplianceError, ConfigError, UsageError
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
                        help=f"main config file (default {config.site_config()} when it exists,"
                             f" else {config.DEFAULT_CONFIG})")
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
    imp = cfg_sub.add_parser("import", help="check a config from an APPLCONFIG stick or partition"
                                            " and install it under /data if it is valid")
    imp.add_argument("src", type=Path, help="the mounted APPLCONFIG folder (appliance.toml, conf.d/)")
    imp.add_argument("--config-dir", type=Path, default=config.SITE_CONFIG_DIR,
                     help=f"where the config is installed (default {config.SITE_CONFIG_DIR})")
    imp.add_argument("--changed-marker", type=Path, default=None,
                     help="a file to create when a new config was installed (to restart the daemon)")
    imp.add_argument("--systemd", action="store_true",
                     help="also check the folders against the systemd unit's writable paths"
                          " (automatic when the unit is installed)")
    imp.add_argument("--unit-dir", type=Path, default=sandbox.UNIT_DIR, help=argparse.SUPPRESS)
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="sub")
    keys_sub.add_parser("init", parents=[common],
                        help="create the spool key and appliance key pair if missing")
    keys_sub.add_parser("show", parents=[common],
                        help="the box's identity: name, version, slot, public key fingerprints")
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
    ec = sub.add_parser("echo", parents=[common],
                        help="does each destination answer (C-ECHO, SSH, HTTP, folder), and if not, why")
    ec.add_argument("destinations", nargs="*", metavar="DEST", help="default: every destination")
    dg = sub.add_parser("diagnostics", parents=[common],
                        help="write the running daemon's diagnostics (no patient data) to a file")
    dg.add_argument("--out", type=Path, required=True)
    ing = sub.add_parser("ingest", parents=[common],
                         help="reading center: store bundles from the drop folder into the PACS")
    ing.add_argument("--once", action="store_true", help="one pass, print the counts, exit")
    au = sub.add_parser("audit", help="the local audit trail (IHE ATNA)")
    au_sub = au.add_subparsers(dest="sub")
    aus = au_sub.add_parser("show", parents=[common],
                            help="print the audit messages, opened (they hold patient IDs)")
    aus.add_argument("--all", action="store_true", help="the rotated files too, oldest first")
    switches.add_parsers(sub, common)
    add_vpn_parsers(sub, common)
    add_update_parsers(sub, common)
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
    if args.cmd == "audit":
        return cmd_audit_show(args)
    if args.cmd == "config":
        if args.sub == "import":
            return cmd_config_import(args)
        return cmd_config_check(args) if args.sub == "check" else cmd_systemd_dropin(args)
    if args.cmd == "keys":
        return cmd_keys_init(args) if args.sub == "init" else cmd_keys_show(args)
    if args.cmd == "queue":
        return cmd_queue_list(args) if args.sub == "list" else cmd_queue_change(args)
    if args.cmd == "bundle":
        return cmd_bundle(args)
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "echo":
        return cmd_echo(args)
    if args.cmd == "diagnostics":
        return cmd_diagnostics(args)
    if args.cmd == "ingest":
        return cmd_ingest(args)
    if args.cmd == "update":
        return cmd_update(args)
    if args.cmd == "update-gate":
        return cmd_update_gate(args)
    if args.cmd == "update-fetch":
        return cmd_update_fetch(args)
    if args.cmd in ("forward", "destination"):
        return switches.cmd_switch(args)
    if args.cmd == "log-level":
        return switches.cmd_log_level(args)
    if args.cmd == "vpn":
        return cmd_vpn_render(args)
    if args.cmd == "fleet":
        return ops_cli.dispatch(args)
    raise UsageError(f"unknown command {args.cmd}")
