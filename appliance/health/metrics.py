"""The Prometheus metrics endpoint (`[operations] metrics_bind`): what the box is doing, as
series a Prometheus server (or `curl`) reads over HTTP at `/metrics`.

Owns the collector and the HTTP server. The collector reads the daemon's existing state
at scrape time (`Daemon.snapshot()`, the same view as `appliance status` and the ops
link's `state`), plus two things no snapshot holds: the certificates' not-after times
(read again every CERTS_S, like the ops link) and `Tally`, a log tap that counts the few
log events with no durable count (bundles delivered and moved on, segments packed), so
that no counter is scattered through the stages.

Labels are bounded by construction: stage names, queue states (queue.state.STATES),
destination names from the config, refusal reasons from the fixed tables (receive.scp
STATUS and REJECTIONS, core.listener REFUSALS); a value outside its table is never
a label (counted as `other` where the table may grow). Never a UID, an AE title nor
anything a peer sent. Every labelled series is present from the start, at 0.

The server: prometheus_client's WSGI app on wsgiref, bounded: at most MAX_CLIENTS
connections at once (one more is closed at once), each socket read or write times out
after CLIENT_TIMEOUT_S, a whole connection ends after CONNECTION_DEADLINE_S (a client
that trickles bytes), and a request line or header is capped by http.server itself.

How it fails: a scrape that cannot read a part of the state (e.g. the index busy) fails
that scrape with HTTP 500 and a log line with the error class; the next scrape tries
again. A bind failure is the caller's (the daemon logs it and runs on without metrics).
"""

from __future__ import annotations

import contextlib
import ipaddress
import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.core.config import Config
from appliance.core.listener import REFUSALS
from appliance.ops.link import cert_not_after, cert_paths
from appliance.queue.state import STATES
from appliance.receive.scp import REJECTIONS, STATUS

log = structlog.get_logger("appliance.metrics")

P = "appliance_"
MAX_CLIENTS = 4
CLIENT_TIMEOUT_S = 5.0
CONNECTION_DEADLINE_S = 10.0
CERTS_S = 600.0
REFUSED = tuple(k for k in STATUS if k not in ("stored", "duplicate"))


class Tally:
    """Counters of log events no snapshot keeps (a log tap, core.log.add_tap): per
    configured destination, bundles delivered, their bytes and bundles moved on to the
    next destination (failover); and the bytes into and out of the packer. An event
    naming a destination not in the config is not counted. Thread-safe."""

    def __init__(self, destinations: Iterable[str]) -> None:
        self._lock = threading.Lock()
        names = list(destinations)
        self.delivered = dict.fromkeys(names, 0)
        self.sent_bytes = dict.fromkeys(names, 0)
        self.moved = dict.fromkeys(names, 0)
        self.packed = {"in": 0, "out": 0, "segments": 0}

    def on_log(self, kind: str, fields: Mapping[str, Any]) -> None:
        if kind == "segment.packed":
            with self._lock:
                self.packed["in"] += _int(fields.get("bytes_in"))
                self.packed["out"] += _int(fields.get("bytes_out"))
                self.packed["segments"] += 1
            return
        if kind not in ("bundle.delivered", "bundle.moved"):
            return
        dest = fields.get("destination")
        if dest not in self.delivered:
            return
        with self._lock:
            if kind == "bundle.moved":
                self.moved[dest] += 1
            else:
                self.delivered[dest] += 1
                self.sent_bytes[dest] += _int(fields.get("bytes"))

    def view(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"delivered": dict(self.delivered), "sent_bytes": dict(self.sent_bytes),
                    "moved": dict(self.moved), "packed": dict(self.packed)}


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class Certificates:
    """The certificates' not-after times, read again every CERTS_S (a renewed one shows)."""

    def __init__(self, paths: Mapping[str, Path], read: Callable[[Mapping[str, Path]], dict[str, float]]
                 ) -> None:
        self.paths = dict(paths)
        self._read = read
        self._at = float("-inf")
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def not_after(self, now: float) -> dict[str, float]:
        with self._lock:
            if not 0 <= now - self._at < CERTS_S:
                self._values, self._at = self._read(self.paths), now
            return dict(self._values)


class DaemonCollector(Collector):
    """The series, built from one snapshot per scrape (see the module docstring).

    `snapshot` is Daemon.snapshot(); `extra` returns what it does not hold: `queue_bytes`
    (state -> bytes), `pack_bps` and `ratio` (recent figures, None before any)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], extra: Callable[[], dict[str, Any]],
                 tally: Tally, certs: Certificates, stages: Iterable[str], destinations: Iterable[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.snapshot = snapshot
        self.extra = extra
        self.tally = tally
        self.certs = certs
        self.stages = list(stages)
        self.destinations = list(destinations)
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        snap, extra, tally = self.snapshot(), self.extra(), self.tally.view()
        yield from self._stages(snap.get("stages", {}))
        yield from self._queue(snap, extra, now)
        yield from self._destinations(snap.get("destinations", []), tally)
        yield from self._receive(snap.get("receive", {}))
        yield from self._pack(extra, tally)
        yield from self._spool(snap.get("spool", {}))
        yield from self._certs(now)
        yield from self._ops(snap)
        yield from self._audit(snap.get("audit") or {})
        info = InfoMetricFamily(P + "build", "The software running", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], {})
        yield info

    def _stages(self, stages: Mapping[str, Mapping[str, Any]]) -> Iterable[Metric]:
        up = GaugeMetricFamily(P + "stage_up", "1 while the stage's threads are alive",
                               labels=["stage"])
        stuck = GaugeMetricFamily(P + "stage_stuck", "1 while a job of the stage makes no progress"
                                  " within its deadline (the watchdog is withheld)", labels=["stage"])
        progress = CounterMetricFamily(P + "stage_progress", "Steps of progress of the stage",
                                       labels=["stage"])
        for name in self.stages:
            s = stages.get(name, {})
            state = s.get("state", "dead")
            up.add_metric([name], 0 if state == "dead" else 1)
            stuck.add_metric([name], 1 if state == "stuck" else 0)
            progress.add_metric([name], _int(s.get("progress")))
        return up, stuck, progress

    def _queue(self, snap: Mapping[str, Any], extra: Mapping[str, Any], now: float) -> Iterable[Metric]:
        counts, sizes = snap.get("queue", {}), extra.get("queue_bytes", {})
        items = GaugeMetricFamily(P + "queue_items", "Queue items (segments and bundles) by state",
                                  labels=["state"])
        size = GaugeMetricFamily(P + "queue_bytes", "Bytes of the queue's items by state: the"
                                 " instances' before packing, the bundle's after", labels=["state"])
        for st in STATES:
            items.add_metric([st], _int(counts.get(st)))
            size.add_metric([st], _int(sizes.get(st)))
        age = float(snap.get("oldest_waiting_s") or 0.0)
        oldest = GaugeMetricFamily(P + "queue_oldest_unsent_timestamp_seconds",
                                   "When the oldest item not yet delivered was received (Unix time;"
                                   " 0 when there is none)", value=round(now - age, 3) if age else 0)
        parked = GaugeMetricFamily(P + "queue_parked_items", "Items of instances parked for a human",
                                   value=_int(snap.get("forward", {}).get("parked")))
        return items, size, oldest, parked

    def _destinations(self, dests: Iterable[Mapping[str, Any]], tally: Mapping[str, Mapping[str, int]]
                      ) -> Iterable[Metric]:
        state = {d.get("name"): d for d in dests}
        up = GaugeMetricFamily(P + "destination_up", "1 while the destination is up (forward.failover)",
                               labels=["destination"])
        failures = GaugeMetricFamily(P + "destination_failures", "Failures in a row at the destination",
                                     labels=["destination"])
        sent = CounterMetricFamily(P + "destination_sent_bytes", "Bytes of bundles delivered",
                                   labels=["destination"])
        delivered = CounterMetricFamily(P + "destination_bundles_delivered", "Bundles delivered",
                                        labels=["destination"])
        moved = CounterMetricFamily(P + "destination_failovers", "Bundles moved on from this"
                                    " destination to the next one because it was down",
                                    labels=["destination"])
        for name in self.destinations:
            d = state.get(name, {})
            up.add_metric([name], 1 if d.get("state", "up") == "up" else 0)
            failures.add_metric([name], _int(d.get("failures")))
            sent.add_metric([name], tally["sent_bytes"].get(name, 0))
            delivered.add_metric([name], tally["delivered"].get(name, 0))
            moved.add_metric([name], tally["moved"].get(name, 0))
        return up, failures, sent, delivered, moved

    def _receive(self, r: Mapping[str, Any]) -> Iterable[Metric]:
        yield CounterMetricFamily(P + "instances_received", "Instances acknowledged to the sender"
                                  " (stored, or a duplicate of one stored)",
                                  value=_int(r.get("instances_received")))
        yield CounterMetricFamily(P + "instances_duplicate", "Instances received again",
                                  value=_int(r.get("instances_duplicate")))
        yield CounterMetricFamily(P + "received_bytes", "Bytes of instances received",
                                  value=_int(r.get("bytes_received")))
        yield CounterMetricFamily(P + "associations", "Associations accepted",
                                  value=_int(r.get("associations_total")))
        yield GaugeMetricFamily(P + "associations_active", "Associations open now",
                                value=_int(r.get("associations_active")))
        yield _by_reason(P + "instances_refused", "Instances refused, by reason (receive.scp STATUS)",
                         REFUSED, r.get("instances_refused", {}))
        yield _by_reason(P + "associations_rejected", "Associations rejected, by reason",
                         tuple(REJECTIONS), r.get("associations_rejected_by_reason", {}))
        yield _by_reason(P + "connections_refused", "Connections refused before an association,"
                         " by reason (core.listener REFUSALS)", tuple(REFUSALS),
                         r.get("connections_refused", {}))

    def _pack(self, extra: Mapping[str, Any], tally: Mapping[str, Mapping[str, int]]) -> Iterable[Metric]:
        p = tally["packed"]
        yield CounterMetricFamily(P + "pack_segments", "Segments packed into bundles", value=p["segments"])
        yield CounterMetricFamily(P + "pack_in_bytes", "Bytes of instances packed", value=p["in"])
        yield CounterMetricFamily(P + "pack_out_bytes", "Bytes of the bundles they became", value=p["out"])
        yield GaugeMetricFamily(P + "pack_compression_ratio", "Recent bytes in per byte out of"
                                " pack.codec (0 before the first)", value=extra.get("ratio") or 0)
        yield GaugeMetricFamily(P + "pack_rate_bytes_per_second", "Recent packing rate while busy"
                                " (0 before the first)", value=extra.get("pack_bps") or 0)

    def _spool(self, sp: Mapping[str, Any]) -> Iterable[Metric]:
        yield GaugeMetricFamily(P + "spool_free_bytes", "Free bytes on the spool's file system",
                                value=_int(sp.get("free_bytes")))
        yield GaugeMetricFamily(P + "spool_reserve_bytes", "Free bytes kept in reserve: below it"
                                " instances are refused (spool.reserve_free_mb)",
                                value=_int(sp.get("reserve_bytes")))
        yield GaugeMetricFamily(P + "spool_instances", "Instances in the spool",
                                value=_int(sp.get("instances")))
        yield GaugeMetricFamily(P + "spool_bytes", "Bytes of instances in the spool",
                                value=_int(sp.get("bytes")))

    def _certs(self, now: float) -> Iterable[Metric]:
        got = self.certs.not_after(now)
        m = GaugeMetricFamily(P + "certificate_expiry_timestamp_seconds", "Not-after of each certificate"
                              " the box uses (Unix time; 0 if unreadable)", labels=["certificate"])
        for name in self.certs.paths:
            m.add_metric([name], got.get(name, 0))
        yield m

    def _ops(self, snap: Mapping[str, Any]) -> Iterable[Metric]:
        ops = snap.get("ops")
        if ops is not None:
            yield GaugeMetricFamily(P + "ops_link_connected", "1 while the ops link is connected",
                                    value=1 if ops.get("connected") else 0)


    def _audit(self, a: Mapping[str, Any]) -> Iterable[Metric]:
        if not a:
            return
        yield CounterMetricFamily(P + "audit_messages_written", "Audit messages written to the"
                                  " local trail", value=_int(a.get("written")))
        yield CounterMetricFamily(P + "audit_write_failures", "Audit messages that could not be"
                                  " written (a full disk)", value=_int(a.get("failed")))
        repo = a.get("repository")
        if repo:
            yield CounterMetricFamily(P + "audit_repository_sent", "Audit messages sent to the"
                                      " hospital's audit repository", value=_int(repo.get("sent")))
            yield GaugeMetricFamily(P + "audit_repository_waiting", "Audit messages not yet sent to"
                                    " the repository", value=_int(repo.get("waiting")))
            yield GaugeMetricFamily(P + "audit_repository_connected", "1 while connected to the audit"
                                    " repository", value=1 if repo.get("connected") else 0)


def _by_reason(name: str, doc: str, reasons: tuple[str, ...], got: Mapping[str, Any]) -> Metric:
    m = CounterMetricFamily(name, doc, labels=["reason"])
    for r in reasons:
        m.add_metric([r], _int(got.get(r)))
    m.add_metric(["other"], sum(_int(v) for k, v in got.items() if k not in reasons))
    return m


# --- the HTTP server ---

class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT_S  # StreamRequestHandler: on every read and write of the socket

    def setup(self) -> None:
        # a client that sends a byte now and then never meets the timeout above: the whole
        # connection has CONNECTION_DEADLINE_S, then its socket is shut down under it
        self._cut = threading.Timer(CONNECTION_DEADLINE_S, self._shut)
        self._cut.daemon = True
        self._cut.start()
        super().setup()

    def _shut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._cut.cancel()
        with contextlib.suppress(OSError):  # the socket shut down under a write
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # wsgiref writes each request to stderr; a scrape is not an event


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._lock = threading.Lock()
        self.busy = 0  # connections being served now, at most MAX_CLIENTS
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's name (socket.getfqdn): skipped
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self.busy >= MAX_CLIENTS
            self.busy += 0 if full else 1
        if full:
            self.shutdown_request(request)  # MAX_CLIENTS busy: this one is closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self.busy -= 1


BoundedServer = _Server  # also serves the fleet page (ops/fleetweb.py)


def parse_bind(bind: str) -> tuple[str, int, socket.AddressFamily]:
    """`IP:PORT` (config._check_bind checked it) -> host, port, address family."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    v6 = ipaddress.ip_address(host).version == 6
    return host, int(port), socket.AF_INET6 if v6 else socket.AF_INET


class MetricsServer:
    """`/metrics` on `bind`, on a thread of its own; `start` raises OSError if it cannot bind."""

    def __init__(self, bind: str, collector: Collector) -> None:
        self.bind = bind
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._app = make_wsgi_app(self.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        try:
            return list(self._app(environ, start_response))
        except Exception as e:
            log.error("metrics.scrape_failed", error_type=type(e).__name__)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"scrape failed; see the appliance log\n"]

    @property
    def busy(self) -> int:
        """Connections being served now."""
        return self._server.busy if self._server is not None else 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_port

    def start(self) -> None:
        host, port, family = parse_bind(self.bind)
        self._server = _Server((host, port), family)
        self._server.set_app(self._wsgi)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics.listening", host=host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def build(cfg: Config, stages: Iterable[str], snapshot: Callable[[], dict[str, Any]],
          extra: Callable[[], dict[str, Any]]) -> tuple[MetricsServer, Tally] | None:
    """The endpoint of a config with [operations] and a metrics_bind (None: off), and the
    tally the caller taps into the log before the stages start. It does not need the ops
    link to be connected, only configured: metrics are served whether or not the broker
    is there."""
    if cfg.operations is None or not cfg.operations.metrics_bind:
        return None
    dests = [d.name for d in cfg.destinations]
    tally = Tally(dests)
    collector = DaemonCollector(snapshot, extra, tally, Certificates(cert_paths(cfg), cert_not_after),
                                stages, dests)
    return MetricsServer(cfg.operations.metrics_bind, collector), tally
