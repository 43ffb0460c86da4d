"""The directory transport on a folder it may not write: the bundle is held (Permanent)
with the fix named, never retried forever (a read-only bind mount in a private mount
namespace stands for the systemd unit's ProtectSystem=strict; needs root)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.peers import in_read_only_bind

SEND_ONCE = """
import sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from appliance.forward import Permanent
from appliance.forward.directory import DirectoryTransport
t = DirectoryTransport("nas", Path(sys.argv[1]), X25519PrivateKey.generate())
try:
    t.send("b1", Path(sys.argv[2]), lambda n: None)
except Permanent as e:
    print("Permanent:", e)
except Exception as e:
    print(type(e).__name__ + ":", e)
"""


@pytest.mark.root
def test_a_read_only_destination_folder_is_permanent_and_names_the_fix(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    bundle = tmp_path / "b1.bundle"
    bundle.write_bytes(b"not read: the folder refuses the temp file first")
    r = in_read_only_bind(share, sys.executable, "-c", SEND_ONCE, str(share), str(bundle))
    expected = f"Permanent: cannot write to {share}: Read-only file system"
    assert r.stdout.startswith(expected), r.stdout + r.stderr
    assert "appliance config systemd-dropin --write" in r.stdout
    assert list(share.iterdir()) == []
