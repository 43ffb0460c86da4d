"""What `appliance vpn render` does (the CLI and `python -m appliance.vpn` both call it):
the systemd-networkd files for [vpn] (netdev.py) into a folder, and the box's WireGuard
key, made if missing (keys.py).

Run as root at each boot by appliance-vpn.service, before systemd-networkd, into
/run/systemd/network (the root file system is read-only), as `python -m appliance.vpn`:
networkd, and so the whole network, waits for it, and importing only this (not the
whole command line) costs 8 times less CPU (0.06 s instead of 0.47 s on the build
machine, `appliance vpn render` against `python -m appliance.vpn render` with a config
without [vpn]). Without [vpn] it removes the
files an earlier render left there, so that taking [vpn] out of the config takes the
tunnel away at the next boot. It reports the box's public key: the center's WireGuard
server needs it (docs/vpn.md).

Fails with ConfigError (the config) or KeyFileError (the key), exit 78 both.
"""

from __future__ import annotations

from pathlib import Path

from appliance.core import config, durable
from appliance.core.config import Vpn
from appliance.vpn import keys, netdev


def render(config_path: Path | None, out: Path) -> list[str]:
    """Write (or remove) the networkd files for the config's [vpn]; the lines to print."""
    cfg = config.load(config_path)
    if cfg.vpn is None:
        gone = [name for name in netdev.FILES if durable.unlink_durable(out / name)]
        return [f"vpn: no [vpn] in the config; {'removed ' + ', '.join(gone) if gone else 'nothing to do'}"]
    lines = key_lines(cfg.vpn)
    # networkd reads these as the user systemd-network: 0755/0644 whatever the umask
    # (`appliance` runs with 077), and no secret is in them.
    if not out.is_dir():
        durable.make_dirs(out, mode=0o755)
        out.chmod(0o755)
    for name, text in netdev.render(cfg.vpn).items():
        durable.atomic_write(out / name, text.encode(), mode=0o644)
        (out / name).chmod(0o644)
        lines.append(f"vpn: {out / name} written")
    return lines


def key_lines(vpn: Vpn) -> list[str]:
    """`keys init` and `vpn render`: the key made or kept, and its public key."""
    pub, created = keys.ensure_key(vpn.private_key)
    return [f"vpn key: {vpn.private_key} {'created' if created else 'exists, kept'}",
            f"vpn public key: {pub} (the center's WireGuard server lists this box by it)"]
