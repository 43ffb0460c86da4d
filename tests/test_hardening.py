"""Core dumps are off for the daemon and the codec workers it starts (they hold decrypted
images and the spool key): `appliance.core.hardening`, called first in `Daemon.run`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.peers import REPO, Appliance, storescu, wait_for

CHECK = """
import ctypes, resource
from appliance.core.hardening import forbid_core_dumps
failed = forbid_core_dumps()
PR_GET_DUMPABLE = 3
print(failed, resource.getrlimit(resource.RLIMIT_CORE), ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
"""


def test_forbid_core_dumps_zeroes_the_limit_and_clears_dumpable() -> None:
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.stdout.split("\n")[0] == "[] (0, 0) 0", r.stderr


def children(pid: int) -> list[int]:
    """Every thread's children; a thread that ends between the listing and the read has none."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def core_limit(pid: int) -> list[str]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if ln.startswith("Max core file size"))
    return line.split()[4:6]


def test_the_daemon_and_its_codec_workers_run_without_core_dumps(
        appliance_factory: Callable[..., Appliance], samples: Path) -> None:
    app = appliance_factory()
    (app.root / "outbox").mkdir(exist_ok=True)
    ct = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[:1]
    assert storescu(app.port, ct).returncode == 0  # the pool starts its workers on the first job
    assert app.proc is not None
    daemon = app.proc.pid
    # the forkserver's children: the codec workers (the resource tracker has none)
    workers = wait_for(lambda: [w for c in children(daemon) for w in children(c)], 60, "a codec worker")
    pids = [daemon, *children(daemon), *workers]
    assert {p: core_limit(p) for p in pids} == {p: ["0", "0"] for p in pids}
