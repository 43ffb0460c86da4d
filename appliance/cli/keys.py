"""`appliance keys init`: create the keys the config names that are missing, never
replace one (a center config: the center's keys, appliance/ingest/commands.py); the keys
it made are audited (Security Alert, Security Configuration: cli/audited.py);
`appliance keys show`: the box's identity (identity.py), public files only, not audited."""

from __future__ import annotations

import argparse

from cryptography.hazmat.primitives import serialization

from appliance.cli import audited
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
    lines = make_keys(cfg)
    for line in lines:
        print(line)
    audit_made(cfg, lines)
    return 0


def audit_made(cfg: config.Config, lines: list[str]) -> None:
    """The keys `make_keys` said it made (its `lines`), audited in `cfg`'s trail; nothing
    when it made none. Key use: a key made is a change of the box's security configuration."""
    made = [line for line in lines if " created" in line or "written again" in line]
    if made:
        audited.record(cfg, lambda t: t.keys_created(audited.operator(), made))


def cmd_keys_show(args: argparse.Namespace) -> int:
    """The box's identity (appliance/cli/identity.py), from public files only."""
    from appliance.cli import identity

    for line in identity.lines(config.load(args.config)):
        print(line)
    return 0


def make_keys(cfg: config.Config) -> list[str]:
    """Create the keys `cfg` names that are missing (never replace one); lines to print."""
    out = []
    p = cfg.spool.key_file
    if p.exists():
        crypto.load_spool_key(p)
        out.append(f"spool key: {p} exists, kept")
    else:
        crypto.create_spool_key(p)
        out.append(f"spool key: {p} created")
    priv, pub = cfg.encryption.appliance_key, cfg.encryption.appliance_public_key
    if priv.exists():
        key = crypto.load_private_key(priv)
        out.append(f"appliance key: {priv} exists, kept")
        if not pub.exists():
            # The public half is derived from the private key, so recreating a lost
            # copy changes nothing that the reading center already trusts.
            durable.make_dirs(pub.parent)
            durable.atomic_write(pub, key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
                mode=0o644)
            out.append(f"appliance public key: {pub} was missing, written again from {priv}")
    else:
        if pub.exists():
            raise KeyFileError(f"{pub} exists but its private key {priv} does not; "
                               "move it aside first")
        crypto.create_keypair(priv, pub)
        out.append(f"appliance key: {priv} created, public key {pub}")
    out += ops_cli.keys_init(cfg)
    if cfg.vpn is not None:
        try:
            out += vpn_boot.key_lines(cfg.vpn)
        except PermissionError:
            # The image's appliance-keys.service runs as the appliance user, who may not
            # even look into /data/vpn (networkd's): the root unit makes that key.
            out.append(f"vpn key: {cfg.vpn.private_key} is not this user's to make or read;"
                       " `appliance vpn render` as root makes it (appliance-vpn.service)")
    return out
