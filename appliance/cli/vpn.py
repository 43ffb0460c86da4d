"""`appliance vpn render --out DIR`: the systemd-networkd files for [vpn] and the box's
WireGuard key if missing (appliance/vpn/boot.py; the image runs it at boot as
`python -m appliance.vpn render`, which starts faster)."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.vpn import boot


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    v = sub.add_parser("vpn", help="the WireGuard VPN ([vpn])")
    v_sub = v.add_subparsers(dest="sub")
    r = v_sub.add_parser("render", parents=[common],
                         help="write the systemd-networkd files for [vpn] (and make its key if missing)")
    r.add_argument("--out", type=Path, required=True,
                   help="folder for the .netdev/.network files (the image: /run/systemd/network)")


def cmd_vpn_render(args: argparse.Namespace) -> int:
    print("\n".join(boot.render(args.config, args.out)))
    return 0
