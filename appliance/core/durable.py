"""Durability helpers: the one place in the appliance that calls fsync.

What each helper protects against a power cut:

- `atomic_write` / `AtomicFile`: after it returns, the target name holds either the
  complete new content or (if the power failed before it returned) whatever it held
  before, never a torn mix. Order: write to a temp name in the same directory, fsync the
  file (data + size reach the disk), rename over the target (atomic on POSIX), fsync the
  directory (the rename itself reaches the disk). Without the last fsync a crash can
  bring back the old name after we already told a peer "stored".
- `fsync_dir`: makes creations, renames and unlinks inside a directory durable.
- `fsync_file`: makes what was written to an open file (data and size) durable, for
  the writers that rename or record it themselves once it is (a spool file sealed as
  it arrives, extracted instances, a new key file).
- `free_bytes`: free space for unprivileged writers on the filesystem holding a path.

Temp files are named `.tmp-<random>` so that recovery can recognise and remove the ones
a crash left behind (`remove_stale_temps`). Nothing here logs or knows about DICOM.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(f: BinaryIO) -> None:
    """Flush `f` and make its data and size durable (not its name: `fsync_dir` the
    directory for that)."""
    f.flush()
    os.fsync(f.fileno())


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """Create `path` and missing parents, fsyncing each parent whose entries changed."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=mode)
        fsync_dir(d.parent)


@contextlib.contextmanager
def atomic_file(target: Path, mode: int = 0o600, sync: bool = True) -> Iterator[BinaryIO]:
    """Yield a file to write; on clean exit it replaces `target` atomically and durably.

    On an exception the temp file is removed and `target` is untouched. With
    `sync=False` the caller promises to call `fsync_dir(target.parent)` itself (used to
    batch the directory fsync of many files); the file data is still fsynced here.
    """
    tmp = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            fsync_file(f)
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(target.parent)


def atomic_write(target: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `target` with `data`, atomically and durably (see module docstring)."""
    with atomic_file(target, mode) as f:
        f.write(data)


def unlink_durable(path: Path) -> bool:
    """Remove `path` and make the removal durable. Returns False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def free_bytes(path: Path) -> int:
    """Bytes available to unprivileged writers on the filesystem that holds `path`.

    We use f_bavail rather than f_bfree: the root-reserved blocks are not ours to plan
    with, even though the daemon may run as root on some images.
    """
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files a crash left in `directory`; return how many were removed.

    A temp file is never referenced by the index (records are written only after the
    rename), so removing one cannot lose acknowledged data.
    """
    removed = 0
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    if removed:
        fsync_dir(directory)
    return removed
