"""The only place that runs `rauc` (Debian's rauc 1.8, its D-Bus service in the image).

Every call has a time limit; a failure is an UpdateError whose message is RAUC's last
line of complaint (RAUC names files, slots and certificates, never patient data).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from appliance.core.errors import ApplianceError

RAUC = "rauc"
INSTALL_TIMEOUT_S = 3600.0  # 1.5 GiB written and checked on a slow eMMC: minutes, not an hour
QUERY_TIMEOUT_S = 60.0
BUSY = "already processing"  # RAUC's D-Bus answer while another call (an install) runs
BUSY_WAIT_S = INSTALL_TIMEOUT_S
BUSY_POLL_S = 5.0


class UpdateError(ApplianceError):
    """RAUC refused or failed (a bundle not signed by a trusted key, another product's
    bundle, a write error). Exit 65 (EX_DATAERR)."""

    exit_code = 65


def _run(args: list[str], timeout: float, busy_wait_s: float = BUSY_WAIT_S) -> str:
    """RAUC's service does one thing at a time: while it installs, a query or a mark is
    refused ("already processing"); it is asked again every BUSY_POLL_S, for at most
    `busy_wait_s`."""
    deadline = time.monotonic() + busy_wait_s
    while True:
        try:
            r = subprocess.run([RAUC, *args], capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UpdateError("rauc is not installed (updates need the appliance image)") from None
        except subprocess.TimeoutExpired:
            raise UpdateError(f"rauc {args[0]} did not finish within {timeout:.0f} s") from None
        if r.returncode == 0 or BUSY not in r.stderr or time.monotonic() >= deadline:
            break
        time.sleep(BUSY_POLL_S)
    if r.returncode != 0:
        said = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
        raise UpdateError(f"rauc {args[0]} failed: {said[-1] if said else f'exit {r.returncode}'}")
    return r.stdout


def install(bundle: Path, timeout: float = INSTALL_TIMEOUT_S) -> None:
    """Into the inactive slot, which RAUC then makes the first to boot (ORDER)."""
    _run(["install", str(bundle)], timeout)


def info(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest, its signature checked against the keyring."""
    out: dict[str, Any] = json.loads(_run(["info", "--output-format=json", str(bundle)], QUERY_TIMEOUT_S))
    return out


def status() -> dict[str, Any]:
    """`rauc status --detailed --output-format=json`: the booted slot's bootname under
    "booted", each slot's state, boot status and the bundle installed in it."""
    out: dict[str, Any] = json.loads(_run(["status", "--detailed", "--output-format=json"], QUERY_TIMEOUT_S))
    return out


def mark(state: str, which: str = "booted") -> None:
    """mark-good or mark-bad the booted slot or the other one (the grubenv's X_OK, X_TRY)."""
    if state not in ("good", "bad") or which not in ("booted", "other"):
        raise ValueError(f"mark {state} {which}")
    _run(["status", f"mark-{state}", which], QUERY_TIMEOUT_S)


def slots(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The slots of a status by name ("rootfs.0"); RAUC lists them as one-key objects."""
    found: dict[str, dict[str, Any]] = {}
    for entry in st.get("slots", []):
        found.update(entry)
    return found


def primary_bootname(st: dict[str, Any]) -> str | None:
    """The bootname (A, B) of the slot that boots first next time."""
    slot = slots(st).get(str(st.get("boot_primary")))
    return None if slot is None else slot.get("bootname")


def installed_versions(st: dict[str, Any]) -> set[str]:
    """The versions of the bundles installed in the slots (from RAUC's slot status)."""
    versions = set()
    for slot in slots(st).values():
        bundle = (slot.get("slot_status") or {}).get("bundle") or {}
        if bundle.get("version"):
            versions.add(str(bundle["version"]))
    return versions
