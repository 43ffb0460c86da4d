"""`appliance vpn render --out DIR`: the systemd-networkd files for [vpn] (vpn/netdev.py),
and the box's WireGuard key, made if missing (vpn/keys.py).

Run as root at each boot by appliance-vpn.service, before systemd-networkd, into
/run/systemd/network (the root file system is read-only). Without [vpn] it removes the
files an earlier render left there, so that taking [vpn] out of the config takes the
tunnel away at the next boot. It prints the box's public key: the center's WireGuard
server needs it (docs/vpn.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.core import config, durable
from appliance.core.config import Vpn
from appliance.vpn import keys, netdev


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    v = sub.add_parser("vpn", help="the WireGuard VPN ([vpn])")
    v_sub = v.add_subparsers(dest="sub")
    r = v_sub.add_parser("render", parents=[common],
                         help="write the systemd-networkd files for [vpn] (and make its key if missing)")
    r.add_argument("--out", type=Path, required=True,
                   help="folder for the .netdev/.network files (the image: /run/systemd/network)")


def cmd_vpn_render(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if cfg.vpn is None:
        gone = [name for name in netdev.FILES if durable.unlink_durable(args.out / name)]
        print(f"vpn: no [vpn] in the config; {'removed ' + ', '.join(gone) if gone else 'nothing to do'}")
        return 0
    for line in key_lines(cfg.vpn):
        print(line)
    # networkd reads these as the user systemd-network: 0755/0644 whatever the umask
    # (`appliance` runs with 077), and no secret is in them.
    if not args.out.is_dir():
        durable.make_dirs(args.out, mode=0o755)
        args.out.chmod(0o755)
    for name, text in netdev.render(cfg.vpn).items():
        durable.atomic_write(args.out / name, text.encode(), mode=0o644)
        (args.out / name).chmod(0o644)
        print(f"vpn: {args.out / name} written")
    return 0


def key_lines(vpn: Vpn) -> list[str]:
    """`keys init` and `vpn render`: the key made or kept, and its public key."""
    pub, created = keys.ensure_key(vpn.private_key)
    return [f"vpn key: {vpn.private_key} {'created' if created else 'exists, kept'}",
            f"vpn public key: {pub} (the center's WireGuard server lists this box by it)"]
