"""A real Mosquitto for the ops-link tests: the shipped config/ops-center files, rewritten
into a temp dir, on a free loopback port, with certificates from `appliance fleet ca`.

`Broker.start()` / `stop()` (by PID, SIGTERM then SIGKILL) / `restart()` on the same port
(persistence keeps retained messages). `Watcher` is an MQTT client with a certificate of
the fleet CA (the operations center's by default) that records what arrives.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.peers import REPO, cli, free_port, wait_for

MOSQUITTO = "/usr/sbin/mosquitto"
SHIPPED = REPO / "config" / "ops-center"


def fleet_ca(directory: Path) -> Path:
    cli("fleet", "ca", "init", str(directory), "--broker-host", "127.0.0.1", check=True)
    return directory


def ops_section(box: Path, broker: Broker, ca: Path, center: Path, **more: Any) -> dict[str, Any]:
    """The [operations] table of a test box under `box` (its MQTT key and certificate in
    box/keys, as `keys init` makes them) talking to `broker`, trusting the center's command
    key in `center` (`fleet keys init`); a 2 s heartbeat. `more`: other keys of the table."""
    return {"host": "127.0.0.1", "port": broker.port, "ca": str(ca / "ca.pem"),
            "cert": str(box / "keys" / "mqtt.pem"), "key": str(box / "keys" / "mqtt.key"),
            "heartbeat_s": 2, "keepalive_s": 5, "command_keys": [str(center / "command.pub")], **more}


def sign(ca: Path, csr: Path) -> Path:
    cli("fleet", "sign", str(csr), "--ca", str(ca), check=True)
    return csr.with_suffix(".pem")


def client_cert(ca: Path, name: str, where: Path) -> tuple[Path, Path]:
    """A box certificate for `name` (key and CSR made like `keys init` does)."""
    from appliance.ops import pki

    pki.box_key_and_csr(name, where / f"{name}.key", where / f"{name}.csr")
    return sign(ca, where / f"{name}.csr"), where / f"{name}.key"


class Broker:
    def __init__(self, root: Path, ca: Path) -> None:
        self.root, self.ca = root, ca
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        conf = (SHIPPED / "mosquitto.conf").read_text()
        conf = (conf.replace("/etc/mosquitto/fleet/acl", str(root / "acl"))
                .replace("/etc/mosquitto/fleet/", f"{ca}/")
                .replace("/var/lib/mosquitto/", f"{root / 'data'}/")
                .replace("listener 8883", f"listener {self.port} 127.0.0.1"))
        settings = "\n".join(line for line in conf.splitlines() if not line.startswith("#"))
        assert "/etc/" not in settings and "/var/" not in settings
        # Started as root, Mosquitto drops to the user `mosquitto`, who cannot read a temp dir.
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(f"user {os.getenv('USER') or 'root'}\n" + conf)
        (root / "acl").write_text((SHIPPED / "acl").read_text())
        self.log = root / "mosquitto.log"

    def start(self) -> Broker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 20, "mosquitto listening", detail=self.log_text)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited {self.proc.returncode}:\n{self.log_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.monotonic)

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.payload)
        return doc


class Watcher:
    """An MQTT client with a fleet certificate; records every message it receives.

    The broker takes the certificate's CN as the client id: two watchers with one
    certificate take the session from each other, so a test has one per certificate."""

    def __init__(self, broker: Broker, cert: Path, key: Path, client_id: str = "ops-center",
                 topics: tuple[str, ...] = ("appliance/#",), persistent: bool = True,
                 connect_timeout: float = 20) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.suback: list[Any] = []
        # persistent: the broker keeps the subscription and queues QoS 1 messages while
        # the watcher is away (a broker restart), as the operations center would.
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=not persistent)
        ctx = ssl.create_default_context(cafile=str(broker.ca / "ca.pem"))
        ctx.load_cert_chain(str(cert), str(key))
        self.c.tls_set_context(ctx)
        self.topics = topics
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda c, u, mid, codes, props: self.suback.extend(codes)
        self.c.loop_start()
        # paho does not close a TLS socket whose handshake failed: it is freed with the
        # exception, here, and not reported in some later test's garbage collection.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                self.c.connect("127.0.0.1", broker.port, keepalive=30)
            except OSError as e:  # the handshake refused: say so the way a timeout does
                self.close()
                refused = type(e).__name__
            else:
                refused = ""
            if refused:
                gc.collect()
        if refused:
            raise AssertionError(f"watcher connected: refused ({refused})")
        try:
            wait_for(self.connected.is_set, connect_timeout, "watcher connected")
        except AssertionError:
            self.close()
            raise

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            for t in self.topics:
                c.subscribe(t, qos=1)
            self.connected.set()

    def _on_message(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Message(m.topic, m.payload, bool(m.retain)))

    def on(self, topic: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> dict[str, Any] | None:
        got = self.on(topic)
        return got[-1].json() if got else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()
