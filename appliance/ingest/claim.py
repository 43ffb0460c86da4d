"""Claiming bundles from the drop folder, so that each is ingested by exactly one process.

On disk: a complete bundle is `<drop_dir>/<id>.bundle` (uploaders write `<id>.bundle.part`
and rename it when complete; the `directory` transport writes a `.tmp-*` name and renames
it). A claim renames it to `<state_dir>/claimed/<id>~<token>.bundle` - one rename on one
file system, so when several ingest processes race for the same file exactly one rename
succeeds and the others get ENOENT. The random token keeps a second copy of the same id
from replacing a first one still in `claimed/`.

Who works on a claimed file: the process holding an exclusive `flock` on it, taken on
the file in the drop folder *before* the rename (a lock belongs to the file, not its
name, so it moves along) and released by closing the file, or by the kernel when the
process dies. So an unlocked file in `claimed/` is a claim whose process died, and the
next pass of any ingest process takes it back (`take`), no pid or boot id needed.
Every lock is checked against a rename in between (the path must still be the inode we
locked), so a file another process just finished and moved away is never worked on twice.
Decision: flock rather than pid files, because the kernel releases it exactly when the
process dies (kill -9 included); it needs `claimed/` on a local file system (flock on NFS
is emulated with POSIX locks, which also work, but keep the state dir local).

Names: bundle ids are taken from file names only when they are safe opaque ids
(`receipt.valid_bundle_id`); any other `*.bundle` name is left alone and logged once per
pass by the caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.core import durable
from appliance.ingest.receipt import valid_bundle_id

BUNDLE_SUFFIX = ".bundle"
_SEP = "~"


@dataclass
class Claim:
    """A claimed bundle file, locked by this process while the object is open."""

    path: Path
    bundle_id: str
    fd: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def token(self) -> str:
        return self.path.name[len(self.bundle_id) + 1 : -len(BUNDLE_SUFFIX)]

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the flock
            self.fd = -1


def bundle_id_of_drop(name: str) -> str | None:
    """`<id>.bundle` -> id, for a safe id; None for anything else (.part, temps, odd names)."""
    if not name.endswith(BUNDLE_SUFFIX) or name.startswith("."):
        return None
    bid = name[: -len(BUNDLE_SUFFIX)]
    return bid if valid_bundle_id(bid) else None


def bundle_id_of_claim(name: str) -> str | None:
    if not name.endswith(BUNDLE_SUFFIX) or _SEP not in name:
        return None
    bid = name.split(_SEP, 1)[0]
    return bid if valid_bundle_id(bid) else None


def take(path: Path, bundle_id: str) -> Claim | None:
    """Lock a file in `claimed/`; None if another process holds it or it moved on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Whoever held the lock may have finished and moved the file away meanwhile.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return Claim(path, bundle_id, fd)


def claim_new(drop_dir: Path, claimed_dir: Path, bundle_id: str) -> Claim | None:
    """Lock `<drop>/<id>.bundle`, then rename it into `claimed/`; None if another process
    holds or took it. Locking before the rename means a claim is never visible unlocked
    in `claimed/` while its claimer lives (the lock is on the file, not its name)."""
    source = drop_dir / f"{bundle_id}{BUNDLE_SUFFIX}"
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    target = claimed_dir / f"{bundle_id}{_SEP}{secrets.token_hex(6)}{BUNDLE_SUFFIX}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(source, target)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    # Both entries change: the claim must not come back into the drop after a power cut
    # while another copy of it is already being stored.
    durable.fsync_dir(claimed_dir)
    durable.fsync_dir(drop_dir)
    if os.stat(target).st_ino != os.fstat(fd).st_ino:
        # The file we locked was claimed and finished by another process before our
        # rename, which moved a newer copy dropped under the same name: lock that one.
        os.close(fd)
        return take(target, bundle_id)
    return Claim(target, bundle_id, fd)


def stale_claims(claimed_dir: Path) -> Iterator[tuple[Path, str]]:
    """Files in `claimed/` (locked or not: `take` tells), oldest name first."""
    with contextlib.suppress(FileNotFoundError):
        for p in sorted(claimed_dir.iterdir()):
            bid = bundle_id_of_claim(p.name)
            if bid is not None and p.is_file():
                yield p, bid


def drops(drop_dir: Path) -> tuple[list[str], int]:
    """Bundle ids of the complete bundles in the drop folder, in name order, and how many
    other `*.bundle` names are there that are not safe ids (left alone)."""
    ids, odd = [], 0
    for p in sorted(drop_dir.iterdir()):
        bid = bundle_id_of_drop(p.name)
        if bid is not None and p.is_file():
            ids.append(bid)
        elif p.name.endswith(BUNDLE_SUFFIX) and not p.name.startswith("."):
            odd += 1
    return ids, odd


@contextlib.contextmanager
def bundle_lock(locks_dir: Path, bundle_id: str) -> Iterator[bool]:
    """Hold `locks/<id>.lock` while one copy of `bundle_id` is ingested, so that a second
    copy claimed meanwhile by another process (the appliance sent it again) is left for a
    later pass, where it is found to be a duplicate. Yields False when another process
    holds it. The file is removed by its holder, still locked, when done (so the folder
    does not grow with every bundle); whoever opened it before that finds, once locked,
    that the path names another file or none, and opens it again."""
    path = locks_dir / f"{bundle_id}.lock"
    for _ in range(100):  # another round only when a holder removed it in between
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def settle(claim: Claim, folder: Path, reason: str | None = None) -> Path:
    """Move a claimed bundle to `done/` or `failed/` as `<id>.bundle` (or, when that name
    is taken by an earlier copy, `<id>~<token>.bundle`), with `<same>.reason.txt` beside
    it when a reason is given. The reason is written first: a failed bundle is never
    found without it."""
    durable.make_dirs(folder)
    stem = claim.bundle_id
    if (folder / f"{stem}{BUNDLE_SUFFIX}").exists():
        stem = f"{claim.bundle_id}{_SEP}{claim.token}"
    if reason is not None:
        durable.atomic_write(folder / f"{stem}.reason.txt", (reason + "\n").encode("utf-8"))
    target = folder / f"{stem}{BUNDLE_SUFFIX}"
    os.rename(claim.path, target)
    durable.fsync_dir(folder)
    durable.fsync_dir(claim.path.parent)
    return target
