"""`appliance run` (the daemon in the foreground, after the checks `config check` makes)
and `appliance ingest` (the reading center's loop).

`run` also carries the start-side of a desired config (ops/desired.py): before the config
is read, a remote drop-in that a start already tried is rolled back; a start that fails
with an error while one is on probation rolls it back and executes itself again; and a
daemon that asks for a restart (a new drop-in, a rollback) is executed again with the
same command line, keeping its PID (systemd's main process stays the same)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from appliance.cli.config_cmds import check_files, raise_problems
from appliance.core import config, sandbox
from appliance.core.errors import ConfigError, UsageError
from appliance.ops import cli as ops_cli
from appliance.ops import desired


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.daemon import Daemon

    main = args.config or config.DEFAULT_CONFIG
    try:
        desired.at_start(main)  # a start under the remote drop-in already failed: the previous back
    except OSError as e:  # images first: start with what is there, and say why
        print(f"appliance: cannot judge the remote config in {desired.paths(main).dropin.parent}"
              f" ({e.strerror or type(e).__name__}); starting with the files as they are", file=sys.stderr)
    try:
        cfg = _checked(main)
        daemon = Daemon(cfg, checker=remote_checker)
        rc = daemon.run()
    except Exception as e:
        if desired.rollback(main, "did not start"):
            print(f"appliance: the remote config did not start ({type(e).__name__}); the previous"
                  " drop-in is back, restarting", file=sys.stderr)
            reexec()
        raise
    if daemon.reexec:
        reexec()
    return rc


def _checked(main: Path) -> config.Config:
    from appliance.core import log

    cfg = config.load(main)
    # Every problem `config check` finds stops the start here, with exit code 78 from the
    # main process: under systemd that is the code RestartPreventExitStatus= sees (it
    # ignores ExecStartPre=), so a bad config fails the unit once instead of looping.
    found = check_files(cfg)
    if sandbox.read_only(cfg.appliance.state_dir):
        found.append(("appliance.state_dir", _read_only_state_dir(cfg.appliance.state_dir)))
    raise_problems(cfg, found)
    log.setup(cfg.appliance.log_level, cfg.appliance.log_format)
    return cfg


def remote_checker(main: Path, data: dict[str, Any]) -> list[str]:
    """A remote drop-in checked as `appliance config check` checks a config: parsed with
    the other files, then every file it names (the sandbox too, when the unit is installed)."""
    try:
        cfg = config.parse(*config.read(main, {desired.paths(main).dropin: data}))
    except ConfigError as e:
        return e.problems
    found = check_files(cfg) + ops_cli.check(cfg)[0]
    if sandbox.unit_installed():
        found += sandbox.problems(cfg, sandbox.granted(), sandbox.dropin_path())
    return [f"{key}: {msg}" for key, msg in found]


def reexec() -> NoReturn:
    """The same command line again, in this process (sys.orig_argv: `python -m appliance`
    or the `appliance` script alike)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606 - ourselves


def _read_only_state_dir(p: Path) -> str:
    return (f"{p} is on a read-only file system here; under the systemd unit a state_dir outside"
            f" /var/lib/appliance needs the drop-in {sandbox.dropin_path()}: write it with"
            " `appliance config systemd-dropin --write`, then `systemctl daemon-reload`")


def cmd_ingest(args: argparse.Namespace) -> int:
    from appliance.ingest import commands
    from appliance.ingest import config as center

    if args.config is None:
        raise UsageError("appliance ingest: --config CENTER.toml is required")
    return commands.run(center.load(args.config), args.once)
