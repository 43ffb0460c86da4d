"""The bundle writer: streams instances into an encrypted bundle (bundle/format.py)."""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from appliance.bundle.wire import (
    _REC,
    MANIFEST_VERSION,
    MAX_CHUNK,
    MAX_MANIFEST,
    MAX_RECIPIENTS,
    MIN_CHUNK,
    REC_DATA,
    REC_END,
    REC_MANIFEST,
    HybridPublicKey,
    InstanceInfo,
    Manifest,
    ManifestEntry,
    PublicKey,
    RecipientEntry,
    _check_bundle_id,
    _check_info,
    _encode_header,
    _info_from_mapping,
    _is_size,
    _suite_of,
    _wrap,
    payload_key,
    recipient_key_id,
    wrap_info,
)
from appliance.core import crypto

# --- writer -------------------------------------------------------------------------


class _Feed:
    """A push-fed iterator for `crypto.stream_seal_chunks`, which pulls one chunk ahead.

    The writer only advances the sealer when the chunk it will pull is already queued,
    so the sealer never sees an empty feed before `closed` (which ends the stream).
    """

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.closed = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> bytes:
        if self.queue:
            return self.queue.popleft()
        if self.closed:
            raise StopIteration
        raise RuntimeError("bundle writer: sealer ran ahead of its input")


def _start(
    dst: BinaryIO, bundle_id: str, recipients: Sequence[PublicKey], chunk_size: int, created: int
) -> tuple[bytes, bytes]:
    """Draw a data key, wrap it, write the header. Returns (header bytes, payload key)."""
    _check_bundle_id(bundle_id)
    if not recipients:
        raise ValueError("a bundle needs at least one recipient")
    if not all(isinstance(r, X25519PublicKey | HybridPublicKey) for r in recipients):
        raise TypeError("recipients must be X25519PublicKey or HybridPublicKey objects")
    if not isinstance(chunk_size, int) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be between {MIN_CHUNK} and {MAX_CHUNK}")
    if not _is_size(created) or created >= 1 << 64:
        raise ValueError("created must be a non-negative unix time")
    suites = {_suite_of(r) for r in recipients}
    if len(suites) != 1:
        raise ValueError("all recipients of a bundle must use the same key type")
    (suite,) = suites
    unique: dict[bytes, PublicKey] = {}
    for r in recipients:
        unique.setdefault(recipient_key_id(r), r)  # a key listed twice gets one entry
    key_ids, recipients = list(unique), list(unique.values())
    if len(recipients) > MAX_RECIPIENTS:
        raise ValueError(f"a bundle can have at most {MAX_RECIPIENTS} recipients")
    data_key = os.urandom(crypto.KEY_LEN)
    info = wrap_info(bundle_id, suite)
    entries = [
        RecipientEntry(k, _wrap(suite, data_key, r, info)) for k, r in zip(key_ids, recipients, strict=True)
    ]
    header = _encode_header(bundle_id, created, chunk_size, suite, entries)
    dst.write(header)
    return header, payload_key(data_key)


class BundleWriter:
    """Write one bundle to `dst`, streaming.

    Usage: `begin_instance(info)`, any number of `write(data)`, `end_instance()`, repeated
    per instance; then `close()`, which writes the manifest and the final chunk and returns
    the manifest. The header is written by the constructor. `dst` receives bytes as they
    are sealed, so write to a temp file and keep it only after `close()` returned.
    """

    def __init__(
        self,
        dst: BinaryIO,
        bundle_id: str,
        recipients: Sequence[PublicKey],
        study_key: str,
        chunk_size: int = crypto.DEFAULT_CHUNK,
        *,
        created: int | None = None,
    ) -> None:
        if not isinstance(study_key, str):
            raise ValueError("study key must be a string")
        when = int(time.time()) if created is None else created
        self._header, key = _start(dst, bundle_id, recipients, chunk_size, when)
        self._dst = dst
        self._bundle_id = bundle_id
        self._study_key = study_key
        self._chunk = chunk_size
        self._buf = bytearray()
        self._feed = _Feed()
        self._sealer = crypto.stream_seal_chunks(key, self._header, self._feed)
        self._started = False
        self._entries: list[ManifestEntry] = []
        self._current: InstanceInfo | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._closed = False

    @property
    def header(self) -> bytes:
        return self._header

    def begin_instance(self, info: InstanceInfo | Mapping[str, Any]) -> None:
        """Start the next instance. `info` is an InstanceInfo or a mapping of its fields."""
        self._check_open()
        if self._current is not None:
            raise RuntimeError("begin_instance: the previous instance was not ended")
        if not isinstance(info, InstanceInfo):
            info = _info_from_mapping(info)
        _check_info(info)
        self._current = info
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to the current instance (one DATA record per non-empty call)."""
        self._check_open()
        if self._current is None:
            raise RuntimeError("write: no instance begun")
        n = len(memoryview(data).cast("B"))
        if n == 0:
            return
        self._emit(_REC.pack(REC_DATA, n))
        self._emit(data)
        self._hash.update(data)
        self._size += n

    def end_instance(self) -> ManifestEntry:
        self._check_open()
        info = self._current
        if info is None:
            raise RuntimeError("end_instance: no instance begun")
        self._emit(_REC.pack(REC_END, 0))
        entry = ManifestEntry(
            index=len(self._entries),
            sop_instance_uid=info.sop_instance_uid,
            sop_class=info.sop_class,
            transfer_syntax=info.transfer_syntax,
            received_transfer_syntax=info.received_transfer_syntax,
            received_size=info.received_size,
            received_sha256=info.received_sha256,
            size=self._size,
            sha256=self._hash.hexdigest(),
            action=info.action,
            reason=info.reason,
        )
        self._entries.append(entry)
        self._current = None
        return entry

    def close(self) -> Manifest:
        """Write the manifest record and the final chunk. Does not close `dst`."""
        self._check_open()
        if self._current is not None:
            raise RuntimeError("close: the current instance was not ended")
        self._closed = True
        manifest = Manifest(MANIFEST_VERSION, self._bundle_id, self._study_key, tuple(self._entries))
        raw = manifest.to_json_bytes()
        if len(raw) > MAX_MANIFEST:
            raise ValueError("manifest too large")
        self._emit(_REC.pack(REC_MANIFEST, len(raw)))
        self._emit(raw)
        self._feed.queue.append(bytes(self._buf))
        self._buf.clear()
        self._feed.closed = True
        for ct in self._sealer:
            self._dst.write(ct)
        return manifest

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("bundle writer is closed")

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        # A chunk is handed to the sealer only once a later byte exists, so the final
        # chunk is never empty and is at most chunk_size (the same split as read_chunks).
        mv = memoryview(data).cast("B")
        pos, n = 0, len(mv)
        while pos < n:
            if len(self._buf) == self._chunk:
                self._push(bytes(self._buf))
                self._buf.clear()
            take = min(self._chunk - len(self._buf), n - pos)
            self._buf += mv[pos : pos + take]
            pos += take

    def _push(self, chunk: bytes) -> None:
        self._feed.queue.append(chunk)
        # The first next() pulls two chunks (one of look-ahead), later ones one each.
        if len(self._feed.queue) >= (1 if self._started else 2):
            self._dst.write(next(self._sealer))
            self._started = True
