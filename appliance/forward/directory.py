"""The `directory` transport: copies encrypted bundles into a local or mounted folder.

On disk: `<path>/<bundle id>.bundle`, written as `.tmp-*`, fsynced, renamed, and the
folder fsynced, so a reader of the folder (an rsync job, a NAS sync) never sees a
partial bundle. The folder must exist: if it does not (a NAS not mounted), writing into
the empty mount point would fill the local disk, so that is a retryable failure that
says so. A folder the appliance may not write (EROFS: outside the systemd unit's
writable paths, or a read-only share; EACCES/EPERM: its owner or mode) will not heal by
itself: that is `Permanent`, and the reason names the fix, so the bundle is held where
an operator sees it instead of being retried forever. The bundle stays encrypted:
whoever reads the folder needs a recipient key.

The bundle is verified with the appliance's private key in the same pass that copies
it (every chunk, the record grammar, the manifest against each instance): a bundle that
fails authentication never counts as delivered; the copy is dropped and `Unreadable`
sends the file to quarantine, as the dicom transport does.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from appliance.bundle import format as bundle_format
from appliance.bundle.format import PrivateKey
from appliance.core import durable
from appliance.core.errors import IntegrityError
from appliance.forward import Answer, Permanent, Plan, Retryable, Unreadable, bandwidth
from appliance.forward.bandwidth import Cap

if TYPE_CHECKING:
    from appliance.core.config import Destination
    from appliance.forward.registry import Context

_CHUNK = 1 << 20
_UNIT_FIX = ("under systemd the folder must be in the unit's writable paths:"
             " `appliance config systemd-dropin --write`, `systemctl daemon-reload`,"
             " `systemctl restart appliance`")
_OWNER_FIX = "make the folder writable by the appliance's user"
# errno -> what the operator must do before releasing the held bundles.
_NEEDS_A_HUMAN = {
    errno.EROFS: f"the file system is read-only to the appliance ({_UNIT_FIX})",
    errno.EACCES: _OWNER_FIX,
    errno.EPERM: _OWNER_FIX,
}


class _Copying:
    """A reader that writes what it reads to `dst` and reports the count; it stops with
    Retryable once `cancelled` is set (the attempt's time budget ran out)."""

    def __init__(self, src: BinaryIO, dst: BinaryIO, progress: Callable[[int], None],
                 cancelled: threading.Event, cap: Cap) -> None:
        self._src, self._dst, self._progress = src, dst, progress
        self._cancelled = cancelled
        self._cap = cap
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        if self._cancelled.is_set():
            raise Retryable("the copy ran out of its time budget (is the folder very slow?)")
        data = self._src.read(n)
        if data:
            self._cap.take(len(data), self._cancelled)
            self._dst.write(data)
            self.done += len(data)
            self._progress(self.done)
        return data


class DirectoryTransport:
    def __init__(self, name: str, path: Path, private_key: PrivateKey, cap: Cap | None = None) -> None:
        self.name = name
        self.path = path
        self.private_key = private_key
        self.cap = cap or Cap(0)  # a share on a shared link may be capped

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        """Copy the whole bundle file: a folder takes a bundle whole or not at all, so
        `plan.skip`/`only` do not apply (this transport never blames an instance)."""
        plan = plan or Plan()
        if not self.path.is_dir():
            raise Retryable(f"destination folder {self.path} does not exist (not mounted?)")
        target = self.path / bundle.name
        try:
            src = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue", bundle=True) from None
        except OSError as e:
            raise Retryable(f"cannot read the bundle: {e.strerror}", bundle=True) from None
        try:
            with src, durable.atomic_file(target, mode=0o600) as dst:
                copying = _Copying(src, dst, progress, plan.cancelled, self.cap)
                # read_manifest only calls read(); _Copying is not a whole BinaryIO
                manifest = bundle_format.read_manifest(copying, self.private_key)  # type: ignore[arg-type]
                while copying.read(_CHUNK):
                    pass
        except IntegrityError as e:
            raise Unreadable(f"bundle does not verify: {e}") from None
        except FileNotFoundError:  # the folder went away after the check (unmounted)
            raise Retryable(f"destination folder {self.path} does not exist (not mounted?)") from None
        except OSError as e:
            if e.errno in _NEEDS_A_HUMAN:
                raise Permanent(f"cannot write to {self.path}: {e.strerror}; {_NEEDS_A_HUMAN[e.errno]},"
                                " then `appliance queue release --all`") from None
            raise Retryable(f"writing to {self.path} failed: {e.strerror}") from None
        for entry in manifest.instances:  # the folder now holds every instance of it
            plan.delivered(entry.index)

    def probe(self) -> bool:
        return self.check().ok

    def check(self) -> Answer:
        """The folder is there (a share that is mounted) and this user may write in it."""
        if not self.path.is_dir():
            return Answer(False, f"folder {self.path} does not exist (not mounted?)")
        if not os.access(self.path, os.W_OK | os.X_OK):
            return Answer(False, f"folder {self.path} is there but not writable by this user"
                                 " (or its file system is read-only)")
        return Answer(True, f"folder {self.path} is there and writable")

    def close(self) -> None:
        pass





def build(dest: Destination, context: Context) -> DirectoryTransport:
    """The registry's factory (`forward.registry`)."""
    assert dest.path is not None
    return DirectoryTransport(dest.name, dest.path, context.key, bandwidth.for_destination(dest))
