"""Diagnostics: what a person at the operations center needs to see of a box at 3 a.m.,
without SSH and without patient data.

One JSON document: the box's status (`Daemon.snapshot()`, PHI-free by design), its
effective configuration with secrets elided (`config.effective`; values of keys that name
a password, token, secret or passphrase are replaced), the software versions, and the
most recent log events (a ring of the last `RECENT_MAX` events at INFO and above, kept in
memory by a log tap). Log lines hold opaque ids only by the project's rule; the ring
keeps even less: numbers, booleans, and strings that are short tokens (names, ids,
classes). Any other text (a peer's error message, which can quote patient data) is
replaced by `"<text>"` before it is kept, so a mistake elsewhere cannot leak through here.

Sent gzip-compressed, in parts of at most `PART_BYTES` (128 KiB once base64-encoded) on
`appliance/<name>/diagnostics/<cmd_id>`, QoS 1, not retained, before the command's
result, which names the parts and the SHA-256 of the whole (`appliance fleet diagnostics`
puts them together and checks it). On site, `appliance diagnostics --out FILE` writes the
same document from the control socket.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import io
import json
import math
import platform
import re
import threading
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

SCHEMA = 1
RECENT_MAX = 1000
PART_BYTES = 96 * 1024  # raw; base64 makes it 128 KiB
MAX_PARTS = 40  # 3.75 MiB compressed at most: the log ring is cut to fit
SAFE = re.compile(r"[A-Za-z0-9._:/@+=,-]{0,80}\Z")  # ids, names, classes, paths of opaque names
SECRET_KEY = re.compile(r"password|passphrase|secret|token(?!_file)", re.IGNORECASE)
PACKAGES = ("appliance", "pynetdicom", "pydicom", "cryptography", "paho-mqtt", "paramiko",
            "prometheus-client", "structlog", "pylibjpeg", "pylibjpeg-openjpeg")


def safe_value(v: Any) -> Any:
    """What the ring keeps of one field: numbers, booleans, None and short tokens as they
    are; a short list of those; anything else as "<text>"."""
    if v is None or isinstance(v, bool | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, str):
        return v if SAFE.match(v) else "<text>"
    if isinstance(v, list | tuple) and len(v) <= 16:
        kept = [safe_value(x) for x in v]
        return kept if all(not isinstance(x, list) for x in kept) else "<text>"
    return "<text>"


class Recent:
    """A log tap (core/log.add_tap) that keeps the last `size` events, made safe."""

    def __init__(self, size: int = RECENT_MAX) -> None:
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(self, kind: str, fields: Mapping[str, Any]) -> None:
        entry = {"ts": round(time.time(), 3), "event": kind if SAFE.match(kind) else "<text>",
                 "level": str(fields.get("level", "")),
                 **{k: safe_value(v) for k, v in fields.items()
                    if k not in ("event", "level", "timestamp") and SAFE.match(k)}}
        with self._lock:
            self._ring.append(entry)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._ring)


def elide(doc: Any) -> Any:
    """A config tree with the values of secret-naming keys replaced."""
    if isinstance(doc, dict):
        return {k: ("<elided>" if SECRET_KEY.search(str(k)) and v not in (None, "") else elide(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [elide(x) for x in doc]
    return doc


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "system": f"{platform.system()} {platform.release()}"}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def collect(snapshot: dict[str, Any], effective: dict[str, Any], recent: list[dict[str, Any]],
            now: float | None = None) -> dict[str, Any]:
    return {"v": SCHEMA, "name": snapshot.get("name"), "created": time.time() if now is None else now,
            "versions": versions(), "status": snapshot, "config": elide(effective), "log": recent}


def pack(doc: dict[str, Any]) -> bytes:
    """gzip of the JSON, cut (oldest log events first) to fit MAX_PARTS parts."""
    while True:
        blob = gzip.compress(json.dumps(doc, default=str, sort_keys=True).encode(), mtime=0)
        if len(blob) <= PART_BYTES * MAX_PARTS or not doc.get("log"):
            return blob
        log = doc["log"]
        doc = {**doc, "log": log[len(log) // 2:], "log_cut": doc.get("log_cut", 0) + len(log) // 2}


def parts(blob: bytes, cmd_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The part messages, and the summary for the command's result."""
    n = max(1, math.ceil(len(blob) / PART_BYTES))
    digest = hashlib.sha256(blob).hexdigest()
    msgs = [{"v": SCHEMA, "cmd_id": cmd_id, "part": i + 1, "parts": n, "sha256": digest,
             "data": base64.b64encode(blob[i * PART_BYTES:(i + 1) * PART_BYTES]).decode()}
            for i in range(n)]
    return msgs, {"parts": n, "bytes": len(blob), "sha256": digest, "encoding": "gzip+json"}


class Assembler:
    """The center's side: collect the parts of one command's diagnostics."""

    def __init__(self, cmd_id: str, max_parts: int = MAX_PARTS) -> None:
        self.cmd_id = cmd_id
        self.max_parts = max_parts
        self.got: dict[int, bytes] = {}
        self.parts = 0
        self.sha256 = ""

    def add(self, msg: Mapping[str, Any]) -> None:
        if msg.get("cmd_id") != self.cmd_id:
            return
        part, total = msg.get("part"), msg.get("parts")
        if not (isinstance(part, int) and isinstance(total, int) and 1 <= part <= total <= self.max_parts):
            return
        self.parts, self.sha256 = total, str(msg.get("sha256", ""))
        self.got[part] = base64.b64decode(str(msg.get("data", "")), validate=True)

    def complete(self) -> bool:
        return self.parts > 0 and len(self.got) == self.parts

    def document(self) -> dict[str, Any]:
        """The document, once complete; ValueError if the parts do not make the digest."""
        blob = b"".join(self.got[i] for i in range(1, self.parts + 1))
        if hashlib.sha256(blob).hexdigest() != self.sha256:
            raise ValueError("the diagnostics parts do not match their SHA-256")
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
            raw = f.read(64 << 20)  # a cap on what we inflate
        doc: dict[str, Any] = json.loads(raw)
        return doc
