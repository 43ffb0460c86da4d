"""What an operator has switched off: forwarding paused, destinations off.

Owned here and nowhere else. Kept durably in `STATE/forward-controls.json` (written with
core/durable.py), so a box paused for a reading center's maintenance window stays paused
through a power cut or a restart, and a destination switched off stays off, until an
operator (on site through the control socket, or the operations center by a signed
command) switches it back on.

What each switch means to the forwarder (forward/scheduler.py):
- paused: no lane claims a new item; a send in progress finishes. Receiving and packing
  go on, so nothing the scanner sends is refused because the uplink is paused.
- a destination off: it is not "up" for any claim, a failover item moves on to the next
  destination of its chain as if it were down, it is not probed, and its health record
  (failures, down/up) is left as it was. A send in progress to it finishes.

The file is small and read once at start; a file that cannot be read is logged and the
box starts with nothing switched off, rather than not starting (an unreadable switch
must not stop a stroke CT), and says so in the log.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from appliance.core import durable

log = structlog.get_logger("appliance.forward")

FILE = "forward-controls.json"
MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Switch:
    since: float
    by: str  # the operator (an account name, or ops-center:<key id>)


class Controls:
    """The operator's switches. Thread-safe; every change is durable before it returns."""

    def __init__(self, state_dir: Path, destinations: list[str]) -> None:
        self.path = state_dir / FILE
        self.destinations = list(destinations)
        self._lock = threading.Lock()
        self._paused: Switch | None = None
        self._off: dict[str, Switch] = {}
        self._load()

    # --- reading ---

    @property
    def paused(self) -> Switch | None:
        with self._lock:
            return self._paused

    def off(self) -> dict[str, Switch]:
        with self._lock:
            return dict(self._off)

    def is_off(self, name: str) -> bool:
        with self._lock:
            return name in self._off

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"paused": asdict(self._paused) if self._paused else None,
                    "off": {n: asdict(s) for n, s in self._off.items()}}

    # --- changing ---

    def pause(self, by: str, now: float | None = None) -> bool:
        """Pause forwarding; False if it was paused already (the first pause is kept)."""
        with self._lock:
            if self._paused is not None:
                return False
            self._paused = Switch(time.time() if now is None else now, by)
            self._save()
        return True

    def resume(self) -> bool:
        with self._lock:
            if self._paused is None:
                return False
            self._paused = None
            self._save()
        return True

    def switch_off(self, name: str, by: str, now: float | None = None) -> bool:
        self._known(name)
        with self._lock:
            if name in self._off:
                return False
            self._off[name] = Switch(time.time() if now is None else now, by)
            self._save()
        return True

    def switch_on(self, name: str) -> bool:
        self._known(name)
        with self._lock:
            if name not in self._off:
                return False
            del self._off[name]
            self._save()
        return True

    def _known(self, name: str) -> None:
        if name not in self.destinations:
            from appliance.core.errors import NotFoundError
            raise NotFoundError(f"no destination named {name!r}")

    # --- the file ---

    def _save(self) -> None:
        data = {"v": 1, "paused": asdict(self._paused) if self._paused else None,
                "off": {n: asdict(s) for n, s in sorted(self._off.items())}}
        durable.atomic_write(self.path, json.dumps(data, sort_keys=True).encode())

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return
        try:
            if len(raw) > MAX_BYTES:
                raise ValueError("too large")
            data = json.loads(raw)
            paused = data.get("paused")
            self._paused = _switch(paused) if paused is not None else None
            # a destination no longer in the config is forgotten (nothing to switch on)
            self._off = {n: _switch(s) for n, s in dict(data.get("off") or {}).items()
                         if n in self.destinations}
        except (ValueError, TypeError, AttributeError) as e:
            self._paused, self._off = None, {}
            log.error("forward.controls_unreadable", file=FILE, error_type=type(e).__name__)
            return
        if self._paused is not None:
            log.warning("forward.paused", since=self._paused.since, by=self._paused.by, at="start")
        for n, s in self._off.items():
            log.warning("destination.off", destination=n, since=s.since, by=s.by, at="start")


def _switch(d: Any) -> Switch:
    if not isinstance(d, dict):
        raise TypeError("not an object")
    since, by = d.get("since"), d.get("by")
    if not isinstance(since, (int, float)) or not isinstance(by, str):
        raise ValueError("bad switch")
    return Switch(float(since), by)
