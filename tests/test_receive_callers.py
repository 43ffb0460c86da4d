"""Who may send: the calling AE title allowlist, optionally bound to source addresses."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Appliance, echoscu, free_port, storescu, wait_for
from tests.receive_support import daemon_log_events, held_config

ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"

Factory = Callable[..., Appliance]


def start(factory: Factory, root: Path, **receive: Any) -> Appliance:
    return factory(held_config(root, free_port(), **receive), root=root)


def assert_rejected(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0, r.stderr
    assert "Association Rejected" in r.stderr, r.stderr


def rejected_events(app: Appliance, calling_ae: str) -> list[dict[str, Any]]:
    return [e for e in daemon_log_events(app.log_text())
            if e.get("event") == "association.rejected" and e.get("calling_ae") == calling_ae]


def test_unknown_calling_ae_is_rejected(appliance_factory: Factory, tmp_path: Path,
                                        samples: Path) -> None:
    """An AE title that is not on the allowlist cannot associate (C-ECHO or C-STORE);
    each attempt is logged as association.rejected; a listed caller still works."""
    app = start(appliance_factory, tmp_path / "a")
    assert_rejected(echoscu(app.port, aet="STRANGER"))
    assert_rejected(storescu(app.port, [samples / ONE_CT], aet="STRANGER"))
    wait_for(lambda: len(rejected_events(app, "STRANGER")) == 2, what="2 association.rejected lines")
    assert app.status()["receive"]["associations_rejected"] == 2
    assert app.spooled() == {}
    assert echoscu(app.port, aet="MODALITY").returncode == 0


@pytest.mark.parametrize(("hosts", "accepted"), [(["10.9.9.9"], False), (["127.0.0.0/8"], True)],
                         ids=["bound-elsewhere", "bound-to-loopback"])
def test_caller_bound_to_hosts(appliance_factory: Factory, tmp_path: Path, samples: Path,
                               hosts: list[str], accepted: bool) -> None:
    """A caller entry with `hosts` admits that AE title only from those addresses: the
    same AE title from 127.0.0.1 is rejected when bound to 10.9.9.9 and accepted when
    bound to 127.0.0.0/8."""
    app = start(appliance_factory, tmp_path / "a", callers=[{"ae_title": "CT_SCANNER", "hosts": hosts}])
    echo = echoscu(app.port, aet="CT_SCANNER")
    stored = storescu(app.port, [samples / ONE_CT], aet="CT_SCANNER")
    if accepted:
        assert echo.returncode == 0, echo.stderr
        assert stored.returncode == 0 and "Store Failed" not in stored.stderr, stored.stderr
        assert len(app.spooled()) == 1
        assert rejected_events(app, "CT_SCANNER") == []
    else:
        assert_rejected(echo)
        assert_rejected(stored)
        wait_for(lambda: len(rejected_events(app, "CT_SCANNER")) == 2, what="association.rejected lines")
        assert app.spooled() == {}


def test_accept_any_caller_accepts_anyone(appliance_factory: Factory, tmp_path: Path,
                                          samples: Path) -> None:
    """With accept_any_caller = true (a closed network), any AE title may store."""
    app = start(appliance_factory, tmp_path / "a", accept_any_caller=True, callers=[])
    assert echoscu(app.port, aet="WHOEVER").returncode == 0
    r = storescu(app.port, [samples / ONE_CT], aet="ANY_OTHER")
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert len(app.spooled()) == 1
    assert app.status()["receive"]["associations_rejected"] == 0
