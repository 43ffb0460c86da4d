"""The composition root: builds the stages from config, runs them, shuts them down.

Start order (each step must succeed before the next; a failure exits with the error's
code and systemd sees it):
1. take an exclusive lock on `STATE/run/daemon.lock` (two daemons on one spool would
   corrupt each other's view of it);
2. load and check the spool key (file mode, and that it is the key that sealed the spool);
3. open the queue index, start the codec worker pool, and recover: packed instances
   whose spool copies a crash left, the spool (temp files, orphans, quarantine), then
   the queue (active work back to ready, orphan bundles quarantined);
4. bind the DICOM listeners and the control socket, start the pack and forward loops;
5. tell systemd READY=1.

Shutdown (SIGTERM/SIGINT) runs in reverse: the update worker and the ops link end, the
receive, pack and forward stages stop by one deadline, `receive.dimse_timeout_s`, whatever
a PACS does (stopping.py; the default 60 s is inside the unit's TimeoutStopSec=90), then
the control socket, the metrics and the index close. A step cut short by a stop or a kill
is redone at the next start (see pack.py and queue.py for why that is safe).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import structlog

from appliance import __version__, stopping
from appliance.audit import AuditTrail
from appliance.audit import repository as audit_repository
from appliance.audit.trail import destination as audit_destination
from appliance.audit.trail import for_config as audit_for_config
from appliance.core import crypto, durable, hardening
from appliance.core import log as applog
from appliance.core import pynetdicom_compat as compat
from appliance.core.config import Config, Destination
from appliance.core.config import effective as effective_config
from appliance.core.errors import ApplianceError, ConfigError, StateError, UsageError
from appliance.forward import Transport, conversion, receipts, registry
from appliance.forward.controls import Controls
from appliance.forward.dicom.transport import STREAM_THRESHOLD
from appliance.forward.receipts import ReceiptPoller
from appliance.forward.scheduler import PROBE_WAIT_S, Forwarder
from appliance.health import metrics as health_metrics
from appliance.health.control import ControlServer, DaemonUnavailable, operator_name
from appliance.health.notify import Notifier
from appliance.health.supervisor import Supervisor
from appliance.ops import commands as ops_commands
from appliance.ops import desired
from appliance.ops import diagnostics as ops_diagnostics
from appliance.ops import link as ops_link
from appliance.pack.packer import Packer
from appliance.pack.pool import CodecPool
from appliance.queue import commands
from appliance.queue.index import SCHEMA_VERSION, open_index
from appliance.queue.store import PRIORITY_ROUTINE, PRIORITY_STAT, Item, Queue
from appliance.receive.identify import identify_stored
from appliance.receive.scp import Receiver, ReceiveStats
from appliance.spool.store import Spool
from appliance.update import lock as update_lock
from appliance.update import remote as update_remote
from appliance.vpn import handshake as vpn_handshake

log = structlog.get_logger("appliance.daemon")

WATCHDOG_INTERVAL_S = 5.0
IDLE_POLL_S = 0.5


def watchdog_interval(env: dict[str, str] | None = None) -> float:
    """How often to judge the stages and ping: every 5 s, or more often when systemd's
    WatchdogSec is short (half its period, as sd_watchdog_enabled(3) advises)."""
    usec = (env if env is not None else os.environ).get("WATCHDOG_USEC", "")
    try:
        return min(WATCHDOG_INTERVAL_S, max(0.1, int(usec) / 2e6))
    except ValueError:
        return WATCHDOG_INTERVAL_S


def forward_deadline(cfg: Config) -> float:
    """Seconds a send may go without progress: the health limit, plus the longest silence a
    destination's own time limits allow (no answer for timeout_s, each way; a storage
    commitment report awaited for commitment_timeout_s; a whole conversion for a PACS that
    refuses the syntax, of an instance below the size that is converted as it is sent)."""
    convert = conversion.TIME_BASE_S + conversion.TIME_PER_MIB_S * (STREAM_THRESHOLD >> 20)
    waits = [2 * d.timeout_s + (d.commitment_timeout_s if d.storage_commitment else 0)
             + (convert if d.transport in ("dicom", "dicomweb") else 0) for d in cfg.destinations]
    return cfg.health.stall_s + max(waits, default=0)


def build_transport(dest: Destination, cfg: Config) -> Transport:
    context = registry.Context(key=crypto.load_private_key(cfg.encryption.appliance_key),
                               local_ae_title=cfg.receive.ae_title,
                               max_instance_bytes=cfg.receive.max_instance_mb << 20)
    try:
        return registry.build(dest, context)
    except LookupError as e:
        raise ConfigError([f"{cfg.sources[0] if cfg.sources else 'config'}: destinations: "
                           f"{e} ({dest.name})"]) from None


def lock_state_dir(state_dir: Path, busy: str = "another appliance daemon is already running on {}",
                   record_pid: bool = True) -> int:
    """Take the daemon lock; returns the fd (kept open while the lock is needed).

    The daemon holds it for its lifetime; `appliance queue hold|...` holds it while it
    changes the index itself because no daemon runs (`state_lock`). Raises StateError
    with `busy` (formatted with the state dir) when someone else holds it.
    """
    run = state_dir / "run"
    try:
        durable.make_dirs(run)
    except OSError as e:
        raise StateError(f"cannot create the state directory {state_dir}: {e.strerror}") from None
    fd = os.open(run / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(busy.format(state_dir)) from None
    if record_pid:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold the daemon lock for a change made without a daemon (the CLI's fallback)."""
    try:
        fd = lock_state_dir(state_dir, record_pid=False)
    except StateError:
        raise DaemonUnavailable(f"a daemon holds {state_dir} but does not answer on its control"
                                " socket (starting or stopping?); try again") from None
    try:
        yield
    finally:
        os.close(fd)


def audit_trail(cfg: Config, key: crypto.SpoolKey | None = None) -> AuditTrail:
    """The appliance's audit trail (appliance.audit), in STATE/audit/, sealed under the
    audit key derived from the spool key (loaded here unless given)."""
    return audit_for_config(cfg, key)


class ForwardAudit:
    """The forwarder's deliveries and parked instances, written to the audit trail with
    the destination as the config names it (forward.scheduler.Audit)."""

    def __init__(self, trail: AuditTrail, cfg: Config) -> None:
        self.trail = trail
        self.dests = {d.name: d for d in cfg.destinations}

    def sent(self, item: Item, destination: str, instances: int, problem: str | None) -> None:
        what = problem or f"{instances} instance(s) of bundle {item.bundle_id} delivered"
        self.trail.sent(item.study_key, audit_destination(self.dests[destination]), instances,
                        problem is None, f"{what} to {destination}")


def config_digest(cfg: Config) -> str:
    """SHA-256 over the config files read (name and bytes each), for the audit trail."""
    h = hashlib.sha256()
    for p in cfg.sources:
        h.update(str(p).encode() + b"\0")
        with contextlib.suppress(OSError):
            h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


class Daemon:
    def __init__(self, cfg: Config, checker: desired.Checker = desired.parse_checker) -> None:
        self.cfg = cfg
        self.checker = checker  # a remote config's check (the CLI passes `config check`'s)
        self.main_file = cfg.sources[0] if cfg.sources else Path("appliance.toml")
        self.desired: desired.Desired | None = None
        self.reexec = False  # set with stop_event: run() returns and `appliance run` re-executes
        self.stop_event = threading.Event()
        self.wake_pack = threading.Event()
        self.wake_forward = threading.Event()
        self.wake_probe = threading.Event()
        self.notifier = Notifier()
        self.stats = ReceiveStats()
        self.started = time.time()
        self.listeners: list[tuple[str, int, bool]] = []
        self.receiver: Receiver | None = None
        self.supervisor = Supervisor()
        self.receipts: ReceiptPoller | None = None  # forward.receipts, with a receipt_key
        self._problems: list[str] = []
        self.link: ops_link.Link | None = None
        self.commands: ops_commands.Commands | None = None
        self.updates = update_remote.Runner(cfg)  # the ops center's `update` command
        self._untap: Callable[[], None] = lambda: None
        self.metrics: tuple[health_metrics.MetricsServer, health_metrics.Tally] | None = None
        self._untap_metrics: Callable[[], None] = lambda: None
        self.recent = ops_diagnostics.Recent()  # the last log events, for diagnostics
        self._untap_recent: Callable[[], None] = lambda: None
        self.audit_sender: audit_repository.Sender | None = None

    def run(self) -> int:
        cfg = self.cfg
        if not_hardened := hardening.forbid_core_dumps():  # before any key or image is in memory
            log.warning("core_dumps.not_forbidden", steps=not_hardened)
        compat.check_version()
        lock_fd = lock_state_dir(cfg.appliance.state_dir)
        key = crypto.load_spool_key(cfg.spool.key_file)
        self.audit = audit_trail(cfg, key)
        if cfg.audit.syslog_host:  # the hospital's audit repository (audit/repository.py)
            stage = self.supervisor.stage("audit", 2 * audit_repository.TIMEOUT_S + cfg.health.stall_s,
                                          alive=lambda: sender.alive())
            self.audit_sender = sender = audit_repository.Sender(
                cfg.audit, self.audit.dir, key.audit_key(), cfg.appliance.name, stage=stage)
            self.audit.on_write = self.audit_sender.wake
        index = open_index(cfg.appliance.state_dir)
        if index.newer is not None:  # back on the old slot after an update's trial boot
            log.warning("queue.schema_newer", schema=index.newer, ours=SCHEMA_VERSION)
        self.spool = spool = Spool(
            cfg.appliance.state_dir, key, index, cfg.spool.reserve_free_mb << 20,
            cfg.pack.segment_max_instances, cfg.pack.segment_max_mb << 20,
            key_file=cfg.spool.key_file, first_segment_instances=cfg.pack.first_segment_instances)
        spool.check_key()  # the wrong key must stop us before anything is moved
        recipients = [crypto.load_public_key(cfg.encryption.appliance_public_key)]
        recipients += [crypto.load_public_key(p) for p in cfg.encryption.recipients]
        transports = [build_transport(d, cfg) for d in cfg.destinations]
        # receipt_key is an sftp key (core.config): these are SftpTransports. Keys are
        # loaded here, before any worker starts: a bad key file ends the start cleanly.
        with_receipts = [(d, cast(receipts.ReceiptSource, t))
                         for d, t in zip(cfg.destinations, transports, strict=True)
                         if d.receipt_key is not None]
        self.queue = queue = Queue(cfg.appliance.state_dir, index)
        self.receipts = ReceiptPoller(queue, with_receipts,
                                      beat=lambda: self.stages["receipts"].beat()
                                      ) if with_receipts else None
        pool = CodecPool(cfg.pack.workers)
        copies = [d.name for d in cfg.destinations if d.mode == "copy"]
        lanes = [self._lane(f"forward-{i + 1}", PRIORITY_ROUTINE, housekeeping=i == 0)
                 for i in range(cfg.queue.lanes)] + [self._lane("forward-stat", PRIORITY_STAT)]
        # each copy destination: a lane of its own, so that one that hangs holds up nothing
        lanes += [self._lane(f"forward-copy-{i + 1}", PRIORITY_ROUTINE, only=n)
                  for i, n in enumerate(copies)]
        prober = threading.Thread(target=self._loop, args=("failover", self._probe_step, self.wake_probe),
                                  name="failover", daemon=True)
        workers = [threading.Thread(target=self._loop, args=("pack", self._pack_step, self.wake_pack),
                                    name="pack", daemon=True), *lanes, prober]
        if with_receipts:
            workers.append(threading.Thread(
                target=self._loop, args=("receipts", self._receipts_step, threading.Event()),
                name="receipts", daemon=True))
        sup, stall = self.supervisor, cfg.health.stall_s
        self.stages = {"receive": sup.stage("receive", stall, alive=lambda: receiver.listening()),
                       "pack": sup.stage("pack", stall, alive=workers[0].is_alive),
                       "forward": sup.stage("forward", forward_deadline(cfg),
                                            alive=lambda: all(t.is_alive() for t in lanes)),
                       "failover": sup.stage("failover", PROBE_WAIT_S + stall, alive=prober.is_alive)}
        if with_receipts:
            self.stages["receipts"] = sup.stage(
                "receipts", stall + max(receipts.round_budget(d) for d, _ in with_receipts),
                alive=workers[-1].is_alive)
        self.packer = packer = Packer(
            cfg.pack, spool, queue, recipients, pool, beat=self.stages["pack"].beat,
            receiving_burst=lambda: self.receiver is not None and self.receiver.in_burst(),
            max_instance_bytes=cfg.receive.max_instance_mb << 20,
            on_packed=lambda seg: self.wake_forward.set(),
            link=lambda: forwarder.link())  # bound below, before any thread starts
        packer.remove_packed()  # a crash between pack steps 2 and 3 left these
        counts = spool.recover(adopt=identify_stored)
        log.info("spool.recovered", **counts)
        log.info("queue.recovered", **queue.recover())
        settled = queue.settle_routes([d.name for d in cfg.destinations if d.mode == "failover"],
                                      copies)
        if any(settled.values()):  # the config dropped destinations that items were meant for
            log.warning("queue.routes_settled", **settled)
        self.forwarder = forwarder = Forwarder(queue, transports, cfg.queue,
                                               beat=self.stages["forward"].beat,
                                               wake=self.wake_forward.set, copies=copies,
                                               audit=ForwardAudit(self.audit, cfg),
                                               controls=Controls(cfg.appliance.state_dir,
                                                                 [t.name for t in transports]))
        for h in forwarder.health.all():
            if not h.up:  # kept from before the restart (forward.failover)
                log.warning("destination.still_down", destination=h.name, reason=h.last_error)
        self.receiver = receiver = Receiver(cfg.receive, spool, self.stats, stage=self.stages["receive"],
                                            on_stored=lambda seg: self.wake_pack.set(),
                                            rules=cfg.rules, audit=self.audit,
                                            update_lock=update_lock.path_in(cfg.appliance.state_dir))
        if cfg.operations:
            self.commands = ops_commands.build(cfg, self._control_handlers(), self.audit)
            self.desired = desired.build(self.main_file, cfg, self.audit, self.checker)
            self.link = ops_link.build(cfg, sup, self.snapshot, self.commands.handle, self._on_config)
        status = ControlServer(cfg.control_socket, self._control_handlers())
        self.metrics = health_metrics.build(cfg, sup.snapshot().keys(), self.snapshot, self._metrics_extra)
        stopping.install_signals(self.stop_event)
        try:
            self.listeners = receiver.start()
            status.start()
            self._untap_recent = applog.add_tap(self.recent)
            self._start_metrics()
            for host, port, tls in self.listeners:
                log.info("listening", host=host, port=port, tls=tls, ae_title=cfg.receive.ae_title)
            for w in workers:
                w.start()
            if self.audit_sender is not None:
                self.audit_sender.start()
            self._start_link()
            self.updates.recover()  # a hand-off's result left unreported (update/remote.py)
            if self.desired is not None:
                desired.report(self.main_file)  # a rollback at this start, as an ops event
            self.notifier.ready(self.status_line())
            log.info("appliance.ready", name=cfg.appliance.name, version=__version__)
            self.audit.application(started=True)
            self.audit.config_seen(config_digest(cfg), [str(p) for p in cfg.sources])
            interval = watchdog_interval()
            while not self.stop_event.wait(interval):
                self._watchdog()
        finally:
            if self.reexec:
                self.notifier.reloading()
            elif self.notifier.readied:  # a start that fails says nothing: it may be rolled
                self.notifier.stopping()  # back and executed again (cli/run.py), same PID
            log.info("appliance.stopping")
            self.updates.stop()  # no fetch worker outlives us; its outcome while the link is on
            self._stop_link()  # `online` false now: the box is going away
            stopping.stop_work(cfg.receive.dimse_timeout_s, receiver, self.stats,
                               (self.wake_pack, self.wake_forward, self.wake_probe),
                               lanes, workers, forwarder, pool)
            status.stop()
            self._stop_metrics()
            index.close()
            self.audit.application(started=False)
            if self.audit_sender is not None:
                self.audit_sender.stop()  # sends what is waiting if it is connected, briefly
            self._untap_recent()
            os.close(lock_fd)
            log.info("appliance.stopped")
        return 0

    def _start_link(self) -> None:
        """The ops link ([operations]): its events come from log taps (ops/messages.py)."""
        if self.link is not None:
            self._untap = applog.add_tap(self.link.on_log)
            self.link.start()

    def _on_config(self, topic: str, payload: bytes) -> None:
        """A desired config (ops/desired.py): a new drop-in in place means a restart."""
        assert self.desired is not None
        try:
            applying = self.desired.handle(topic, payload)
        except Exception as e:  # the link must live on: the retained config comes again
            log.exception("config.failed", error_type=type(e).__name__)
            return
        if applying:
            self.restart("config applying")

    def restart(self, why: str) -> None:
        """Stop as for SIGTERM, then `appliance run` executes itself again (same PID)."""
        log.info("appliance.restarting", reason=why)
        self.reexec = True
        self.stop_event.set()

    def _probation(self, healthy: bool) -> None:
        """A remote config on probation: kept once healthy, rolled back past its deadline."""
        if self.desired is None:
            return
        try:
            outcome = self.desired.check(healthy, time.time() - self.started)
        except OSError as e:  # remote.d not writable: judged again at the next turn
            log.error("config.check_failed", error=e.strerror or type(e).__name__)
            return
        if outcome == "rolled back":
            self.restart("config rolled back")

    def _stop_link(self) -> None:
        self._untap()
        if self.link is not None and self.link.thread.is_alive():
            self.link.stop()

    def _start_metrics(self) -> None:
        """The metrics endpoint (health/metrics.py), if configured: its tally taps the log
        before any stage runs. A port it cannot bind is logged and the box runs on
        without metrics: images come first."""
        if self.metrics is None:
            return
        server, tally = self.metrics
        self._untap_metrics = applog.add_tap(tally.on_log)
        try:
            server.start()
        except OSError as e:
            log.error("metrics.bind_failed", bind=server.bind, error=e.strerror or type(e).__name__)

    def _stop_metrics(self) -> None:
        self._untap_metrics()
        if self.metrics is not None:
            self.metrics[0].stop()

    def _metrics_extra(self) -> dict[str, Any]:
        """What the metrics need beyond the snapshot."""
        return {"queue_bytes": self.queue.bytes_by_state(), "pack_bps": self.packer.packed.rate(),
                "ratio": self._pack_ratio()}

    def _pack_ratio(self) -> float | None:
        """The packer's recent ratio (pace.Recent has one owner and no lock: a pack that
        ends while it is summed makes the deque change under us; read again)."""
        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                return self.packer.ratio.rate()
        return None

    def _control_handlers(self) -> dict[str, Any]:
        """What the control socket answers (see health/control.py)."""
        return {
            "status": lambda args: self.snapshot(),
            "queue.change": lambda args: commands.change_audited(
                self.queue, str(args.get("verb")), args.get("id"), bool(args.get("all")),
                self.audit, args.get("_operator") or operator_name(args.get("_peer_uid"))),
            "forward.switch": lambda args: self._switch(args),
            "log.level": lambda args: self._log_level(args),
            "events.replay": lambda args: self._replay(args),
            "diagnostics": lambda args: ops_diagnostics.collect(
                self.snapshot(), effective_config(self.cfg), self.recent.events()),
            "update.start": lambda args: self.updates.start(args),
        }

    def _replay(self, args: dict[str, Any]) -> dict[str, int]:
        if self.link is None:
            raise StateError("no ops link: [operations] is not configured")
        since = args.get("since")
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise UsageError("since: an event_seq, 0 or more")
        return self.link.replay(since)

    def _switch(self, args: dict[str, Any]) -> dict[str, Any]:
        """An operator's switch (forward/controls.py), audited: `pause`/`resume` forwarding,
        or a destination `off`/`on` (args: verb, destination)."""
        verb, name = str(args.get("verb")), args.get("destination")
        who = args.get("_operator") or operator_name(args.get("_peer_uid"))
        fw = self.forwarder
        acts: dict[str, Callable[[], bool]] = {
            "pause": lambda: fw.pause(who), "resume": fw.resume,
            "off": lambda: fw.switch_off(str(name), who), "on": lambda: fw.switch_on(str(name))}
        if verb not in acts or (verb in ("off", "on")) != isinstance(name, str):
            raise UsageError("pause, resume, or off/on with a destination")
        target = str(name) if verb in ("off", "on") else "forwarding"
        try:
            changed = acts[verb]()
        except ApplianceError as e:
            self.audit.command(who, verb, target, False, str(e), area="forward")
            raise
        self.audit.command(who, verb, target, True, "changed" if changed else "already so",
                           area="forward")
        return {"verb": verb, "target": target, "changed": changed}

    def _log_level(self, args: dict[str, Any]) -> dict[str, Any]:
        """Change the log level until the next restart (audited)."""
        who = args.get("_operator") or operator_name(args.get("_peer_uid"))
        want = str(args.get("level"))
        try:
            before = applog.set_level(want)
        except ValueError as e:
            self.audit.command(who, "log_level", want, False, str(e), area="log")
            raise UsageError(str(e)) from None
        self.audit.command(who, "log_level", want, True, f"was {before}", area="log")
        log.warning("log.level_changed", level=want, was=before, by=who)
        return {"level": want, "was": before}

    def _watchdog(self) -> None:
        """WATCHDOG=1 only while every stage is idle or moving (health/supervisor.py)."""
        problems = self.supervisor.problems()
        if problems:
            if problems != self._problems:
                log.error("watchdog.withheld", problems=problems)
            self.notifier.status("stuck: " + "; ".join(problems))
        else:
            if self._problems:
                log.info("watchdog.resumed")
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
        self._problems = problems
        self._probation(not problems)

    def _pack_step(self) -> bool:
        sealed = self.packer.seal_due(time.time())
        packed = self.packer.pack_pending()  # each bundle wakes the forwarder when ready
        return bool(sealed or packed)

    def _probe_step(self) -> bool:
        """The prober: down destinations probed on their back-off (forward.failover), on
        a thread of its own so that a slow probe never holds a lane."""
        self.forwarder.probe_due(beat=self.stages["failover"].beat)
        return False

    def _receipts_step(self) -> bool:
        """The receipt poller (forward.receipts), on a thread of its own: reading receipts
        back from a slow center never holds a lane."""
        assert self.receipts is not None
        return self.receipts.step()

    def _lane(self, name: str, min_priority: int, housekeeping: bool = False,
              only: str | None = None) -> threading.Thread:
        """One forwarding lane: a thread that sends one item at a time (see forward/scheduler):
        the failover chain's items, or (`only`) the copies for one copy destination."""
        def step() -> bool:
            try:  # a reboot into an updated slot waits for the delivery (update/lock.py)
                with update_lock.work(update_lock.path_in(self.cfg.appliance.state_dir)):
                    if self.forwarder.run_once(min_priority=min_priority, copies=False, only=only):
                        return True
            except update_lock.UpdatePending:
                return False
            if housekeeping:
                self.queue.expire_delivered(self.cfg.queue.keep_delivered_h * 3600, time.time())
            return False
        return threading.Thread(target=self._loop, args=("forward", step, self.wake_forward),
                                name=name, daemon=True)

    def _loop(self, name: str, step: Callable[[], bool], wake: threading.Event) -> None:
        """Run `step` until it finds no work, then sleep until woken or polled again.

        Each step is a job of the stage (health/supervisor.py): a step that stops making
        progress is seen by the watchdog. An exception is logged and retried after a
        pause; it never ends the loop, because a dead loop with a live process is the
        worst failure for an unattended box (and a dead thread is seen by the watchdog).
        """
        stage = self.stages[name]
        while not self.stop_event.is_set():
            try:
                with stage.job(name):
                    busy = step()
            except Exception as e:
                log.exception(f"{name}.loop_error", error_type=type(e).__name__)
                busy = False
                self.stop_event.wait(5)
            if not busy:
                wake.wait(IDLE_POLL_S)
                wake.clear()

    def status_line(self) -> str:
        s = self.stats.snapshot()
        sp = self.spool.stats()
        down = [h.name for h in self.forwarder.health.all() if not h.up]
        return (f"received {s['instances_received']}, refused {sum(s['instances_refused'].values())},"
                f" spooled {sp['instances']}, free {sp['free_bytes'] >> 20} MiB"
                + (f"; destination down: {', '.join(down)}" if down else ""))

    def _paused(self) -> dict[str, Any] | None:
        controls = self.forwarder.controls
        p = controls.paused if controls is not None else None
        return {"since": p.since, "by": p.by} if p is not None else None

    def snapshot(self) -> dict[str, Any]:
        sp = self.spool.stats()
        return {
            "name": self.cfg.appliance.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "listening": [{"host": h, "port": p, "tls": t} for h, p, t in self.listeners],
            "ae_title": self.cfg.receive.ae_title,
            "receive": self.stats.snapshot(),
            "spool": sp,
            "queue": self.queue.counts(),
            "oldest_waiting_s": round(self.queue.oldest_waiting_age(time.time()), 1),
            "last_errors": dict(self.forwarder.last_error),
            "destinations": self.forwarder.snapshot(time.time()),
            "receipts": self.receipts.snapshot(time.time()) if self.receipts else [],
            "log_level": applog.level(),
            "forward": {"paused": self._paused(),
                        "lanes": self.cfg.queue.lanes, "stat_lanes": 1,
                        "copy_lanes": len(self.forwarder.copies),
                        "parked": self.queue.parked_count()},
            "stages": self.supervisor.snapshot(),
            "problems": self.supervisor.problems(),
            "audit": {"written": self.audit.written, "failed": self.audit.failed,
                      "repository": self.audit_sender.status() if self.audit_sender else None},
            **({"ops": {**self.link.status(), "last_command": self.commands.last if self.commands else None},
                "config": desired.status(self.main_file)}
               if self.link is not None else {}),
            **({"vpn": vpn_handshake.read(self.cfg.vpn.interface, self.cfg.vpn.peer_public_key, time.time())}
               if self.cfg.vpn is not None else {}),
        }
