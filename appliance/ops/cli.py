"""`appliance fleet`: the operations center's side of enrollment.

    appliance fleet ca init DIR [--broker-host HOST ...]
                  a fleet CA in DIR: ca.pem/ca.key, crl.pem, the broker's certificate
                  (broker.pem/.key, for HOSTs; default localhost and 127.0.0.1) and the
                  operations center's client certificate (ops-center.pem/.key)
    appliance fleet sign BOX.csr --ca DIR [--out BOX.pem] [--days N]
                  sign a box's CSR (made by `appliance keys init`); prints the box's name
    appliance fleet crl --ca DIR [--revoke BOX.pem ...]
                  re-issue the CRL (valid a year; the broker refuses everyone once it is
                  out of date), adding the certificates to revoke

Also the ops-link parts of `keys init` and `config check` (`keys_init`, `check`), so
that appliance/cli.py only calls in here. Errors are UsageError / KeyFileError lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.core import config, crypto
from appliance.core.errors import EX_USAGE, KeyFileError
from appliance.ops import pki


def add_parsers(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="operations center: fleet CA and box certificates")
    fleet_sub = fleet.add_subparsers(dest="sub")
    ca = fleet_sub.add_parser("ca", help="the fleet CA")
    ca_sub = ca.add_subparsers(dest="ca_sub")
    init = ca_sub.add_parser("init", help="create a fleet CA, the broker's and the center's certificates")
    init.add_argument("dir", type=Path)
    init.add_argument("--broker-host", action="append", default=None,
                      help="a name or IP address of the broker (repeat; default localhost, 127.0.0.1)")
    sign = fleet_sub.add_parser("sign", help="sign a box's certificate signing request")
    sign.add_argument("csr", type=Path)
    sign.add_argument("--ca", type=Path, required=True, help="the fleet CA folder")
    sign.add_argument("--out", type=Path, default=None, help="default: the CSR's path with .pem")
    sign.add_argument("--days", type=int, default=pki.BOX_DAYS)
    crl = fleet_sub.add_parser("crl", help="re-issue the CRL, revoking certificates")
    crl.add_argument("--ca", type=Path, required=True, help="the fleet CA folder")
    crl.add_argument("--revoke", type=Path, action="append", default=[], help="a certificate to revoke")


def dispatch(args: argparse.Namespace) -> int:
    if args.sub == "ca":
        if getattr(args, "ca_sub", None) != "init":  # `fleet ca` alone: its help, as main does
            sys.stderr.write(args.help_of_level.format_help())
            return EX_USAGE
        hosts = tuple(args.broker_host or ("localhost", "127.0.0.1"))
        print("\n".join(pki.ca_init(args.dir, hosts)))
        return 0
    if args.sub == "crl":
        print("\n".join(pki.reissue_crl(args.ca, tuple(args.revoke))))
        return 0
    out = args.out or args.csr.with_suffix(".pem")
    name = pki.sign_csr(pki.load_ca(args.ca), args.csr, out, max(1, args.days))
    print(f"{name}: {out}")
    return 0


def csr_path(ops: config.Operations) -> Path:
    """Where `keys init` puts the box's CSR: beside its certificate, with .csr."""
    return ops.cert.with_suffix(".csr")


def keys_init(cfg: config.Config) -> list[str]:
    if cfg.operations is None:
        return []
    return pki.box_key_and_csr(cfg.appliance.name, cfg.operations.key, csr_path(cfg.operations))


def check(cfg: config.Config) -> tuple[list[tuple[str, str]], list[str]]:
    """(problems as (dotted key, text), warnings) of the ops link's files."""
    ops = cfg.operations
    if ops is None:
        return [], []
    found: list[tuple[str, str]] = []
    try:
        pki.load_key(ops.key)
    except KeyFileError as e:
        found.append(("operations.key", str(e)))
    errors, warnings = pki.cert_problems(ops.cert, cfg.appliance.name, ops.ca)
    found += [("operations.cert", e) for e in errors]
    for i, p in enumerate(ops.command_keys):
        try:
            crypto.load_public_key_of(p, Ed25519PublicKey, "Ed25519")
        except KeyFileError as e:
            found.append((f"operations.command_keys[{i}]", str(e)))
    return found, warnings


def status_line(ops: dict[str, Any]) -> str:
    """The ops link in `appliance status`: connected or not, since, events waiting."""
    link = (f"connected since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ops['since']))}"
            if ops.get("connected") and ops.get("since") else "NOT CONNECTED")
    gap = f", {ops['dropped']} dropped (outbox full)" if ops.get("dropped") else ""
    return (f"ops link       {link} (conn_seq {ops.get('conn_seq')});"
            f" {ops.get('waiting', 0)} event(s) waiting{gap}")
