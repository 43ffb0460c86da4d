"""`appliance fleet serve`: the fleet page and the fleet's Prometheus series over HTTP.

Routes (GET only): `/` the fleet, one box a row, red where a person is needed
(fleet.alarms), refreshed by the browser every REFRESH_S (a meta refresh: no script);
`/box/<name>` one box, every value labelled live or "last known at T", with its recent
events; `/fleet.json` the same view as `appliance fleet status --json`; `/metrics` the
fleet as Prometheus series (FleetCollector; the names are what alert rules are written
against: keep them).

Server-rendered HTML from the standard library (html.escape on every value, since all
of it comes from boxes and is untrusted): no framework and no template engine, for one
page and one detail. The HTTP server is the metrics endpoint's bounded WSGI server
(health/metrics.py: at most MAX_CLIENTS at once, per-socket timeouts, a deadline per
connection).

How it fails: an error while rendering answers 500 with a fixed text and logs the
error class; the model keeps its last known values while the broker is away.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.health import metrics
from appliance.ops.fleet import BOX_NAME, Fleet

log = structlog.get_logger("appliance.fleet")

REFRESH_S = 10


class FleetCollector(Collector):
    """The fleet series. A value the box never sent (no state yet, nothing unsent) is
    absent, not 0: `fleet_box_oldest_unsent_timestamp_seconds` exists only while the box
    has something unsent."""

    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.time) -> None:
        self.fleet, self.clock = fleet, clock

    def collect(self) -> Iterable[Metric]:
        boxes = self.fleet.view(self.clock())
        g = {n: GaugeMetricFamily(f"fleet_box_{n}", doc, labels=["box", *extra]) for n, doc, extra in (
            ("online", "1 while the box's last online message says online", ()),
            ("state_timestamp_seconds", "the box's own time of its last state message", ()),
            ("last_seen_timestamp_seconds", "when the center last received anything from the box", ()),
            ("oldest_unsent_timestamp_seconds", "when the box received its oldest item not yet "
             "delivered; absent when nothing is unsent", ()),
            ("destination_up", "1 while the destination is up (the box's last state)", ("destination",)),
            ("spool_free_bytes", "free bytes on the box's spool file system", ()),
            ("spool_reserve_bytes", "the reserve below which the box refuses instances", ()),
            ("certificate_expiry_timestamp_seconds", "not-after of a certificate of the box", ("cert",)),
            ("stage_stuck", "1 while a stage of the box is stuck or dead", ("stage",)),
        )}
        dropped = CounterMetricFamily("fleet_box_events_dropped", "events the box dropped (outbox full), "
                                      "ever", labels=["box"])
        for b in boxes:
            self._box(g, dropped, b)
        yield from g.values()
        yield dropped
        yield GaugeMetricFamily("fleet_boxes", "boxes known to the center", value=len(boxes))

    @staticmethod
    def _box(g: dict[str, GaugeMetricFamily], dropped: CounterMetricFamily, b: dict[str, Any]) -> None:
        box = b["name"]
        g["online"].add_metric([box], 1 if b["online"] else 0)
        for series, key in (("state_timestamp_seconds", "state_ts"),
                            ("last_seen_timestamp_seconds", "last_seen"),
                            ("oldest_unsent_timestamp_seconds", "oldest_unsent_ts"),
                            ("spool_free_bytes", "free_bytes"), ("spool_reserve_bytes", "reserve_bytes")):
            if b[key] is not None:
                g[series].add_metric([box], b[key])
        for d in b["destinations"]:
            if not d["off"]:  # switched off by an operator: absent, so no alert rule takes it for down
                g["destination_up"].add_metric([box, d["name"]], 1 if d["up"] else 0)
        for cert, t in b["certs"].items():
            g["certificate_expiry_timestamp_seconds"].add_metric([box, cert], t)
        for stage, s in b["stages"].items():
            g["stage_stuck"].add_metric([box, stage], 1 if s in ("stuck", "dead") else 0)
        dropped.add_metric([box], b["events_dropped"])


# --- the page ---

def when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def age(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0, int(now - t))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def dest_state(d: dict[str, Any]) -> str:
    return "off (by an operator)" if d["off"] else "up" if d["up"] else "DOWN"


def source(b: dict[str, Any]) -> str:
    """Where the values of a box come from: live, or the last state the center received."""
    return "live" if b["live"] else f"last known at {when(b['state_received'])}"


CSS = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
       "td,th{border:1px solid #999;padding:.3em .6em;text-align:left;vertical-align:top}"
       "tr.alarm td,p.alarm{background:#f8c8c8}tr.ok td{background:#e6f4e6}.src{color:#555;font-size:.85em}")


def page(title: str, body: str, refresh: bool = True) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>").encode()


def _cells(b: dict[str, Any], now: float) -> list[str]:
    e = html.escape
    dests = ", ".join(f"{d['name']} {dest_state(d)}" for d in b["destinations"]) or "-"
    items = ", ".join(f"{k} {n}" for k, n in sorted(b["queue"].items())) or "-"
    queue = f"PAUSED; {items}" if b["paused"] else items
    soonest = min(b["certs"].values(), default=None)
    return [f'<a href="/box/{e(b["name"])}">{e(b["name"])}</a>',
            "online" if b["online"] else "OFFLINE",
            e(", ".join(b["alarms"]) or "none"),
            f"{e(age(b['last_seen'], now))} ago", e(queue),
            f"{e(age(b['oldest_unsent_ts'], now))} ago" if b["oldest_unsent_ts"] is not None
            else "nothing unsent",
            e(dests), f"{e(mib(b['free_bytes']))} free, reserve {e(mib(b['reserve_bytes']))}",
            e(when(soonest)), f'<span class="src">{e(source(b))}</span>']


HEAD = ("box", "link", "alarms", "last seen", "queue", "oldest unsent", "destinations", "disk",
        "first certificate expiry", "values")


def broker_line(link: dict[str, Any] | None) -> str:
    if link is None:
        return ""
    if link["connected"]:
        return f"<p>broker {html.escape(link['broker'])}: connected since {when(link['since'])}.</p>"
    return (f'<p class="alarm"><b>broker {html.escape(link["broker"])}: NOT CONNECTED</b>; every value is'
            " the last known.</p>")


def fleet_page(boxes: list[dict[str, Any]], now: float, link: dict[str, Any] | None = None) -> bytes:
    rows = "".join(f'<tr class="{"alarm" if b["alarms"] else "ok"}" id="box-{html.escape(b["name"])}">'
                   + "".join(f"<td>{c}</td>" for c in _cells(b, now)) + "</tr>" for b in boxes)
    need = sum(1 for b in boxes if b["alarms"])
    body = (f"<h1>Fleet</h1>{broker_line(link)}<p>{len(boxes)} box(es), {need} need a person;"
            f" at {when(now)}.</p>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in HEAD)}</tr>{rows}</table>")
    return page("Fleet", body)


def box_page(b: dict[str, Any], now: float) -> bytes:
    e = html.escape
    src = source(b)
    rows = [("link", "online" if b["online"] else "OFFLINE", f"last seen {when(b['last_seen'])}"),
            ("alarms", ", ".join(b["alarms"]) or "none", "now"),
            ("version", b["version"] or "-", src),
            ("state sent by the box at", when(b["state_ts"]), src),
            ("oldest unsent", when(b["oldest_unsent_ts"]) if b["oldest_unsent_ts"] is not None
             else "nothing unsent", src),
            ("parked items", "-" if b["parked"] is None else str(int(b["parked"])), src),
            ("spool free", mib(b["free_bytes"]), src), ("spool reserve", mib(b["reserve_bytes"]), src),
            ("events dropped (ever)", str(b["events_dropped"]), src)]
    rows += [(f"queue {k}", str(n), src) for k, n in sorted(b["queue"].items())]
    rows += [(f"destination {d['name']}", dest_state(d) + ("" if d["up"] or d["off"] else
                                                           f" ({d['last_error'] or '-'})"), src)
             for d in b["destinations"]]
    rows.insert(3, ("forwarding", "PAUSED (by an operator)" if b["paused"] else "running", src))
    rows += [(f"stage {k}", s, src) for k, s in sorted(b["stages"].items())]
    rows += [(f"certificate {k}", f"expires {when(t)}", src) for k, t in sorted(b["certs"].items())]
    values = "".join(f'<tr{_red(k, b)}><th>{e(k)}</th><td>{e(v)}</td><td class="src">{e(s)}</td></tr>'
                     for k, v, s in rows)
    events = "".join(f"<tr><td>{e(when(_num(ev.get('ts'))))}</td><td>{e(str(ev.get('event_seq')))}</td>"
                     f"<td>{e(str(ev.get('kind')))}</td><td>{e(_fields(ev))}</td></tr>"
                     for ev in reversed(b["events"]))
    body = (f'<p><a href="/">fleet</a></p><h1>{e(b["name"])}</h1>'
            f"<table>{values}</table>"
            f"<h2>Recent events (since the center started)</h2><table><tr><th>at (box clock)</th>"
            f"<th>event_seq</th><th>kind</th><th>fields</th></tr>{events}</table>")
    return page(b["name"], body)


def _red(key: str, b: dict[str, Any]) -> str:
    return ' class="alarm"' if key == "alarms" and b["alarms"] else ""


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


EVENT_HIDDEN = frozenset({"v", "name", "boot_id", "event_seq", "ts", "kind", "received_at"})


def _fields(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)[:80]}" for k, v in sorted(ev.items()) if k not in EVENT_HIDDEN)


# --- the WSGI app and the server ---

class FleetApp:
    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.time,
                 link: Callable[[], dict[str, Any]] | None = None) -> None:
        self.fleet, self.clock, self.link = fleet, clock, link
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(fleet, clock))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            status, ctype, body = self.route(environ.get("REQUEST_METHOD", "GET"),
                                             environ.get("PATH_INFO", "/"))
        except Exception as e:
            log.error("fleet.page_failed", error_type=type(e).__name__)
            status, ctype, body = "500 Internal Server Error", "text/plain", b"failed; see the log\n"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body]

    def route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        now = self.clock()
        if path == "/":
            link = self.link() if self.link is not None else None
            return "200 OK", "text/html; charset=utf-8", fleet_page(self.fleet.view(now), now, link)
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
        if path == "/fleet.json":
            return "200 OK", "application/json", json.dumps(self.fleet.view(now), indent=1).encode()
        name = path.removeprefix("/box/")
        b = self.fleet.box(name, now) if path.startswith("/box/") and BOX_NAME.fullmatch(name) else None
        if b is None:
            missing = page("not found", "<p>no such page or box</p>", refresh=False)
            return "404 Not Found", "text/html; charset=utf-8", missing
        return "200 OK", "text/html; charset=utf-8", box_page(b, now)


class FleetServer:
    """The app on `bind` (IP:PORT), on a thread of its own; `start` raises OSError if it cannot bind."""

    def __init__(self, bind: str, app: FleetApp) -> None:
        self.bind, self.app = bind, app
        self._server: metrics.BoundedServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_port

    def start(self) -> None:
        host, port, family = metrics.parse_bind(self.bind)
        self._server = metrics.BoundedServer((host, port), family)
        self._server.set_app(self.app)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                         name="fleet-http", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
