"""`appliance fleet config push`: a desired config to one box, then to the rest of a group.

    appliance fleet config push FILE --version N --box B [--group NAME --boxes B2 B3 ...]
                  --key KEY --ca DIR [--host H] [--port N] [--ttl S] [--timeout S]

FILE (a TOML drop-in) is checked here for what a box refuses anyway (not TOML, a key of
desired.FORBIDDEN), signed with the center's command key (ops/desired.py: a command
envelope, op "config") and published retained on `appliance/B/config` with the center's
certificate. Then it waits for B's `state` to report version N applied with no problem
(`config.version` N, nothing pending, `problems` 0). Only then is it published to each
box of `--boxes` (the rest of the group `--group` names, for the output), and waited for.
A box that reports N rolled back or refused stops the push: nothing more is published.
Output: one JSON document, per box the outcome ("applied", "rolled back", "refused",
"no answer", "not sent"). Exit 0 all applied, 1 one rolled back or refused, 69 no answer
within --timeout (per box).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from appliance.core import crypto
from appliance.core.errors import EX_UNAVAILABLE, EX_USAGE, UsageError
from appliance.ops import desired, pki

MAX_STATE_BYTES = 64 << 10


def add_parser(fleet_sub: Any) -> None:
    cfg = fleet_sub.add_parser("config", help="desired config: push a signed drop-in to boxes")
    cfg_sub = cfg.add_subparsers(dest="config_sub")
    push = cfg_sub.add_parser("push", help="to one box, then (once it is healthy) to the rest")
    push.add_argument("file", type=Path, help="the TOML drop-in")
    push.add_argument("--version", type=int, required=True, help="higher than the applied one")
    push.add_argument("--box", required=True, help="the first box")
    push.add_argument("--group", default=None, help="the group's name (shown in the output)")
    push.add_argument("--boxes", nargs="*", default=[], help="the rest of the group")
    push.add_argument("--key", type=Path, required=True, help="the command key (fleet keys init)")
    push.add_argument("--ca", type=Path, required=True, help="the fleet CA folder (ops-center.pem/.key)")
    push.add_argument("--host", default="127.0.0.1")
    push.add_argument("--port", type=int, default=8883)
    push.add_argument("--ttl", type=float, default=desired.PUSH_TTL_S,
                      help=f"seconds the config may wait for a box that is offline (default"
                           f" {desired.PUSH_TTL_S:.0f}: 7 days; at most {desired.MAX_TTL_S:.0f})")
    push.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each box")


def outcome(state: dict[str, Any], version: int) -> str | None:
    """What a box's `state` says of `version` (None: not yet)."""
    c = state.get("config")
    if not isinstance(c, dict):
        return None
    if c.get("rolled_back") == version:
        return "rolled back"
    if c.get("refused") == version:
        return "refused"
    if c.get("version") == version and c.get("pending") is None and state.get("problems") == 0:
        return "applied"
    return None


class Center:
    """The operations center's MQTT client for a push: publishes, and keeps each box's
    last `state`."""

    def __init__(self, host: str, port: int, ca: Path) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=pki.OPS_CENTER_CN,
                             protocol=mqtt.MQTTv311, clean_session=True)
        ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(ca / f"{pki.OPS_CENTER_CN}.pem"), str(ca / f"{pki.OPS_CENTER_CN}.key"))
        self.c.tls_set_context(ctx)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, codes, props: self.ready.set()
        self.c.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else c.subscribe(
            "appliance/+/state", qos=1)
        self.c.loop_start()
        self.c.connect(host, port, keepalive=30)

    def _on_message(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        if len(m.payload) > MAX_STATE_BYTES:
            return
        try:
            doc = json.loads(m.payload)
        except ValueError:
            return
        if isinstance(doc, dict):
            with self.lock:
                self.states[m.topic.split("/")[1]] = doc

    def publish(self, box: str, payload: bytes, timeout: float) -> bool:
        info = self.c.publish(f"appliance/{box}/config", payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        return info.is_published()

    def wait(self, box: str, version: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = outcome(self.states.get(box, {}), version)
            if got is not None:
                return got
            time.sleep(0.2)
        return "no answer"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def check_file(path: Path) -> str:
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    key = desired.forbidden_key(data)
    if key is not None:
        raise UsageError(f"{path}: {key} may not be set remotely (docs/operations.md)")
    return text


def push(args: argparse.Namespace) -> int:
    if getattr(args, "config_sub", None) != "push":
        sys.stderr.write(args.help_of_level.format_help())
        return EX_USAGE
    if args.version < 1:
        raise UsageError("--version: a positive integer")
    if not 0 < args.ttl <= desired.MAX_TTL_S:
        raise UsageError(f"--ttl: 1 to {desired.MAX_TTL_S:.0f} seconds (a box refuses a longer lifetime)")
    text = check_file(args.file)
    key: Ed25519PrivateKey = crypto.load_private_key_of(args.key, Ed25519PrivateKey, "Ed25519")
    boxes = [args.box, *(b for b in args.boxes if b != args.box)]
    result: dict[str, Any] = {"version": args.version, "group": args.group,
                              "boxes": {b: "not sent" for b in boxes}}
    try:
        center = Center(args.host, args.port, args.ca)
    except OSError as e:
        print(f"cannot reach the broker {args.host}:{args.port} ({type(e).__name__})", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if not center.ready.wait(args.timeout):
            print(f"no session with the broker within {args.timeout:g} s", file=sys.stderr)
            return EX_UNAVAILABLE
        for wave in ([boxes[0]], boxes[1:]):
            for b in wave:
                env = desired.envelope(b, args.version, text, key, now=time.time(), ttl_s=args.ttl)
                if not center.publish(b, env, args.timeout):
                    result["boxes"][b] = "no answer"
            for b in wave:
                if result["boxes"][b] == "not sent":
                    result["boxes"][b] = center.wait(b, args.version, args.timeout)
            if any(v != "applied" for v in result["boxes"].values() if v != "not sent"):
                break
    finally:
        center.close()
    print(json.dumps(result, indent=2, sort_keys=True))
    outcomes = set(result["boxes"].values())
    if outcomes <= {"applied"}:
        return 0
    return 1 if outcomes & {"rolled back", "refused"} else EX_UNAVAILABLE
