"""`appliance keys init`: create the keys the config names that are missing, never
replace one (a center config: the center's keys, appliance/ingest/commands.py)."""

from __future__ import annotations

import argparse

from cryptography.hazmat.primitives import serialization

from appliance.cli.config_cmds import is_center
from appliance.core import config, crypto, durable
from appliance.core.errors import KeyFileError
from appliance.ops import cli as ops_cli
from appliance.vpn import boot as vpn_boot


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Create the keys the config names that do not exist yet; never replace one."""
    if is_center(args):
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
    if cfg.vpn is not None:
        try:
            lines = vpn_boot.key_lines(cfg.vpn)
        except PermissionError:
            # The image's appliance-keys.service runs as the appliance user, who may not
            # even look into /data/vpn (networkd's): the root unit makes that key.
            lines = [f"vpn key: {cfg.vpn.private_key} is not this user's to make or read;"
                     " `appliance vpn render` as root makes it (appliance-vpn.service)"]
        print("\n".join(lines))
    return 0
