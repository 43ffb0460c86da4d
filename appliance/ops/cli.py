"""`appliance fleet`: the operations center's side of enrollment.

    appliance fleet ca init DIR [--broker-host HOST ...]
                  a fleet CA in DIR: ca.pem/ca.key, crl.pem, the broker's certificate
                  (broker.pem/.key, for HOSTs; default localhost and 127.0.0.1) and the
                  operations center's client certificates (ops-center.pem/.key: commands
                  and desired config; ops-center-serve, ops-center-status: read only)
    appliance fleet ca center DIR
                  the operations center's client certificates a CA made before lacks
                  (ops-center-serve, ops-center-status); never overwrites one
    appliance fleet sign BOX.csr --ca DIR [--out BOX.pem] [--days N]
                  sign a box's CSR (made by `appliance keys init`), enrol the box in
                  DIR/roster (the fleet view subscribes to it by name); prints its name
    appliance fleet crl --ca DIR [--revoke BOX.pem ...]
                  re-issue the CRL (valid a year; the broker refuses everyone once it is
                  out of date), adding the certificates to revoke; their lines in
                  DIR/roster become `# revoked` comments, and it prints each box that
                  thereby left the roster (and the fleet view)
    appliance fleet keys init DIR
                  the operations center's Ed25519 command key: DIR/command.key (0600) and
                  DIR/command.pub (for the boxes' [operations] command_keys); prints its key_id
    appliance fleet send BOX OP [--arg K=V ...] --key KEY --ca DIR [--host H] [--port N]
                  sign a command (ops/commands.py), publish it on appliance/BOX/cmd with the
                  operations center's certificate (DIR/ops-center.pem), wait for the box's
                  result and print it (JSON). diagnostics takes --out FILE (the document
                  comes back in parts) or --to sftp (the box uploads it to its
                  [operations.diagnostics] place; the result names the file). Exit 0
                  when the box ran it (code 200), 1 when it refused or failed it, 69 when
                  no result came within --timeout.
                  The broker lets one client per certificate in: a `fleet send` takes the
                  session of another client running with the ops-center certificate (another
                  `fleet send`, a `fleet config push`), never that of `fleet serve` or
                  `fleet status` (their own certificates).
    appliance fleet status --ca DIR [--json] | fleet serve --ca DIR --bind IP:PORT
                  the fleet view: a table (or JSON) once, or a page and /metrics
                  (ops/fleetcli.py, ops/fleet.py, ops/fleetweb.py)
    appliance fleet config push FILE --version N --box B [--group NAME --boxes B2 ...] --key KEY --ca DIR
                  a signed desired config (ops/push.py): to B, and to the rest only once
                  B reports it applied and healthy.

Also the ops-link parts of `keys init` and `config check` (`keys_init`, `check`), so
that appliance/cli/ only calls in here. Errors are UsageError / KeyFileError lines.
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.core import config, crypto, durable
from appliance.core.errors import EX_DATAERR, EX_UNAVAILABLE, EX_USAGE, KeyFileError, UsageError
from appliance.ops import commands, diagnostics, fleetcli, pki
from appliance.ops import push as config_push


def add_parsers(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="operations center: fleet CA and box certificates")
    fleet_sub = fleet.add_subparsers(dest="sub")
    ca = fleet_sub.add_parser("ca", help="the fleet CA")
    ca_sub = ca.add_subparsers(dest="ca_sub")
    init = ca_sub.add_parser("init", help="create a fleet CA, the broker's and the center's certificates")
    init.add_argument("dir", type=Path)
    init.add_argument("--broker-host", action="append", default=None,
                      help="a name or IP address of the broker (repeat; default localhost, 127.0.0.1)")
    center = ca_sub.add_parser("center", help="issue the operations center's client certificates"
                               " a fleet CA made before lacks")
    center.add_argument("dir", type=Path)
    sign = fleet_sub.add_parser("sign", help="sign a box's certificate signing request")
    sign.add_argument("csr", type=Path)
    sign.add_argument("--ca", type=Path, required=True, help="the fleet CA folder")
    sign.add_argument("--out", type=Path, default=None, help="default: the CSR's path with .pem")
    sign.add_argument("--days", type=int, default=pki.BOX_DAYS)
    crl = fleet_sub.add_parser("crl", help="re-issue the CRL, revoking certificates")
    crl.add_argument("--ca", type=Path, required=True, help="the fleet CA folder")
    crl.add_argument("--revoke", type=Path, action="append", default=[], help="a certificate to revoke")
    keys = fleet_sub.add_parser("keys", help="the operations center's command key")
    keys_sub = keys.add_subparsers(dest="keys_sub")
    kinit = keys_sub.add_parser("init", help="create the Ed25519 command key (command.key, command.pub)")
    kinit.add_argument("dir", type=Path)
    send = fleet_sub.add_parser("send", help="sign and send a command to a box, wait for its result")
    send.add_argument("box")
    send.add_argument("op", help=", ".join(commands.OPS))
    send.add_argument("--arg", action="append", default=[], metavar="K=V",
                      help="an argument (V: true or false as booleans, else a string)")
    send.add_argument("--key", type=Path, required=True, help="the command key (fleet keys init)")
    send.add_argument("--ca", type=Path, required=True, help="the fleet CA folder (ops-center.pem/.key)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=8883)
    send.add_argument("--ttl", type=float, default=300.0, help="seconds the command stays valid")
    send.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait for the result (default 30; 90 with --to sftp)")
    send.add_argument("--out", type=Path, default=None,
                      help="diagnostics: the file to write the box's document to (JSON)")
    send.add_argument("--to", choices=["sftp"], default=None,
                      help="diagnostics: have the box upload its document to its"
                           " [operations.diagnostics] SFTP place instead (the result names the file)")
    fleetcli.add_parsers(fleet_sub)
    config_push.add_parser(fleet_sub)


def dispatch(args: argparse.Namespace) -> int:
    if args.sub == "ca":
        if getattr(args, "ca_sub", None) == "center":
            print("\n".join(pki.center_init(args.dir)))
            return 0
        if getattr(args, "ca_sub", None) != "init":  # `fleet ca` alone: its help, as main does
            sys.stderr.write(args.help_of_level.format_help())
            return EX_USAGE
        hosts = tuple(args.broker_host or ("localhost", "127.0.0.1"))
        print("\n".join(pki.ca_init(args.dir, hosts)))
        return 0
    if args.sub == "keys":
        if getattr(args, "keys_sub", None) != "init":
            sys.stderr.write(args.help_of_level.format_help())
            return EX_USAGE
        print(keys_init_center(args.dir))
        return 0
    if args.sub == "send":
        return send(args)
    if args.sub == "status":
        return fleetcli.status(args)
    if args.sub == "serve":
        return fleetcli.serve(args)
    if args.sub == "config":
        return config_push.push(args)
    if args.sub == "crl":
        print("\n".join(pki.reissue_crl(args.ca, tuple(args.revoke))))
        return 0
    out = args.out or args.csr.with_suffix(".pem")
    name = pki.sign_csr(pki.load_ca(args.ca), args.csr, out, max(1, args.days))
    print(f"{name}: {out}")
    return 0


def keys_init_center(directory: Path) -> str:
    """DIR/command.key and DIR/command.pub (never overwrites); returns a line with the key_id."""
    from cryptography.hazmat.primitives import serialization

    key = Ed25519PrivateKey.generate()
    crypto.create_private_file(directory / "command.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub = directory / "command.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return f"command key {commands.key_id(key.public_key())}: {directory / 'command.key'}, {pub}"


def parse_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise UsageError(f"--arg {pair!r}: give K=V")
        out[k] = {"true": True, "false": False}.get(v, v)
    return out


def send(args: argparse.Namespace) -> int:
    if (args.op == "diagnostics") != (args.out is not None or args.to is not None):
        raise UsageError("--out FILE (or --to sftp) goes with diagnostics, and diagnostics needs one")
    if args.out is not None and args.to is not None:
        raise UsageError("--out FILE or --to sftp: the document comes back, or goes to the box's"
                         " SFTP place, not both")
    key: Ed25519PrivateKey = crypto.load_private_key_of(args.key, Ed25519PrivateKey, "Ed25519")
    cmd_args = {**parse_args(args.arg), **({"to": args.to} if args.to else {})}
    cmd = commands.body(args.box, args.op, cmd_args, key, now=time.time(), ttl_s=args.ttl)
    timeout = args.timeout if args.timeout is not None else 90.0 if args.to else 30.0
    parts = diagnostics.Assembler(cmd["cmd_id"]) if args.out is not None else None
    try:
        result = publish_and_wait(args.host, args.port, args.ca, args.box, commands.envelope(cmd, key),
                                  cmd["cmd_id"], timeout, parts)
    except OSError as e:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
        print(f"cannot reach the broker {args.host}:{args.port} ({type(e).__name__})", file=sys.stderr)
        return EX_UNAVAILABLE
    if result is None:
        print(f"no result from {args.box} within {timeout:g} s (cmd_id {cmd['cmd_id']})",
              file=sys.stderr)
        return EX_UNAVAILABLE
    print(json.dumps(result, indent=2, sort_keys=True))
    if parts is not None and result.get("code") == 200:
        return _write_diagnostics(parts, args.out)
    if args.to and result.get("code") == 200:
        r = result.get("result") or {}
        print(f"diagnostics: {r.get('file')} on the box's SFTP place ({r.get('bytes')} bytes,"
              f" sha256 {r.get('sha256')})", file=sys.stderr)
    return 0 if result.get("code") == 200 else 1


def _write_diagnostics(parts: diagnostics.Assembler, out: Path) -> int:
    if not parts.complete():
        print(f"diagnostics: {len(parts.got)} of {parts.parts or '?'} parts arrived", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        doc = parts.document()
    except (ValueError, OSError, EOFError) as e:
        print(f"diagnostics: the parts do not make a document ({e})", file=sys.stderr)
        return EX_DATAERR
    durable.atomic_write(out, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)
    print(f"diagnostics: {out} ({len(doc.get('log', []))} log events)", file=sys.stderr)
    return 0


def publish_and_wait(host: str, port: int, ca: Path, box: str, payload: bytes, cmd_id: str,
                     timeout: float, parts: diagnostics.Assembler | None = None) -> dict[str, Any] | None:
    """Publish a command as the operations center and wait for its result (None: none came);
    with `parts`, also collect the command's diagnostics parts (until complete, or the
    deadline)."""
    import ssl
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(m.payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("cmd_id") != cmd_id:
            return
        if m.topic.endswith("/cmd/result"):
            got.update(doc)
        elif parts is not None:
            with contextlib.suppress(ValueError, binascii.Error):
                parts.add(doc)
        if got and (parts is None or parts.complete() or got.get("code") != 200):
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=pki.OPS_CENTER_CN, protocol=mqtt.MQTTv311,
                    clean_session=True)
    ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(ca / f"{pki.OPS_CENTER_CN}.pem"), str(ca / f"{pki.OPS_CENTER_CN}.key"))
    c.tls_set_context(ctx)
    c.on_message = on_message
    c.on_subscribe = lambda c, u, mid, codes, props: ready.set()
    topics = [(f"appliance/{box}/cmd/result", 1)]
    if parts is not None:
        topics.append((f"appliance/{box}/diagnostics/{cmd_id}", 1))
    c.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else c.subscribe(topics)
    deadline = time.monotonic() + timeout
    c.loop_start()
    try:
        c.connect(host, port, keepalive=30)
        if not ready.wait(max(0.0, deadline - time.monotonic())):
            return None
        c.publish(f"appliance/{box}/cmd", payload, qos=1)
        done.wait(max(0.0, deadline - time.monotonic()))
        return got or None
    finally:
        c.disconnect()
        c.loop_stop()


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
    last = ops.get("last_command")
    cmd = (f"; last command {last['op']} -> {last['code']} at"
           f" {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['ts']))}" if last else "")
    return (f"ops link       {link} (conn_seq {ops.get('conn_seq')});"
            f" {ops.get('waiting', 0)} event(s) waiting{gap}{cmd}")


def config_line(c: dict[str, Any]) -> str:
    """The desired config in `appliance status`: the applied version (or that a technician
    cleared it on site), one on probation, the last rolled back or refused (ops/desired.py)."""
    def at(ts: Any) -> str:
        return f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))}" if ts else ""
    if c.get("cleared") is not None and c.get("cleared") in (c.get("version"), 0):
        when = at(c.get("cleared_at"))
        parts = [f"remote config  none in force (version {c['cleared']} cleared on site{when})"]
    elif c.get("version"):
        parts = [f"remote config  version {c['version']} applied"]
        if c.get("cleared") is not None:
            parts.append(f"version {c['cleared']} cleared on site{at(c.get('cleared_at'))}")
    else:
        parts = ["remote config  none applied"]
    if c.get("pending") is not None:
        parts.append(f"version {c['pending']} on probation")
    if c.get("rolled_back") is not None:
        parts.append(f"version {c['rolled_back']} ROLLED BACK{at(c.get('rolled_back_at'))}")
    if c.get("refused") is not None:
        parts.append(f"version {c['refused']} refused ({c.get('refused_code')})")
    return "; ".join(parts)
