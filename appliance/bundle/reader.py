"""The bundle reader: verifies, scans and extracts an encrypted bundle (bundle/format.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke

from appliance.bundle.wire import (
    _BEGIN,
    _DATA,
    _END,
    _REC,
    MAX_MANIFEST,
    REC_DATA,
    REC_END,
    REC_MANIFEST,
    SUITE_NAMES,
    Header,
    HybridPrivateKey,
    Manifest,
    ManifestEntry,
    PrivateKey,
    _hpke_suite,
    _parse_manifest,
    _suite_of,
    payload_key,
    read_header,
    recipient_key_id,
    wrap_info,
)
from appliance.core import crypto, durable
from appliance.core.errors import IntegrityError, UsageError

# --- reader -------------------------------------------------------------------------


def _unwrap(header: Header, private_key: PrivateKey) -> bytes:
    kind = _suite_of(private_key)
    if kind != header.suite:
        raise IntegrityError(
            f"this is a {SUITE_NAMES[kind]} key but the bundle's keys are wrapped with {header.suite_name}"
        )
    kid = recipient_key_id(private_key.public_key())
    entry = next((r for r in header.recipients if r.key_id == kid), None)
    if entry is None:
        raise IntegrityError(
            f"no recipient entry for this key (key id {kid.hex()}): the bundle was sealed"
            " for other keys, or its header was altered"
        )
    info = wrap_info(header.bundle_id, header.suite, header.version)
    try:
        if isinstance(private_key, HybridPrivateKey):
            hk = hpke.MLKEM768X25519PrivateKey(private_key.mlkem, private_key.x25519)
            data_key = _hpke_suite(header.suite).decrypt(entry.wrapped_key, hk, info=info)
        else:
            data_key = _hpke_suite(header.suite).decrypt(entry.wrapped_key, private_key, info=info)
    except (InvalidTag, ValueError):
        data_key = b""
    if len(data_key) != crypto.KEY_LEN:
        raise IntegrityError("key does not unwrap the data key: the wrapped key or the header was altered")
    return data_key


def _open(src: BinaryIO, private_key: PrivateKey) -> tuple[Header, Iterator[bytes]]:
    header = read_header(src)
    key = payload_key(_unwrap(header, private_key))
    return header, crypto.stream_open(key, header.raw, src, header.chunk_size)


class _Scanner:
    """Parse verified body plaintext into instance events and check it against the manifest.

    `events` yields (_BEGIN, empty), (_DATA, piece) and (_END, empty); `index` is the
    current instance. When `events` is exhausted without error, the STREAM has verified
    to its last chunk and `manifest` is set and matches every instance's size and sha256.
    A DATA piece is a view into the current chunk: use it before the next event.
    """

    def __init__(self, header: Header) -> None:
        self.header = header
        self.index = -1
        self.manifest: Manifest | None = None
        self._sizes: list[int] = []
        self._digests: list[str] = []

    def events(self, plain: Iterator[bytes]) -> Iterator[tuple[int, memoryview]]:
        empty = memoryview(b"")
        rec = bytearray()
        rtype = 0
        remaining = 0
        in_instance = False
        manifest_buf = bytearray()
        hasher = hashlib.sha256()
        size = 0
        for chunk in plain:
            mv = memoryview(chunk)
            pos, n = 0, len(mv)
            while pos < n:
                if self.manifest is not None:
                    raise IntegrityError("bundle has data after its manifest")
                if remaining:
                    take = min(remaining, n - pos)
                    piece = mv[pos : pos + take]
                    pos += take
                    remaining -= take
                    if rtype == REC_DATA:
                        hasher.update(piece)
                        size += take
                        yield _DATA, piece
                    else:
                        manifest_buf += piece
                        if not remaining:
                            self._finish(bytes(manifest_buf))
                    continue
                take = min(_REC.size - len(rec), n - pos)
                rec += mv[pos : pos + take]
                pos += take
                if len(rec) < _REC.size:
                    continue
                rtype, length = _REC.unpack(rec)
                rec.clear()
                if rtype in (REC_DATA, REC_END):
                    if not in_instance:
                        in_instance = True
                        self.index += 1
                        hasher, size = hashlib.sha256(), 0
                        yield _BEGIN, empty
                    if rtype == REC_DATA:
                        remaining = length
                        continue
                    if length:
                        raise IntegrityError(f"bundle instance {self.index}: END record has a length")
                    in_instance = False
                    self._sizes.append(size)
                    self._digests.append(hasher.hexdigest())
                    yield _END, empty
                elif rtype == REC_MANIFEST:
                    if in_instance:
                        raise IntegrityError(f"bundle instance {self.index} is not ended before the manifest")
                    if length > MAX_MANIFEST:
                        raise IntegrityError("bundle manifest is too large")
                    remaining = length
                    if not remaining:
                        self._finish(b"")
                else:
                    raise IntegrityError(f"bundle has an unknown record type 0x{rtype:02x}")
        if self.manifest is None:
            if rec or remaining:
                raise IntegrityError("bundle body ends inside a record")
            raise IntegrityError("bundle has no manifest")

    def _finish(self, raw: bytes) -> None:
        m = _parse_manifest(raw)
        if m.bundle_id != self.header.bundle_id:
            raise IntegrityError("bundle manifest names a different bundle id than the header")
        if len(m.instances) != len(self._sizes):
            raise IntegrityError(
                f"bundle manifest lists {len(m.instances)} instances but the body holds {len(self._sizes)}"
            )
        for e, size, digest in zip(m.instances, self._sizes, self._digests, strict=True):
            if e.size != size or e.sha256 != digest:
                raise IntegrityError(f"bundle instance {e.index} does not match its manifest entry")
        self.manifest = m


def _scan_all(src: BinaryIO, private_key: PrivateKey) -> tuple[Header, Manifest]:
    header, plain = _open(src, private_key)
    scanner = _Scanner(header)
    for _ in scanner.events(plain):
        pass
    assert scanner.manifest is not None
    return header, scanner.manifest


def read_manifest(src: BinaryIO, private_key: PrivateKey) -> Manifest:
    """Verify the whole bundle (reading it to the end) and return its manifest. Writes nothing."""
    return _scan_all(src, private_key)[1]


def iter_instances(src: BinaryIO, private_key: PrivateKey) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Yield (manifest entry, transmitted bytes) per instance, in bundle order.

    For a forwarder that keeps plaintext off the disk: holds one instance in memory. `src`
    must be seekable: a first pass verifies the whole bundle before anything is yielded;
    the second pass decrypts again and checks each instance's size and sha256 against the
    verified manifest before yielding it (`VerifiedBundle`, each stream read whole).
    """
    for entry, stream in VerifiedBundle(src, private_key).streams():
        yield entry, stream.read()


class InstanceStream:
    """One instance of a verified bundle, read piece by piece (the bundle's second pass).

    `read(n)` returns up to `n` bytes (`n` < 0: the rest, returned only once verified). It
    returns b"" (the end) only after the bytes read matched the verified manifest entry's
    size and SHA-256, and raises `IntegrityError` instead when they did not (the file
    changed between the passes: truncated, replaced). The bytes before the end come from
    chunks that opened, but the *instance* is proven whole and unaltered only at the end:
    a consumer that streams them onward must hold back its last piece until `read`
    returned b"" (the dicom transport sends the final P-DATA fragment only then) and
    otherwise abandon what it passed on.
    """

    def __init__(self, entry: ManifestEntry, pieces: Iterator[memoryview]) -> None:
        self.entry = entry
        self.size = entry.size
        self._pieces = pieces
        self._cur = memoryview(b"")
        self._pos = 0
        self._seen = 0
        self._hasher = hashlib.sha256()
        self._eof = False
        self._failed: IntegrityError | None = None

    def _pull(self) -> bool:
        """Load the next piece; False at the (verified) end. Once it raised, it raises
        again on every call: a failed stream never reports a clean end."""
        if self._failed is not None:
            raise IntegrityError(str(self._failed))
        if self._eof:
            return False
        try:
            return self._next_piece()
        except IntegrityError as e:
            self._failed = e
            self._cur, self._pos = memoryview(b""), 0
            raise

    def _next_piece(self) -> bool:
        for piece in self._pieces:
            if not piece:
                continue
            self._seen += len(piece)
            if self._seen > self.entry.size:
                raise IntegrityError("bundle changed while it was being read")
            self._hasher.update(piece)
            self._cur, self._pos = piece, 0
            return True
        if self._seen != self.entry.size or self._hasher.hexdigest() != self.entry.sha256:
            raise IntegrityError("bundle changed while it was being read")
        self._eof = True
        self._cur, self._pos = memoryview(b""), 0
        return False

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            out = bytearray(self._cur[self._pos :])
            self._pos = len(self._cur)
            while self._pull():
                out += self._cur
                self._pos = len(self._cur)
            return bytes(out)
        if n == 0:
            return b""
        if self._pos >= len(self._cur) and not self._pull():
            return b""
        piece = self._cur[self._pos : self._pos + n]
        self._pos += len(piece)
        return bytes(piece)

    def drain(self) -> None:
        """Read (and verify) whatever the consumer left."""
        self._pos = len(self._cur)
        while self._pull():
            self._pos = len(self._cur)


class VerifiedBundle:
    """A bundle verified by a full first pass, whose instances are then read again.

    `VerifiedBundle(src, key)` runs every check of `read_manifest` (and raises
    `IntegrityError` like it); `manifest` is then the verified manifest. `streams()`
    decrypts the bundle a second time and yields `(entry, InstanceStream)` per instance
    in order, for a forwarder that must neither put plaintext on disk nor hold a large
    instance in memory: memory stays at a few bundle chunks. A stream must be used
    before the next is requested (unread bytes are then read and verified). `src` must be
    seekable and stay open while the streams are read.
    """

    def __init__(self, src: BinaryIO, private_key: PrivateKey) -> None:
        self._src = src
        self._key = private_key
        self._start = src.tell()
        self._header, self.manifest = _scan_all(src, private_key)

    def streams(self) -> Iterator[tuple[ManifestEntry, InstanceStream]]:
        changed = "bundle changed while it was being read"
        self._src.seek(self._start)
        header, plain = _open(self._src, self._key)
        if header.raw != self._header.raw:
            raise IntegrityError(changed)
        scanner = _Scanner(header)
        events = scanner.events(plain)

        def pieces() -> Iterator[memoryview]:
            for kind, piece in events:
                if kind == _DATA:
                    yield piece
                elif kind == _END:
                    return
                else:
                    raise IntegrityError(changed)

        instances = self.manifest.instances
        for kind, _ in events:
            if kind != _BEGIN or scanner.index >= len(instances):
                raise IntegrityError(changed)
            entry = instances[scanner.index]
            stream = InstanceStream(entry, pieces())
            yield entry, stream
            stream.drain()
        if scanner.index + 1 != len(instances):
            raise IntegrityError(changed)


def extract(src: BinaryIO, private_key: PrivateKey, out_dir: Path) -> Manifest:
    """Verify the bundle and write instance i to `out_dir/<i>.dcm` (mode 0600).

    Instances go to `out_dir/.tmp-*` while the bundle is read and are renamed only after
    the whole bundle has verified (every chunk, the end of the stream, the manifest and
    each instance's size and sha256); on any failure the temps are removed and nothing is
    left. `out_dir` is created if missing; an existing `<i>.dcm` is never overwritten
    (`UsageError`).
    """
    header, plain = _open(src, private_key)
    durable.make_dirs(out_dir)
    temps: list[Path] = []
    done: list[Path] = []
    f: BinaryIO | None = None
    try:
        scanner = _Scanner(header)
        for kind, piece in scanner.events(plain):
            if kind == _BEGIN:
                tmp = out_dir / f"{durable.TEMP_PREFIX}{secrets.token_hex(8)}"
                f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                temps.append(tmp)
            elif kind == _DATA:
                assert f is not None
                f.write(piece)
            else:
                assert f is not None
                durable.fsync_file(f)
                f.close()
                f = None
        manifest = scanner.manifest
        assert manifest is not None
        targets = [out_dir / f"{i}.dcm" for i in range(len(temps))]
        for t in targets:
            if t.exists() or t.is_symlink():
                raise UsageError(f"{t} already exists; extract into an empty directory")
        for tmp, t in zip(temps, targets, strict=True):
            os.rename(tmp, t)
            done.append(t)
        durable.fsync_dir(out_dir)
        return manifest
    except BaseException:
        if f is not None:
            f.close()
        for p in temps + done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
