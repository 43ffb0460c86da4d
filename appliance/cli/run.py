"""`appliance run` (the daemon in the foreground, after the checks `config check` makes)
and `appliance ingest` (the reading center's loop)."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli.config_cmds import check_files, raise_problems
from appliance.core import config, sandbox
from appliance.core.errors import UsageError


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.core import log
    from appliance.daemon import Daemon

    cfg = config.load(args.config)
    # Every problem `config check` finds stops the start here, with exit code 78 from the
    # main process: under systemd that is the code RestartPreventExitStatus= sees (it
    # ignores ExecStartPre=), so a bad config fails the unit once instead of looping.
    found = check_files(cfg)
    if sandbox.read_only(cfg.appliance.state_dir):
        found.append(("appliance.state_dir", _read_only_state_dir(cfg.appliance.state_dir)))
    raise_problems(cfg, found)
    log.setup(cfg.appliance.log_level, cfg.appliance.log_format)
    return Daemon(cfg).run()


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
