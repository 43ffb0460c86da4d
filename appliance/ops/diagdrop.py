"""Diagnostics by SFTP: the `diagnostics` command's document uploaded to the center's
SFTP folder ([operations.diagnostics]) when the command asks `{"to": "sftp"}`.

On the wire: forward/sftp.py's connection (this box's key only, the host key pinned by
known_hosts or fingerprint, never learnt) and its atomic upload (`<name>.part`, fsync,
size check, posix-rename), so the center never sees a partial file. On the server:
`<dir>/<box>-<cmd_id>.json`, the same PHI-free JSON document the MQTT parts carry (cut to
the same size by diagnostics.pack): names of the box and a command token, nothing else.

Waits: the whole upload within `timeout_s` (a timer sets the transport's budget event,
which closes the connection within a second), a silent link given up after
`link_timeout_s`. One upload at a time (`busy`).

Fails as a reason class of messages.REASON_CLASSES (`Failed.reason`: "host key",
"rejected", "timeout", "refused", "unreachable", "connection lost", "missing", "failed");
the transport's own words (host, port, key file) go to this box's log only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import threading
from typing import Any

import structlog

from appliance.core.config import Destination, DiagnosticsPlace
from appliance.forward import Permanent, TransportError
from appliance.forward.failover import reason_class
from appliance.ops import diagnostics

log = structlog.get_logger("appliance.ops")


class Failed(Exception):
    """The upload did not happen; `reason` is a class of messages.REASON_CLASSES."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_class(e: TransportError) -> str:
    """The reason class of a transport's failure (pure: a small table over its words)."""
    text = str(e)
    if isinstance(e, Permanent):
        return "host key" if "host key" in text else "rejected"
    return reason_class(text, False)


def file_name(box: str, cmd_id: str) -> str:
    """`<box>-<cmd_id>.json`: both tokens (commands.TOKEN, the box's ops name)."""
    return f"{box}-{cmd_id}.json"


def destination(place: DiagnosticsPlace) -> Destination:
    """The place as an sftp destination, for forward/sftp.py (never forwarded to)."""
    return Destination(name="diagnostics", transport="sftp", host=place.sftp_host,
                       port=place.sftp_port, user=place.user, key=place.key,
                       known_hosts=place.known_hosts, host_key_sha256=place.host_key_sha256,
                       remote_dir=place.dir, timeout_s=place.timeout_s,
                       link_timeout_s=min(place.link_timeout_s, place.timeout_s))


class Drop:
    """Uploads one document at a time to the configured place."""

    def __init__(self, box: str, place: DiagnosticsPlace) -> None:
        from appliance.forward.sftp import SftpTransport  # noqa: PLC0415 - paramiko only when used

        self.box = box
        self.place = place
        self.transport = SftpTransport(destination(place), None)
        self._busy = threading.Lock()

    def reserve(self) -> bool:
        """Take the one upload slot (False: an upload runs); `upload` gives it back."""
        return self._busy.acquire(blocking=False)

    def upload(self, doc: dict[str, Any], cmd_id: str) -> dict[str, Any]:
        """Upload `doc` (after `reserve()`); the result names the file, its size and SHA-256.
        Raises Failed within timeout_s (plus a second)."""
        try:
            raw = gzip.decompress(diagnostics.pack(doc))  # cut as the MQTT parts would be
            name = file_name(self.box, cmd_id)
            cancelled = threading.Event()
            timer = threading.Timer(self.place.timeout_s, cancelled.set)
            timer.daemon = True
            timer.start()
            try:
                self.transport.put(name, io.BytesIO(raw), cancelled)
            except TransportError as e:
                cls = failure_class(e)
                log.warning("diagnostics.upload_failed", cmd_id=cmd_id, reason=cls, detail=str(e))
                raise Failed(cls) from None
            finally:
                timer.cancel()
        finally:
            self._busy.release()
        log.info("diagnostics.uploaded", cmd_id=cmd_id, bytes=len(raw))
        return {"to": "sftp", "file": posixpath.join(self.place.dir, name), "bytes": len(raw),
                "sha256": hashlib.sha256(raw).hexdigest(), "encoding": "json"}
