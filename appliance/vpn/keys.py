"""The box's WireGuard private key: made once, on /data, never replaced.

The file holds the key as `wg genkey` prints it (base64 of 32 bytes, clamped, one line).
systemd-networkd reads it (`PrivateKeyFile=`) as the user systemd-network, not as root,
so, as systemd.netdev(5) advises, a key made by root is `root:systemd-network` mode 0640
in a folder of its own that is `root:systemd-network` 0750 (`/data/vpn`): networkd can
read it and not change it; the appliance daemon's user cannot read it at all (it has no
need to). Made by anyone else (a test, a developer's box), it is 0600 and theirs.
`check_reachable` refuses a key networkd could not read (a folder on the way closed to
it), because networkd would only log that and leave the tunnel down.

Fails with KeyFileError (exit 78) on a damaged key or one networkd cannot reach.
"""

from __future__ import annotations

import base64
import grp
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.core import durable
from appliance.core.errors import KeyFileError

NETWORKD_GROUP = "systemd-network"
MAX_KEY_FILE = 256  # a key is 45 bytes; anything much longer is not a key file


def _networkd_gid() -> int | None:
    try:
        return grp.getgrnam(NETWORKD_GROUP).gr_gid
    except KeyError:
        return None


def public_key(private_b64: str) -> str:
    """The public key of a base64 private key, as `wg pubkey` prints it."""
    raw = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64)).public_key()
    return base64.b64encode(raw.public_bytes_raw()).decode()


def new_private_key() -> str:
    """A private key as `wg genkey` makes it (RFC 7748 clamping)."""
    k = bytearray(os.urandom(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return base64.b64encode(bytes(k)).decode()


def read_private_key(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"vpn key {path} cannot be read: {e.strerror}") from None
    text = data.decode("ascii", errors="replace").strip()
    try:
        ok = len(data) <= MAX_KEY_FILE and len(base64.b64decode(text, validate=True)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise KeyFileError(f"vpn key {path} is not a WireGuard private key (as `wg genkey` prints)")
    return text


def ensure_key(path: Path) -> tuple[str, bool]:
    """The public key of the key at `path`, made first if missing; and whether it was made."""
    as_root = os.geteuid() == 0
    gid = _networkd_gid() if as_root else None
    created = not path.exists()
    if created:
        if not path.parent.exists():
            durable.make_dirs(path.parent, mode=0o700)
            if gid is not None:  # chmod: the process's umask (077) applied to mkdir
                os.chown(path.parent, 0, gid)
                os.chmod(path.parent, 0o750)  # noqa: S103 (networkd's group must enter it)
        durable.atomic_write(path, (new_private_key() + "\n").encode(), mode=0o600)
    if gid is not None:
        # Also on an existing key: a key restored from a backup gets networkd's access back.
        os.chown(path, 0, gid)
        os.chmod(path, 0o640)
        check_reachable(path, gid)
    return public_key(read_private_key(path)), created


def check_reachable(path: Path, gid: int) -> None:
    """Refuse a key that the group `gid` (systemd-network) cannot reach or read."""
    for d in reversed(path.parents):
        st = d.stat()
        if not (st.st_mode & stat.S_IXOTH or (st.st_gid == gid and st.st_mode & stat.S_IXGRP)):
            raise KeyFileError(f"vpn key {path}: systemd-networkd cannot enter {d} (mode"
                               f" {stat.S_IMODE(st.st_mode):04o}): keep the key in a folder of its"
                               " own, like /data/vpn")
