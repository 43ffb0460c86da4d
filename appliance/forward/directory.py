"""The `directory` transport: copies encrypted bundles into a local or mounted folder.

On disk: `<path>/<bundle id>.bundle`, written as `.tmp-*`, fsynced, renamed, and the
folder fsynced, so a reader of the folder (an rsync job, a NAS sync) never sees a
partial bundle. The folder must exist: if it does not (a NAS not mounted), writing into
the empty mount point would fill the local disk, so that is a retryable failure that
says so. The bundle stays encrypted: whoever reads the folder needs a recipient key.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

from appliance import durable
from appliance.forward import Permanent, Retryable

_CHUNK = 1 << 20


class DirectoryTransport:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None]) -> None:
        if not self.path.is_dir():
            raise Retryable(f"destination folder {self.path} does not exist (not mounted?)")
        target = self.path / bundle.name
        try:
            with bundle.open("rb") as src, durable.atomic_file(target, mode=0o600) as dst:
                done = 0
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    progress(done)
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise Retryable(f"cannot write to {self.path}: {e.strerror}") from None
            raise Retryable(f"writing to {self.path} failed: {e.strerror}") from None

    def close(self) -> None:
        pass



