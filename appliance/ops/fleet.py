"""The fleet as the operations center sees it: the last known `online`, `state` and recent
`events` of every box, each with the time the center received it, and the alarms a
person must look at (`appliance fleet status`, `appliance fleet serve`).

Owns nothing on disk: the model is rebuilt from the broker's retained `online` and
`state` messages at each start (events are not retained: a center that was away sees
only events sent since). `Subscriber` is an MQTT client with one of the operations
center's read-only certificates (`ops-center-serve.pem` for `fleet serve`,
`ops-center-status.pem` for `fleet status`: never the client id of `fleet send`) that
subscribes to `appliance/+/online`, `state` and `events` and feeds `Fleet.receive`.

Retained messages on a clustered broker: RabbitMQ 3.x sends a retained message only to
a subscription of the topic itself, never to a wildcard one (rabbitmq-server issue 8824;
tests/test_ops_link_rabbitmq.py shows it). So after each CONNACK the subscriber also
subscribes to `appliance/<box>/online` and `state` of every box in the fleet CA's roster
(`fleet sign` writes it; pki.read_roster), in SUBSCRIBE packets of EXACT_PER_PACKET
filters, and unsubscribes each packet's filters once its SUBACK came: the broker sent
their retained messages with it, and the wildcard brings everything after (Mosquitto
would otherwise send each message twice). A box not in the roster (signed by another
CA folder) appears on such a broker at its next `state`. Plain MQTT 3.1.1: no box changes.

A box whose every certificate `fleet crl --revoke` revoked has left the roster
(pki.revoked_boxes): the view drops it and ignores its messages (`Fleet.exclude`), since
the broker keeps its retained `online` and `state` (Mosquitto sends them to the wildcard)
and a connected box keeps publishing until the broker is restarted with the new CRL. The
subscriber reads the roster at each CONNACK and, through `refresh`, whenever the file
changed (`fleet serve` calls it every second: a stat).

Everything a box sends is untrusted: a topic whose box name does not match
BOX_NAME, a payload over PAYLOAD_MAX_BYTES, not JSON or not an object is dropped and
counted (`Fleet.refused`); no more than BOXES_MAX boxes are kept; names of stages,
destinations and certificates longer than LABEL_MAX or beyond LABELS_MAX per box are
left out, so that what becomes a metric label or a table cell is bounded. Nothing is
logged with a box's text in it.

`alarms()` is the pure table of what needs a person (ALARMS, one row per alarm).

How it fails: the broker away makes every box go "last known at T" (and then silent);
`Subscriber` reconnects after RECONNECT_MIN_S..RECONNECT_MAX_S. The broker lets one
client per certificate in: two `fleet serve` (or two `fleet status`) at once take the
session from each other, and reconnect.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.errors import KeyFileError
from appliance.ops import messages

BOX_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
LABEL = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # stage, destination, certificate names
PAYLOAD_MAX_BYTES = 16384  # a state is at most 8192 (messages.STATE_MAX_BYTES)
BOXES_MAX = 1000
LABELS_MAX = 32
EVENTS_KEPT = 50
HEARTBEAT_S = 15.0  # the boxes' [operations] heartbeat_s (default): silent after 3 of them
SILENT_HEARTBEATS = 3
OLDEST_UNSENT_S = 30 * 60
CERT_WARN_S = 14 * 86400
RESERVE_MARGIN = 1.25  # "near the reserve": free below 1.25 x reserve
DROPPED_WINDOW_S = 3600.0  # events dropped: red for an hour after the count grew
KINDS = ("online", "state", "events")
RECONNECT_MIN_S, RECONNECT_MAX_S = 2, 60
RETAINED_KINDS = ("online", "state")  # what a box keeps on the broker
EXACT_PER_PACKET = 200  # topic filters in one SUBSCRIBE by name (~7 KB)


@dataclass
class Box:
    """What the center last heard from one box, with when it heard it (its own clock)."""
    name: str
    online: dict[str, Any] | None = None
    online_at: float | None = None
    state: dict[str, Any] | None = None
    state_at: float | None = None
    last_seen: float | None = None
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    event_seq: int = 0
    dropped: int = 0
    dropped_grew_at: float | None = None
    conn_seq: int = 0  # of the last `online: true`; a will of an older connection is stale


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _labels(items: Any) -> dict[str, Any]:
    """A box's mapping of names to values, with only well-formed names, at most LABELS_MAX."""
    if not isinstance(items, dict):
        return {}
    return {k: v for k, v in list(items.items())[:LABELS_MAX] if isinstance(k, str) and LABEL.fullmatch(k)}


class Fleet:
    """Thread-safe: `receive` from the MQTT thread, `view` from readers."""

    def __init__(self, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.heartbeat_s = heartbeat_s
        self.boxes: dict[str, Box] = {}
        self.refused = 0
        self.excluded: frozenset[str] = frozenset()  # boxes that left the roster (revoked)
        self._lock = threading.Lock()

    def exclude(self, names: frozenset[str]) -> list[str]:
        """From now on leave out `names` (the boxes revoked: pki.revoked_boxes), forgetting
        what was heard from them; a name not in `names` any more is heard again (signed
        anew). The names dropped from the view, sorted."""
        with self._lock:
            self.excluded = names
            gone = sorted(n for n in self.boxes if n in names)
            for n in gone:
                del self.boxes[n]
            return gone

    def receive(self, topic: str, payload: bytes, now: float) -> bool:
        """One message from the broker; False when it was dropped (and counted as refused,
        unless it came from an excluded box)."""
        doc = _parse(topic, payload)
        with self._lock:
            if doc is not None and doc[0] in self.excluded:
                return False
            if doc is None or (doc[0] not in self.boxes and len(self.boxes) >= BOXES_MAX):
                self.refused += 1
                return False
            name, kind, msg = doc
            box = self.boxes.setdefault(name, Box(name))
            box.last_seen = now
            getattr(self, f"_{kind}")(box, msg, now)
            return True

    def _online(self, box: Box, msg: dict[str, Any], now: float) -> None:
        seq = int(_number(msg.get("conn_seq")) or 0)
        if msg.get("online") is not True and seq < box.conn_seq:
            return  # the will of an older connection arriving late
        if msg.get("online") is True:
            box.conn_seq = seq
        box.online, box.online_at = msg, now

    def _state(self, box: Box, msg: dict[str, Any], now: float) -> None:
        box.state, box.state_at = msg, now
        events = _table(msg, "events")
        self._dropped(box, _number(events.get("dropped")), now)
        last = _number(events.get("last_seq"))
        if last is not None and last < box.event_seq:
            box.event_seq = int(last)  # the box's outbox was made anew (reinstalled): its numbers restart

    def _events(self, box: Box, msg: dict[str, Any], now: float) -> None:
        seq = int(_number(msg.get("event_seq")) or 0)
        self._dropped(box, _number(msg.get("dropped")), now)
        if seq <= box.event_seq:
            return  # sent again after a reconnect (event_seq grows on the box, across restarts)
        box.event_seq = seq
        box.events.append({**event_fields(msg), "received_at": now})

    @staticmethod
    def _dropped(box: Box, dropped: float | None, now: float) -> None:
        if dropped is not None and dropped > box.dropped:
            box.dropped, box.dropped_grew_at = int(dropped), now

    def view(self, now: float) -> list[dict[str, Any]]:
        """Every box, by name: its values, where each came from, and its alarms."""
        with self._lock:
            boxes = sorted(self.boxes.values(), key=lambda b: b.name)
            return [box_view(b, now, self.heartbeat_s) for b in boxes]

    def box(self, name: str, now: float) -> dict[str, Any] | None:
        with self._lock:
            b = self.boxes.get(name)
            return None if b is None else {**box_view(b, now, self.heartbeat_s), "events": list(b.events)}


EVENT_KEPT = frozenset({"v", "name", "boot_id", "event_seq", "ts", "dropped", "kind",
                        *(f for fields in messages.EVENT_FIELDS.values() for f in fields)})
TEXT_MAX = 64


def event_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """What the center keeps of an event: the schema's fields only, strings cut at TEXT_MAX,
    lists at LABELS_MAX (a box is trusted to be itself, not to be well-behaved)."""
    out: dict[str, Any] = {}
    for k, v in msg.items():
        if k not in EVENT_KEPT:
            continue
        if isinstance(v, list):
            out[k] = [str(x)[:TEXT_MAX] for x in v[:LABELS_MAX]]
        elif isinstance(v, str):
            out[k] = v[:TEXT_MAX]
        elif v is None or isinstance(v, int | float | bool):
            out[k] = v
    return out


def _parse(topic: str, payload: bytes) -> tuple[str, str, dict[str, Any]] | None:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "appliance" or parts[2] not in KINDS:
        return None
    if not BOX_NAME.fullmatch(parts[1]) or len(payload) > PAYLOAD_MAX_BYTES:
        return None
    try:
        msg = json.loads(payload)
    except ValueError:
        return None
    return (parts[1], parts[2], msg) if isinstance(msg, dict) else None


# --- one box's view: the values, and whether each is live ---

def box_view(b: Box, now: float, heartbeat_s: float) -> dict[str, Any]:
    st = b.state or {}
    online = bool(b.online and b.online.get("online") is True)
    live = online and b.state_at is not None and now - b.state_at <= SILENT_HEARTBEATS * heartbeat_s
    queue, disk = _table(st, "queue"), _table(st, "disk")
    v = {
        "name": b.name, "online": online, "live": live,
        "last_seen": b.last_seen, "state_received": b.state_at, "state_ts": _number(st.get("ts")),
        "version": st["version"][:TEXT_MAX] if isinstance(st.get("version"), str) else None,
        "queue": {k: int(n) for k, n in _labels(queue.get("items")).items() if _number(n) is not None},
        "parked": _number(queue.get("parked")), "paused": queue.get("paused") is True,
        "oldest_unsent_ts": _number(queue.get("oldest_unsent_ts")),
        "destinations": _destinations(st.get("destinations")),
        "stages": {k: s.get("state") for k, s in _labels(st.get("stages")).items()
                   if isinstance(s, dict) and isinstance(s.get("state"), str)},
        "free_bytes": _number(disk.get("free_bytes")), "reserve_bytes": _number(disk.get("reserve_bytes")),
        "certs": {k: n for k, n in _labels(st.get("certs")).items() if _number(n) is not None},
        "events_dropped": b.dropped, "dropped_grew_at": b.dropped_grew_at,
    }
    v["alarms"] = alarms(v, now, heartbeat_s)
    return v


def _table(msg: dict[str, Any], key: str) -> dict[str, Any]:
    v = msg.get(key)
    return v if isinstance(v, dict) else {}


def _destinations(ds: Any) -> list[dict[str, Any]]:
    out = []
    for d in ds[:LABELS_MAX] if isinstance(ds, list) else []:
        if isinstance(d, dict) and isinstance(d.get("name"), str) and LABEL.fullmatch(d["name"]):
            err = d.get("last_error")
            out.append({"name": d["name"], "up": d.get("up") is True, "off": d.get("off") is True,
                        "last_error": err[:TEXT_MAX] if isinstance(err, str) else None})
    return out


# --- what needs a person: one row per alarm, pure ---

def _silent(v: dict[str, Any], now: float, hb: float) -> bool:
    heard = v["state_received"]
    return heard is None or now - heard > SILENT_HEARTBEATS * hb


def _near_reserve(v: dict[str, Any]) -> bool:
    free, reserve = v["free_bytes"], v["reserve_bytes"]
    return free is not None and reserve is not None and free < RESERVE_MARGIN * reserve


ALARMS: tuple[tuple[str, Callable[[dict[str, Any], float, float], bool]], ...] = (
    ("offline", lambda v, now, hb: not v["online"]),
    ("silent", lambda v, now, hb: v["online"] and _silent(v, now, hb)),
    ("stage stuck", lambda v, now, hb: any(s in ("stuck", "dead") for s in v["stages"].values())),
    ("destination down", lambda v, now, hb: any(not d["up"] and not d["off"] for d in v["destinations"])),
    ("oldest unsent", lambda v, now, hb: v["oldest_unsent_ts"] is not None
     and now - v["oldest_unsent_ts"] > OLDEST_UNSENT_S),
    ("disk near reserve", lambda v, now, hb: _near_reserve(v)),
    ("certificate expiring", lambda v, now, hb: any(t - now < CERT_WARN_S for t in v["certs"].values())),
    ("events dropped", lambda v, now, hb: v["dropped_grew_at"] is not None
     and now - v["dropped_grew_at"] < DROPPED_WINDOW_S),
)


def alarms(v: dict[str, Any], now: float, heartbeat_s: float) -> list[str]:
    """The names of the alarms (ALARMS) raised by a box's view; empty: nobody is needed."""
    return [name for name, raised in ALARMS if raised(v, now, heartbeat_s)]


# --- the MQTT side ---

def tls_context(ca: Path, cn: str) -> ssl.SSLContext:
    """A client context of the operations center from the fleet CA folder (fleet ca
    init): ca.pem and the certificate `cn` (pki.CENTER_CNS)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        ctx.load_cert_chain(str(ca / f"{cn}.pem"), str(ca / f"{cn}.key"))
    except (OSError, ValueError) as e:  # missing, unreadable, not PEM (ssl.SSLError is an OSError)
        raise KeyFileError(f"{ca}: cannot load ca.pem and {cn}.pem/.key ({type(e).__name__});"
                           " made by `appliance fleet ca init` (or `fleet ca center` for a CA"
                           " made before)") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


Filters = list[tuple[str, int]]


def subscriptions(roster: list[str]) -> tuple[Filters, list[Filters]]:
    """The wildcard filters, and the by-name filters of the roster's boxes in packets of
    at most EXACT_PER_PACKET (at most BOXES_MAX boxes; names that are not box names are
    left out: a filter must never hold a wildcard)."""
    wildcard = [(f"appliance/+/{k}", 1) for k in KINDS]
    names = [n for n in roster if BOX_NAME.fullmatch(n)][:BOXES_MAX]
    exact = [(f"appliance/{n}/{k}", 1) for n in names for k in RETAINED_KINDS]
    return wildcard, [exact[i:i + EXACT_PER_PACKET] for i in range(0, len(exact), EXACT_PER_PACKET)]


def _signature(path: Path) -> tuple[int, ...] | None:
    """What tells a changed file (an atomic rewrite is a new inode); None: none there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Subscriber:
    """The center's MQTT client feeding a Fleet, on paho's own thread (reconnects)."""

    def __init__(self, fleet: Fleet, host: str, port: int, ca: Path, cn: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.fleet = fleet
        self.host, self.port, self.ca, self.cn = host, port, ca, cn
        self.subscribed = threading.Event()  # every SUBACK of the last connection came
        self.last_message = 0.0  # monotonic
        self._pending: dict[int, Filters] = {}  # SUBSCRIBE mid -> its by-name filters
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cn,
                             protocol=mqtt.MQTTv311, clean_session=True)
        self.c.tls_set_context(tls_context(ca, cn))
        self.c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self.connected_since: float | None = None  # None: not connected to the broker now
        self.on_change: Callable[[str], None] = lambda line: None
        self._roster_seen: tuple[int, ...] | None = None  # the roster file when last read
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.on_change(f"broker refused the connection ({rc})")  # a CONNACK code, not a peer's text
            return
        self.connected_since = time.time()
        roster = self._read_roster()
        wildcard, exact = subscriptions(roster)
        self._pending = {}
        for filters in (wildcard, *exact):  # paho's thread: no SUBACK is read before this returns
            _, mid = c.subscribe(filters)
            self._pending[mid] = filters if filters is not wildcard else []
        self.on_change("broker connected")

    def _read_roster(self) -> list[str]:
        """The roster's boxes, after excluding the revoked ones from the fleet; [] (and a
        line) when it cannot be read: the wildcards still bring every box's next state."""
        from appliance.ops import pki

        self._roster_seen = _signature(self.ca / pki.ROSTER)
        try:
            roster, revoked = pki.read_roster(self.ca), pki.revoked_boxes(self.ca)
        except OSError as e:
            self.on_change(f"cannot read {self.ca / pki.ROSTER} ({type(e).__name__}): boxes by wildcard only")
            return []
        gone = self.fleet.exclude(frozenset(revoked))
        if gone:
            self.on_change(f"left the roster (revoked), dropped from the view: {', '.join(gone)}")
        return roster

    def refresh(self) -> None:
        """Read the roster again when the file changed since it was last read (a stat):
        a box revoked since leaves the view now, not at the next connect."""
        from appliance.ops import pki

        if _signature(self.ca / pki.ROSTER) != self._roster_seen:
            self._read_roster()

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: Any, props: Any) -> None:
        exact = self._pending.pop(mid, None)
        if exact:  # their retained messages came with the SUBACK; the wildcard brings the rest
            c.unsubscribe([t for t, _ in exact])
        if not self._pending:
            self.subscribed.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.connected_since is not None:
            self.on_change(f"broker connection lost (another client with the {self.cn} certificate"
                           " takes the session, or the broker went away); reconnecting")
        self.connected_since = None

    def link(self) -> dict[str, Any]:
        """The broker connection as the page shows it."""
        return {"connected": self.connected_since is not None, "since": self.connected_since,
                "broker": f"{self.host}:{self.port}"}

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        self.last_message = time.monotonic()
        self.fleet.receive(m.topic, bytes(m.payload), time.time())

    def start(self) -> None:
        """Connect (OSError when the broker cannot be reached) and run the client's thread."""
        self.c.connect(self.host, self.port, keepalive=30)
        self.c.loop_start()

    def settle(self, timeout: float, quiet: float = 0.5) -> bool:
        """Wait for the retained messages: subscribed, then `quiet` s without a message,
        at most `timeout` s in all. False when the subscription did not come in time."""
        deadline = time.monotonic() + timeout
        if not self.subscribed.wait(max(0.0, deadline - time.monotonic())):
            return False
        start = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() - max(self.last_message, start) >= quiet:
                break
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self.on_change = lambda line: None  # our own DISCONNECT is not a lost connection
        self.c.disconnect()
        self.c.loop_stop()
