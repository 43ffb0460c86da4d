"""The ops link: one MQTT connection to the operations center's broker, on its own thread.

Owns the client (paho-mqtt 2.x, MQTT 3.1.1, TLS 1.2+ with the box's certificate), the
`online` presence with its will, the `state` heartbeat and the sending of the outbox's
events. The thread is a stage of the supervisor (health/supervisor.py): each turn of its
loop is progress, whether or not the broker is there, so a broker away is not a stuck
box; a dead link thread is, and withholds the watchdog like any other stage.

Each connection attempt takes the next `conn_seq` from the outbox (it survives reboots),
sets the will `{"online": false, conn_seq}` and builds a new paho client, so that nothing
of an old connection (paho's in-flight queue) is sent twice; what was not acknowledged
is sent again from the outbox, oldest first. Connection failures back off from 1 s to
60 s (with jitter) and are logged as a class (the exception type), never a peer's text.

`state` comes from the daemon's snapshot, i.e. the supervisor's view: it is published
every `heartbeat_s`, and at once (at most every STATE_MIN_S) when something in it that
matters changed (messages.comparable). Events come from log taps (`on_log`).

Commands: with a command handler (ops/commands.py), the link subscribes to `cmd` (QoS 1)
after each CONNACK, and with a config handler (ops/desired.py) to the retained `config`;
what arrives is queued (at most COMMANDS_MAX waiting, more are dropped and logged) and
run on this thread between turns of the loop; each command's result is published on
`cmd/result` (QoS 1, not retained), a config's outcome shows in `state` and events. A
command whose work may take long (diagnostics to sftp) answers `{"_later": job}`: job
runs on a thread of its own (bounded by its own deadline) and its result is published
once it ends, after a reconnection if the link was down meanwhile (at most COMMANDS_MAX
wait; a stop drops them: the center sees no result and may ask again).

Fails soft: a broker that is away, refuses us or is misconfigured never stops the flow
of images; the reason is in the log and `appliance status`.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from appliance.core.config import Config, Operations
from appliance.health.supervisor import Stage, Supervisor
from appliance.ops import messages
from appliance.ops.outbox import Outbox

log = structlog.get_logger("appliance.ops")

STATE_MIN_S = 2.0
CHECK_S = 1.0  # how often the snapshot is taken to look for a change
CERTS_S = 600.0
CONNACK_WAIT_S = 10.0
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
LOOP_S = 0.2
INFLIGHT_MAX = 20
STOP_WAIT_S = 3.0
COMMANDS_MAX = 16

CommandHandler = Callable[[str, bytes], dict[str, Any]]
ConfigHandler = Callable[[str, bytes], None]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def clock_synchronised() -> bool | None:
    """The kernel's view (adjtimex(2) state TIME_ERROR = unsynchronised); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        rc = libc.adjtimex(buf)
    except (OSError, AttributeError):
        return None
    return None if rc < 0 else rc != 5


def tls_context(ops: Operations) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ops.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(ops.cert), str(ops.key))
    return ctx


def cert_not_after(paths: Mapping[str, Path]) -> dict[str, float]:
    from appliance.ops import pki

    out = {}
    for name, p in paths.items():
        try:
            out[name] = pki.load_cert(p).not_valid_after_utc.timestamp()
        except Exception:  # noqa: S112 - a missing certificate is reported by config check
            continue
    return out


class Link:
    def __init__(self, name: str, ops: Operations, outbox: Outbox, snapshot: Callable[[], dict[str, Any]],
                 stage: Stage, certs: Mapping[str, Path], on_command: CommandHandler | None = None,
                 on_config: ConfigHandler | None = None) -> None:
        self.name = name
        self.ops = ops
        self.outbox = outbox
        self.snapshot = snapshot
        self.stage = stage
        self.certs = dict(certs)
        self.topic = f"appliance/{name}"
        self.boot_id = boot_id()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ops-link", daemon=True)
        self.connected_since: float | None = None
        self.conn_seq = 0
        self._client: mqtt.Client | None = None
        self._connected = False
        self._lost = False
        self._inflight: dict[int, int] = {}  # mid -> event_seq
        self._sent_upto = 0
        self._rewind: int | None = None  # replay(): send again from here (set by any thread)
        self._rewind_lock = threading.Lock()
        self._state_seq = 0
        self._last_state: dict[str, Any] | None = None
        self._last_state_at = 0.0
        self._last_check = 0.0
        self._certs: tuple[float, dict[str, float]] = (0.0, {})  # read at, name -> not-after
        self._failures = 0
        self.on_command = on_command
        self.on_config = on_config
        self._commands: list[tuple[str, bytes]] = []
        self._later: list[dict[str, Any]] = []  # deferred commands' results, to publish
        self._later_lock = threading.Lock()

    # --- the daemon's side ---

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(STOP_WAIT_S + CONNACK_WAIT_S)
        if not self.thread.is_alive():
            self.outbox.close()

    def on_log(self, kind: str, fields: Mapping[str, Any]) -> None:
        """A log tap: an ops event into the outbox (messages.EVENT_FIELDS decides)."""
        body = messages.event_body(kind, dict(fields))
        if body is not None:
            self.outbox.add(time.time(), body)  # the link thread sends it within LOOP_S

    def replay(self, since: int) -> dict[str, int]:
        """The `replay_events` command: the kept events after `since` go out again, oldest
        first, with their own event_seq (the center drops what it has by number)."""
        got = self.outbox.replay(since)
        with self._rewind_lock:
            self._rewind = since if self._rewind is None else min(self._rewind, since)
        log.info("ops.events_replayed", since=since, **got)
        return got

    def status(self) -> dict[str, Any]:
        return {"connected": self._connected, "since": self.connected_since, "conn_seq": self.conn_seq,
                **self.outbox.counts()}

    # --- the thread ---

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with self.stage.job("ops"):
                try:
                    self._session()
                except OSError as e:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
                    log.warning("ops.connect_failed", conn_seq=self.conn_seq, error_type=type(e).__name__)
                except Exception as e:
                    log.error("ops.link_error", error_type=type(e).__name__)
                self._drop()
            if self.stop_event.is_set():
                break
            self._failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self._failures - 1, 10))
            self._idle(delay * random.uniform(0.75, 1.0))  # noqa: S311 - jitter, not secrets

    def _idle(self, seconds: float) -> None:
        """Wait without work, beating now and then (a broker away is not a stuck stage)."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set() and time.monotonic() < end:
            self.stage.beat()
            self.stop_event.wait(min(1.0, max(0.0, end - time.monotonic())))

    def _new_client(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, clean_session=True,
                        protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        c.tls_set_context(tls_context(self.ops))
        c.connect_timeout = CONNACK_WAIT_S
        c.max_inflight_messages_set(INFLIGHT_MAX)
        c.will_set(f"{self.topic}/online", messages.dumps(messages.will(self.conn_seq, self.boot_id)),
                   qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    def _session(self) -> None:
        """One connection: connect, announce, publish until it is lost or we stop."""
        self.conn_seq = self.outbox.next_conn_seq()
        self._client = c = self._new_client()
        self._connected = self._lost = False
        c.connect(self.ops.host, self.ops.port, keepalive=self.ops.keepalive_s)
        deadline = time.monotonic() + CONNACK_WAIT_S
        while not self._connected:
            if self.stop_event.is_set():
                return
            if self._lost or time.monotonic() > deadline:
                log.warning("ops.connect_failed", conn_seq=self.conn_seq,
                            reason="refused" if self._lost else "no CONNACK")
                return
            self._loop(c)
        self._failures = 0
        self.connected_since = time.time()
        log.info("ops.connected", host=self.ops.host, port=self.ops.port, conn_seq=self.conn_seq)
        self._publish(c, "online", messages.online(self.conn_seq, self.boot_id, self.connected_since))
        if self.on_command is not None:
            c.subscribe(f"{self.topic}/cmd", qos=1)
        if self.on_config is not None:  # retained: the desired config comes at each connection
            c.subscribe(f"{self.topic}/config", qos=1)
        self._last_state, self._last_check = None, 0.0
        while not self._lost:
            if self.stop_event.is_set():
                self._goodbye(c)
                return
            self.stage.beat()
            self._send_events(c)
            self._run_commands(c)
            self._send_later(c)
            self._maybe_state(c)
            self._loop(c)
        log.warning("ops.disconnected", conn_seq=self.conn_seq)

    def _loop(self, c: mqtt.Client) -> None:
        rc = c.loop(timeout=LOOP_S)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost = True

    def _publish(self, c: mqtt.Client, sub: str, msg: dict[str, Any], retain: bool = True) -> int:
        info = c.publish(f"{self.topic}/{sub}", messages.dumps(msg), qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost = True
        return int(info.mid)

    def _send_events(self, c: mqtt.Client) -> None:
        with self._rewind_lock:
            rewind, self._rewind = self._rewind, None
        if rewind is not None:
            self._sent_upto = min(self._sent_upto, rewind)
        room = INFLIGHT_MAX // 2 - len(self._inflight)
        if room <= 0:
            return
        pending = self.outbox.pending(after=self._sent_upto, limit=room)
        dropped = self.outbox.counts()["dropped"] if pending else 0
        for seq, ts, body in pending:
            msg = messages.event(self.name, self.boot_id, seq, ts, body, dropped)
            mid = self._publish(c, "events", msg, retain=False)
            self._inflight[mid] = seq
            self._sent_upto = seq

    def _run_commands(self, c: mqtt.Client) -> None:
        while self._commands:
            topic, payload = self._commands.pop(0)
            if topic == f"{self.topic}/config":
                if self.on_config is not None:
                    self.on_config(topic, payload)
                continue
            if self.on_command is None:
                continue
            msg = self.on_command(topic, payload)
            later = msg.pop("_later", None)
            if later is not None:
                threading.Thread(target=self._run_later, args=(later,), name="ops-later",
                                 daemon=True).start()
                continue
            for part in msg.pop("_parts", []):  # diagnostics: the parts before the result
                self._publish(c, f"diagnostics/{msg['cmd_id']}", part, retain=False)
            self._publish(c, "cmd/result", msg, retain=False)

    def _run_later(self, job: Callable[[], dict[str, Any]]) -> None:
        """A deferred command's work, off the link's thread; its result waits for `_send_later`."""
        msg = job()  # it answers in any case (Commands._uploaded catches what it meets)
        with self._later_lock:
            if len(self._later) >= COMMANDS_MAX:
                log.warning("ops.result_dropped", cmd_id=msg.get("cmd_id"))
                return
            self._later.append(msg)

    def _send_later(self, c: mqtt.Client) -> None:
        with self._later_lock:
            done, self._later = self._later, []
        for msg in done:
            self._publish(c, "cmd/result", msg, retain=False)

    def _maybe_state(self, c: mqtt.Client) -> None:
        now = time.time()
        if now - self._last_state_at < STATE_MIN_S or 0 <= now - self._last_check < CHECK_S:
            return
        self._last_check = now
        msg = messages.state(self.snapshot(), seq=self._state_seq + 1, now=now, boot_id=self.boot_id,
                             conn_seq=self.conn_seq, certs=self._not_after(now),
                             time_synced=clock_synchronised(), outbox=self.outbox.counts())
        due = now - self._last_state_at >= self.ops.heartbeat_s
        if not due and self._last_state is not None and \
                messages.comparable(msg) == messages.comparable(self._last_state):
            return
        self._state_seq += 1
        self._publish(c, "state", msg)
        self._last_state, self._last_state_at = msg, now

    def _not_after(self, now: float) -> dict[str, float]:
        """The certificates' not-after times, read again every CERTS_S (a renewed one shows)."""
        if now - self._certs[0] >= CERTS_S or now < self._certs[0]:
            self._certs = (now, cert_not_after(self.certs))
        return self._certs[1]

    def _goodbye(self, c: mqtt.Client) -> None:
        """A clean stop: `online` false from ourselves, then DISCONNECT (no will)."""
        info = c.publish(f"{self.topic}/online",
                         messages.dumps(messages.offline(self.conn_seq, self.boot_id, time.time())),
                         qos=1, retain=True)
        end = time.monotonic() + STOP_WAIT_S
        while not info.is_published() and time.monotonic() < end and not self._lost:
            self._loop(c)
        c.disconnect()
        log.info("ops.stopped", conn_seq=self.conn_seq)

    def _drop(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            sock = c.socket()  # closed without DISCONNECT after a failure: the broker sends the will
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._connected = False
        self._commands.clear()  # QoS 1 acknowledged by paho; the center sees no result and may resend
        self.connected_since = None
        self._inflight.clear()
        self._sent_upto = 0  # what the broker did not acknowledge goes again, oldest first

    # --- paho callbacks (called from _loop, on this thread) ---

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._lost = True
        else:
            self._connected = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._lost = True

    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        if len(self._commands) >= COMMANDS_MAX:
            log.warning("ops.command_dropped", waiting=len(self._commands))
            return
        self._commands.append((m.topic, bytes(m.payload)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is not None:
            self.outbox.ack(seq)


def cert_paths(cfg: Config) -> dict[str, Path]:
    """The certificates the box uses, by a name from the config (never a subject): the ops
    link's, the DICOM listener's and each destination's TLS client certificate."""
    certs = {"mqtt": cfg.operations.cert} if cfg.operations is not None else {}
    if cfg.receive.tls is not None:
        certs["receive.tls"] = cfg.receive.tls.cert
    certs.update({f"destinations.{d.name}": d.tls.cert for d in cfg.destinations if d.tls is not None})
    return certs


def build(cfg: Config, supervisor: Supervisor, snapshot: Callable[[], dict[str, Any]],
          on_command: CommandHandler | None = None, on_config: ConfigHandler | None = None) -> Link:
    """The link of a config with [operations], registered as the supervisor's `ops` stage
    (deadline: a connection attempt plus the stall limit)."""
    ops = cfg.operations
    assert ops is not None
    certs = cert_paths(cfg)
    stage = supervisor.stage("ops", CONNACK_WAIT_S + cfg.health.stall_s,
                             alive=lambda: link.thread.is_alive())
    link = Link(cfg.appliance.name, ops, Outbox(cfg.appliance.state_dir), snapshot, stage, certs,
                on_command, on_config)
    return link
