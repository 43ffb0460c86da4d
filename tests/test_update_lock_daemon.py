"""The running daemon respects the update lock (appliance/update/lock.py): while an update
waits to reboot, association requests are rejected transient, and deliveries wait."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.update import lock
from tests.peers import Appliance, echoscu, free_port, storescu, wait_for
from tests.receive_support import daemon_log_events, held_config

Factory = Callable[..., Appliance]
ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"


def test_association_is_rejected_transient_while_an_update_waits_to_reboot(
        appliance_factory: Factory, tmp_path: Path) -> None:
    root = tmp_path / "a"
    app = appliance_factory(held_config(root, free_port()), root=root)
    held = lock.exclusive(lock.path_in(app.state_dir), timeout_s=60)
    assert held is not None
    try:
        r = echoscu(app.port)
        assert r.returncode != 0 and "Association Rejected" in r.stderr, r.stderr
        assert "Transient" in r.stderr, r.stderr
        wait_for(lambda: any(e.get("event") == "association.rejected"
                             and e.get("reason") == "an update is rebooting the appliance"
                             for e in daemon_log_events(app.log_text())),
                 what="association.rejected for the update")
    finally:
        for fd in held:
            os.close(fd)
    assert echoscu(app.port).returncode == 0  # the update gave up: associations are accepted again


def test_delivery_waits_while_an_update_holds_the_lock(
        appliance_factory: Factory, tmp_path: Path, samples: Path) -> None:
    """A lane does not start a delivery while the lock is held exclusively (the update
    has it, about to reboot); the bundle goes once the lock is free."""
    root = tmp_path / "a"
    cfg = held_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 1, "workers": 1}
    (root / "outbox").mkdir(parents=True)
    app = appliance_factory(cfg, root=root)
    # Only update.lock, not update.pending: associations are still accepted.
    fd = os.open(lock.path_in(app.state_dir), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert storescu(app.port, [samples / ONE_CT]).returncode == 0
        wait_for(lambda: _seen(app, "segment.packed"), timeout=180, what="segment.packed")
        # Lanes poll every 0.5 s: give them many turns to (wrongly) deliver.
        with pytest.raises(AssertionError):
            wait_for(lambda: _seen(app, "bundle.delivered"), timeout=5, what="no delivery")
    finally:
        os.close(fd)
    wait_for(lambda: _seen(app, "bundle.delivered"), timeout=120,
             what="the bundle delivered once the lock is free")


def _seen(app: Appliance, event: str) -> bool:
    return any(e.get("event") == event for e in daemon_log_events(app.log_text()))
