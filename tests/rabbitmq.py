"""A real RabbitMQ node for the ops-link tests: the shipped config/ops-center/rabbitmq
files (rabbitmq.conf, advanced.config with the CRL directory, enabled_plugins,
fleet-definitions), rewritten into a temp dir.

The node is the test's own: its node name, Mnesia and log dirs in the temp dir, free
loopback ports for MQTT over TLS, Erlang distribution, rabbitmqctl and epmd (ERL_EPMD_PORT),
no AMQP listener, HOME (the Erlang cookie) in the temp dir; it never touches a system
RabbitMQ nor another test's node. `RabbitBroker` has the interface of
tests.mosquitto.Broker (root, ca, port, start, stop, log_text), so the telemetry tests
take either. stop() is `rabbitmqctl stop`, then SIGTERM/SIGKILL of the process group by
PID, then `epmd -kill` on its own port: nothing is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.peers import REPO, free_port, wait_for

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBITMQ_BIN / "rabbitmq-server"
SHIPPED = REPO / "config" / "ops-center" / "rabbitmq"


class RabbitBroker:
    def __init__(self, root: Path, ca: Path, boxes: tuple[str, ...] = ()) -> None:
        self.root, self.ca = root, ca
        self.port, self.dist_port, self.epmd_port, self.ctl_port = (free_port() for _ in range(4))
        self.proc: subprocess.Popen[bytes] | None = None
        self.defined = False
        root.mkdir(parents=True, exist_ok=True)
        conf = (SHIPPED / "rabbitmq.conf").read_text()
        conf = (conf.replace("/etc/rabbitmq/fleet/", f"{ca}/")
                .replace("mqtt.listeners.ssl.default = 8883",
                         f"mqtt.listeners.ssl.default = 127.0.0.1:{self.port}"))
        settings = "\n".join(line for line in conf.splitlines() if not line.startswith("#"))
        assert "/etc/" not in settings and str(self.port) in settings
        (root / "rabbitmq.conf").write_text(conf)
        advanced = (SHIPPED / "advanced.config").read_text()
        advanced = (advanced.replace("/etc/rabbitmq/fleet/crl.d", str(root / "crl.d"))
                    .replace("/etc/rabbitmq/fleet/", f"{ca}/"))
        assert "/etc/" not in "\n".join(line for line in advanced.splitlines() if not line.startswith("%"))
        (root / "advanced.config").write_text(advanced)
        (root / "crl.d").mkdir(exist_ok=True)
        (root / "crl.d" / "crl.pem").symlink_to(ca / "crl.pem")
        (root / "enabled_plugins").write_text((SHIPPED / "enabled_plugins").read_text())
        (root / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        r = subprocess.run([str(SHIPPED / "fleet-definitions"), *boxes], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        self.definitions = root / "fleet.json"
        self.definitions.write_text(r.stdout)
        self.log = root / "rabbitmq.log"
        self.node = f"appl{self.port}@localhost"

    def env(self) -> dict[str, str]:
        r = self.root
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(r), "LANG": "C.UTF-8",
                "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(r / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(r / "mnesia"), "RABBITMQ_LOG_BASE": str(r / "log"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(r / "plugins-expand"),
                "RABBITMQ_PID_FILE": str(r / "rabbitmq.pid"), "RABBITMQ_LOGS": "-",
                "RABBITMQ_NODENAME": self.node, "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port)}

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start(self) -> RabbitBroker:
        r = subprocess.run(["openssl", "rehash", str(self.root / "crl.d")], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(SERVER)], env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._listening, 90, "rabbitmq listening", detail=self.log_text)
            if not self.defined:  # users and permissions once; Mnesia keeps them on restart
                for args in (("delete_user", "guest"), ("import_definitions", str(self.definitions))):
                    r = self.ctl(*args)
                    assert r.returncode == 0, f"rabbitmqctl {args[0]}: {r.stdout}{r.stderr}"
                self.defined = True
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"rabbitmq exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=60)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(self.proc.pid, sig)
                        self.proc.wait(15)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                    except ProcessLookupError:
                        break
        # epmd is started by the node as a daemon of its own, on this node's port only.
        subprocess.run(["epmd", "-kill"], env=self.env(), capture_output=True, timeout=30)
