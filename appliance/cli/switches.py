"""`appliance forward pause|resume`, `appliance destination off|on NAME` and `appliance
log-level LEVEL`: an operator's switches, carried out by the running daemon through its
control socket (as the operations center's signed commands are). With no daemon running,
the forwarding switches are set in the state dir under the daemon's lock, so that the box
starts paused or with the destination off; the log level exists only in a running daemon.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from appliance.core import config
from appliance.core.errors import DaemonNotRunningError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    fw = sub.add_parser("forward", help="pause or resume forwarding (receiving goes on)")
    fw_sub = fw.add_subparsers(dest="sub")
    fw_sub.add_parser("pause", parents=[common],
                      help="start no new send until resumed (kept over a restart)")
    fw_sub.add_parser("resume", parents=[common], help="forward again")
    d = sub.add_parser("destination", help="switch a destination off or on")
    d_sub = d.add_subparsers(dest="sub")
    for verb, text in (("off", "send nothing to it, fail over past it, do not probe it (kept"
                               " over a restart)"),
                       ("on", "use it again")):
        v = d_sub.add_parser(verb, parents=[common], help=text)
        v.add_argument("name", help="the destination's name in the config")
    lv = sub.add_parser("log-level", parents=[common],
                        help="change the running daemon's log level until it restarts")
    lv.add_argument("level", choices=["debug", "info", "warning", "error"])


def cmd_switch(args: argparse.Namespace) -> int:
    from appliance.health import control

    cfg = config.load(args.config)
    req: dict[str, Any] = {"verb": args.sub}
    if args.cmd == "destination":
        req["destination"] = args.name
    result = control.request(cfg.control_socket, "forward.switch", req)
    if result is None:
        result = _without_daemon(cfg, req)
    what = {"pause": "forwarding paused", "resume": "forwarding resumed",
            "off": f"destination {result['target']} off", "on": f"destination {result['target']} on"}
    print(what[args.sub] if result["changed"] else f"{what[args.sub]} already")
    return 0


def _without_daemon(cfg: config.Config, req: dict[str, Any]) -> dict[str, Any]:
    from appliance.daemon import audit_trail, state_lock
    from appliance.forward.controls import Controls
    from appliance.health.control import operator_name

    verb, name = req["verb"], req.get("destination")
    who = operator_name(os.getuid())
    with state_lock(cfg.appliance.state_dir):
        c = Controls(cfg.appliance.state_dir, [d.name for d in cfg.destinations])
        acts: dict[str, Callable[[], bool]] = {"pause": lambda: c.pause(who), "resume": c.resume,
                "off": lambda: c.switch_off(str(name), who), "on": lambda: c.switch_on(str(name))}
        changed = acts[verb]()
    target = str(name) if name else "forwarding"
    audit_trail(cfg).command(who, verb, target, True, "changed" if changed else "already so",
                             area="forward")
    return {"verb": verb, "target": target, "changed": changed}


def cmd_log_level(args: argparse.Namespace) -> int:
    from appliance.health import control

    cfg = config.load(args.config)
    result = control.request(cfg.control_socket, "log.level", {"level": args.level})
    if result is None:
        raise DaemonNotRunningError("the appliance daemon is not running: its log level at start"
                                    " is [appliance] log_level in the config")
    print(f"log level {result['level']} (was {result['was']}) until the daemon restarts")
    return 0
